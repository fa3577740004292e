"""Win-rate judges: which of two answers to the same prompt is better.

A judgment is for B against A: 1 (B wins), 0.5 (tie), 0 (A wins); ``metrics.evaluate(["win_rate"],
judgments)`` turns them into a win rate with a bootstrap interval.

- ``reward_judgments``: a reward model (tunelab reward run, ``_preference.RewardScorer``) scores both.
- ``LLMJudge``: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server,
  tunelab's own server, a hosted API). The two answers are shown in a seeded random order per item
  and the verdict is mapped back, so a judge's preference for the first position cancels out
  (Zheng et al. 2023, "Judging LLM-as-a-judge", position bias).
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request

from tunelab.errors import TunelabError

JUDGE_PROMPT = """You are comparing two answers to the same request. Judge helpfulness, correctness and clarity.

Request:
{prompt}

Answer 1:
{first}

Answer 2:
{second}

Reply with exactly one of: 1, 2, tie."""


def reward_judgments(scorer, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
    """Judgments of B vs A by a reward model: ``scorer(prompts, completions) -> [float]``."""
    if not (len(prompts) == len(a) == len(b)):
        raise TunelabError(f"judging needs one prompt per answer pair: {len(prompts)} prompts, {len(a)} A, {len(b)} B")
    if not prompts:
        raise TunelabError("no examples to judge")
    ra, rb = scorer(prompts, a), scorer(prompts, b)
    return [1.0 if y > x else 0.5 if y == x else 0.0 for x, y in zip(ra, rb)]


_VERDICT = re.compile(r"\b(tie|1|2)\b", re.IGNORECASE)


class LLMJudge:
    """An LLM behind an OpenAI-compatible endpoint as a pairwise judge.

    ``base_url`` ends before ``/chat/completions`` (e.g. ``http://localhost:8000/v1``); the API key,
    when needed, is read from the environment variable named by ``api_key_env``.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, seed: int = 0, prompt: str = JUDGE_PROMPT):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.seed, self.prompt = model, timeout, seed, prompt
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.unparsed = 0

    def _ask(self, text: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 8,
                           "messages": [{"role": "user", "content": text}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise TunelabError(f"judge endpoint {self.url} answered HTTP {e.code}: {e.read()[:200]!r}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise TunelabError(f"judge endpoint {self.url} is unreachable ({e}); is the server running?") from None
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise TunelabError(f"judge endpoint {self.url} did not answer in the chat-completions format") from None

    def __call__(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        """Judgments of B vs A (1, 0.5, 0); an answer the judge's reply does not name counts as a tie
        and is counted in ``self.unparsed``."""
        if not (len(prompts) == len(a) == len(b)):
            raise TunelabError(f"judging needs one prompt per answer pair: {len(prompts)} prompts, {len(a)} A, "
                               f"{len(b)} B")
        if not prompts:
            raise TunelabError("no examples to judge")
        rng = random.Random(self.seed)
        out = []
        for p, x, y in zip(prompts, a, b):
            b_first = rng.random() < 0.5
            first, second = (y, x) if b_first else (x, y)
            reply = self._ask(self.prompt.format(prompt=p, first=first, second=second))
            m = _VERDICT.search(reply)
            if m is None:
                self.unparsed += 1
                out.append(0.5)
                continue
            v = m.group(1).lower()
            if v == "tie":
                out.append(0.5)
            else:
                first_won = v == "1"
                out.append(1.0 if first_won == b_first else 0.0)
        return out
