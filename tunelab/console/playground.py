"""Playground: one prompt to two models side by side (a base and a fine-tuned model, or any two), through the
platform's own serving endpoint (``POST /v1/chat/completions``, in-process, as the signed-in key), with an
optional system prompt, temperature and a token cap; each side shows its answer, latency and token counts."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from fastapi import APIRouter, Request

from tunelab.console.web import ApiProblem, Console

NAV = [("Playground", "/console/playground", "infer")]


def model_groups(cards: list[dict]) -> tuple[list[str], list[dict]]:
    """Base model names (the served bases, then each fine-tuned model's base) and the fine-tuned models."""
    tuned = [m for m in cards if m.get("kind") == "fine-tuned"]
    bases: list[str] = []
    for name in [m.get("base") for m in tuned] + [m["id"] for m in cards if m.get("kind") == "base"]:
        if name and name not in bases:
            bases.append(name)
    return bases, tuned


def _float(v, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _int(v, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def routes(router: APIRouter, c: Console) -> None:
    api = c.api

    async def models(request: Request) -> list[dict]:
        try:
            return (await api.get(request, "/v1/models"))["data"]
        except ApiProblem:
            return []

    def defaults(cards: list[dict], a: Optional[str], b: Optional[str]) -> tuple[str, str]:
        bases, tuned = model_groups(cards)
        if not b:
            b = tuned[0]["id"] if tuned else (bases[1] if len(bases) > 1 else (bases[0] if bases else ""))
        if not a:
            card = next((m for m in tuned if m["id"] == b), None)
            a = (card or {}).get("base") or (bases[0] if bases else "")
        return a, b

    async def render(request: Request, form: dict, results: Optional[list] = None, status_code: int = 200):
        cards = await models(request)
        bases, tuned = model_groups(cards)
        return c.page(request, "playground.html", status_code, title="Playground", form=form, results=results,
                      bases=bases, tuned=tuned)

    @router.get("/playground")
    async def playground(request: Request, a: Optional[str] = None, b: Optional[str] = None):
        if not c.can(request, "infer"):
            return c.refused(request, "infer")
        cards = await models(request)
        a, b = defaults(cards, a, b)
        bases, tuned = model_groups(cards)
        form = {"a": a, "b": b, "system": "", "prompt": "", "temperature": "0", "max_tokens": "64"}
        return c.page(request, "playground.html", title="Playground", form=form, results=None, bases=bases,
                      tuned=tuned)

    async def ask(request: Request) -> tuple[dict, list, int]:
        form = {k: str(v) for k, v in (await request.form()).items()}
        prompt = form.get("prompt", "").strip()
        if not prompt:
            return form, [{"error": "Write a prompt first."}], 422
        messages = ([{"role": "system", "content": form["system"].strip()}] if form.get("system", "").strip() else []) \
            + [{"role": "user", "content": prompt}]
        body = {"messages": messages, "temperature": _float(form.get("temperature"), 0.0),
                "max_tokens": _int(form.get("max_tokens"), 64)}

        async def one(side: str) -> dict:
            model = form.get(side, "").strip()
            out: dict = {"side": side, "model": model}
            if not model:
                out["error"] = "Choose a model."
                return out
            t0 = time.perf_counter()
            try:
                r = await api.post(request, "/v1/chat/completions", {"model": model, **body})
                choice = r["choices"][0]
                out.update(text=choice["message"]["content"], finish_reason=choice.get("finish_reason"),
                           usage=r.get("usage") or {})
            except ApiProblem as e:
                out["error"] = e.message
            out["latency_s"] = time.perf_counter() - t0
            return out

        # both sides at once: the serving engine batches requests for the same base model
        return form, list(await asyncio.gather(one("a"), one("b"))), 200

    @router.post("/playground")
    async def playground_post(request: Request):
        """Without JavaScript: the whole page with both answers."""
        if not c.can(request, "infer"):
            return c.refused(request, "infer")
        form, results, status = await ask(request)
        return await render(request, form, results, status)

    @router.post("/playground/ask")
    async def playground_ask(request: Request):
        """The answers as a fragment (htmx swaps it under the form)."""
        if not c.can(request, "infer"):
            return c.refused(request, "infer")
        form, results, status = await ask(request)
        return c.page(request, "playground_answers.html", status, results=results)
