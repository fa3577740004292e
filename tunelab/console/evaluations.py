"""Evaluations: compare two or more models. The metric table (each model's value with its bootstrap interval;
each model's difference from the baseline with its interval, Holm-adjusted p and verdict: what ``tunelab eval``
and ``tunelab compare`` computed), and a side-by-side browser of the examples, filtered (the models differ, agree,
one wins, text) and paged on the server. A trainer starts an evaluation job for a run from here."""

from __future__ import annotations

from typing import Optional
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from tunelab.console.web import ApiProblem, Console

NAV = [("Evaluations", "/console/evaluations", "read")]
PAGE = 10


def parse_filter(value: str) -> tuple[str, Optional[str]]:
    """The browser's filter select: all, differ, same, or wins:MODEL."""
    kind, _, model = (value or "all").partition(":")
    return kind, (model or None)


def routes(router: APIRouter, c: Console) -> None:
    api = c.api

    async def runs_to_evaluate(request: Request) -> list[dict]:
        try:
            rows = (await api.get(request, "/v1/tunelab/runs", limit=1000))["data"]
        except ApiProblem:
            return []
        return [r for r in rows if r["status"] == "completed" and r["kind"] in ("sft", "dpo", "distill")]

    @router.get("/evaluations")
    async def evaluations(request: Request, error: Optional[str] = None):
        if not c.can(request, "read"):
            return c.refused(request, "read")
        try:
            rows = (await api.get(request, "/v1/tunelab/evaluations"))["data"]
        except ApiProblem as e:
            return c.problem(request, e)
        return c.page(request, "evaluations.html", title="Evaluations", evaluations=rows, error=error,
                      runs=await runs_to_evaluate(request) if c.can(request, "write") else [])

    @router.post("/evaluations/start")
    async def start(request: Request):
        if not c.can(request, "write"):
            return c.refused(request, "write")
        form = await request.form()
        run = str(form.get("run") or "").strip()
        options: dict = {}
        limit = str(form.get("limit") or "").strip()
        if limit.isdigit() and int(limit) > 0:
            options["limit"] = int(limit)
        for flag in ("no_business", "no_probe"):
            if form.get(flag):
                options[flag] = True
        try:
            job = await api.post(request, "/v1/tunelab/jobs", {"command": "eval", "run": run, "options": options})
        except ApiProblem as e:
            return c.problem(request, e, "Could not start the evaluation")
        return RedirectResponse(f"/console/jobs/{job['id']}", status_code=303)

    async def browse(request: Request, eval_id: str, task: Optional[str], filter: str, q: Optional[str],
                     offset: int) -> dict:
        kind, model = parse_filter(filter)
        return await api.get(request, f"/v1/tunelab/evaluations/{quote(eval_id)}/examples", task=task or None,
                             filter=kind, model=model, q=q or None, offset=max(0, offset), limit=PAGE)

    @router.get("/evaluations/{eval_id}")
    async def evaluation(request: Request, eval_id: str, task: Optional[str] = None, filter: str = "all",
                         q: Optional[str] = None, offset: int = 0):
        if not c.can(request, "read"):
            return c.refused(request, "read")
        try:
            ev = await api.get(request, f"/v1/tunelab/evaluations/{quote(eval_id)}")
            ex = await browse(request, eval_id, task, filter, q, offset)
        except ApiProblem as e:
            return c.problem(request, e)
        return c.page(request, "evaluation.html", title=f"Evaluation {eval_id}", ev=ev, ex=ex, filter=filter,
                      q=q or "", task=ex["task"])

    @router.get("/evaluations/{eval_id}/examples")
    async def examples(request: Request, eval_id: str, task: Optional[str] = None, filter: str = "all",
                       q: Optional[str] = None, offset: int = 0):
        """The browser's rows (an htmx fragment): the same filters as the page's form."""
        if not c.can(request, "read"):
            return c.refused(request, "read")
        try:
            ex = await browse(request, eval_id, task, filter, q, offset)
        except ApiProblem as e:
            return c.page(request, "message_fragment.html", e.status, message=e.message)
        return c.page(request, "evaluation_examples.html", ex=ex, filter=filter, q=q or "", task=ex["task"],
                      eval_id=eval_id)
