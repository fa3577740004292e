"""Text metrics from the reference libraries (never re-derived): rouge-score, sacrebleu.

ROUGE values are F-measures in [0, 1] (stemmed, as the ROUGE paper's toolkit); BLEU and chrF
are corpus-level sacrebleu scores in [0, 100]; exact match compares normalized strings.
"""

from __future__ import annotations

import math
import re
import string

from tunelab.errors import TunelabError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check(preds: list[str], refs: list[str]) -> None:
    if len(preds) != len(refs):
        raise TunelabError(f"{len(preds)} predictions but {len(refs)} references: they must pair up")
    if not preds:
        raise TunelabError("no examples to score")


def rouge_per_example(preds: list[str], refs: list[str]) -> list[dict[str, float]]:
    from tunelab._optional import require

    rs = require("rouge_score.rouge_scorer", "eval")
    scorer = rs.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = []
    for p, r in zip(preds, refs):
        # rougeLsum splits summaries on newlines; keep the text's own lines.
        s = scorer.score(r, p)
        out.append({k: s[k].fmeasure for k in ROUGE_TYPES})
    return out


def rouge(preds: list[str], refs: list[str]) -> dict[str, float]:
    _check(preds, refs)
    per = rouge_per_example(preds, refs)
    return {k: sum(x[k] for x in per) / len(per) for k in ROUGE_TYPES}


def bleu_chrf(preds: list[str], refs: list[str]) -> dict[str, float]:
    _check(preds, refs)
    from tunelab._optional import require

    sb = require("sacrebleu", "eval")
    return {"bleu": sb.corpus_bleu(preds, [refs]).score, "chrf": sb.corpus_chrf(preds, [refs]).score}


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(preds: list[str], refs: list[str]) -> float:
    _check(preds, refs)
    return sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / len(preds)


def text_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum, BLEU, chrF and exact match for paired predictions and references."""
    return {**rouge(preds, refs), **bleu_chrf(preds, refs), "exact_match": exact_match(preds, refs)}


def perplexity(total_nll: float, n_tokens: int) -> float:
    if n_tokens <= 0:
        raise TunelabError("perplexity needs at least one scored token")
    return math.exp(total_nll / n_tokens)
