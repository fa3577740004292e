"""Human feedback: campaigns (list, new), a campaign's page (progress per labeler, Cohen's kappa per pair, export
to a dataset), the blind A/B screen (1/← left, 2/→ right, t tie, s skip, a reason) and the labelling screen
(number keys pick a label). Every answer goes through the platform's feedback API as the signed-in key."""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from tunelab.console.web import ApiProblem, Console

# every role sees campaigns: readers follow them, labelers answer them (the API checks 'read' or 'feedback')
NAV = [("Feedback", "/console/feedback", None)]
LIVE = ("generating", "open")


def _lines(text: str) -> list[str]:
    return [x.strip() for x in (text or "").splitlines() if x.strip()]


def campaign_body(f: dict) -> tuple[dict, list[str]]:
    """The API request the new-campaign form describes, and the problems the form itself can see."""
    problems: list[str] = []
    kind = f.get("kind") if f.get("kind") in ("ab", "label") else "ab"
    body: dict[str, Any] = {"kind": kind}
    for k in ("name", "instructions"):
        if (f.get(k) or "").strip():
            body[k] = f[k].strip()
    try:
        body["labelers_per_item"] = int(f.get("labelers_per_item") or 1)
    except ValueError:
        problems.append("Labelers per item is a whole number.")
    if kind == "label":
        body["items"] = [{"text": t} for t in _lines(f.get("texts", ""))]
        body["labels"] = [x.strip() for x in (f.get("labels") or "").split(",") if x.strip()]
        return body, problems
    if f.get("source") == "items":
        items = []
        for i, line in enumerate(_lines(f.get("items", "")), 1):
            try:
                items.append(json.loads(line))
            except ValueError:
                problems.append(f"Items, line {i}: not JSON (one {{\"prompt\", \"a\", \"b\"}} object per line).")
        body["items"] = items
        models = [m.strip() for m in (f.get("model_a"), f.get("model_b")) if m and m.strip()]
        if models:
            body["models"] = models
        return body, problems
    body["models"] = [(f.get("model_a") or "").strip(), (f.get("model_b") or "").strip()]
    body["prompts"] = (f.get("prompts_file") or "").strip() or _lines(f.get("prompts", ""))
    if (f.get("max_tokens") or "").strip():
        try:
            body["max_tokens"] = int(f["max_tokens"])
        except ValueError:
            problems.append("Max tokens is a whole number.")
    return body, problems


def routes(router: APIRouter, c: Console) -> None:
    api = c.api

    async def new_form_data(request: Request) -> dict:
        out: dict = {"files": [], "models": []}
        try:
            out["files"] = [f for f in (await api.get(request, "/v1/files", limit=1000))["data"]
                            if f["purpose"] != "tunelab-dataset"]
            out["models"] = [m["id"] for m in (await api.get(request, "/v1/models"))["data"]]
        except ApiProblem:
            pass
        return out

    async def list_page(request: Request, error: Optional[str] = None, form: Optional[dict] = None,
                        status_code: int = 200):
        campaigns = (await api.get(request, "/v1/tunelab/feedback/campaigns"))["data"]
        extra = await new_form_data(request) if c.can(request, "write") else {"files": [], "models": []}
        return c.page(request, "feedback.html", status_code, title="Feedback", campaigns=campaigns, error=error,
                      form=form or {"kind": "ab", "source": "items", "labelers_per_item": "1"}, **extra)

    @router.get("/feedback")
    async def campaigns(request: Request):
        try:
            return await list_page(request)
        except ApiProblem as e:
            return c.problem(request, e)

    @router.post("/feedback")
    async def create(request: Request):
        if not c.can(request, "write"):
            return c.refused(request, "write")
        form = {k: str(v) for k, v in (await request.form()).items()}
        body, problems = campaign_body(form)
        if problems:
            return await list_page(request, error=" ".join(problems), form=form, status_code=400)
        try:
            camp = await api.post(request, "/v1/tunelab/feedback/campaigns", body)
        except ApiProblem as e:
            where = f" ({e.param})" if e.param else ""
            return await list_page(request, error=f"The campaign was refused{where}: {e.message}", form=form,
                                   status_code=e.status)
        return RedirectResponse(f"/console/feedback/{camp['id']}", status_code=303)

    async def campaign_page(request: Request, cid: str, template: str, **extra):
        try:
            camp = await api.get(request, f"/v1/tunelab/feedback/campaigns/{cid}")
        except ApiProblem as e:
            return c.problem(request, e)
        return c.page(request, template, title=f"Campaign {camp['name'] or cid}", camp=camp,
                      live=camp["status"] in LIVE, **extra)

    @router.get("/feedback/{cid}")
    async def campaign(request: Request, cid: str, error: Optional[str] = None):
        return await campaign_page(request, cid, "campaign.html", error=error)

    @router.get("/feedback/{cid}/progress")
    async def progress(request: Request, cid: str):
        return await campaign_page(request, cid, "campaign_progress.html")

    @router.post("/feedback/{cid}/export")
    async def export(request: Request, cid: str):
        if not c.can(request, "write"):
            return c.refused(request, "write")
        try:
            out = await api.post(request, f"/v1/tunelab/feedback/campaigns/{cid}/export", {})
        except ApiProblem as e:
            return await campaign_page(request, cid, "campaign.html", error=f"Export failed: {e.message}")
        return RedirectResponse(f"/console/datasets/{out['dataset_id']}", status_code=303)

    @router.get("/feedback/{cid}/work")
    async def work(request: Request, cid: str, error: Optional[str] = None):
        """The next item for this labeler: the blind A/B screen or the labelling screen."""
        if not c.can(request, "feedback"):
            return c.refused(request, "feedback")
        try:
            camp = await api.get(request, f"/v1/tunelab/feedback/campaigns/{cid}")
            item = await api.get(request, f"/v1/tunelab/feedback/campaigns/{cid}/next") \
                if camp["status"] == "open" else None
        except ApiProblem as e:
            return c.problem(request, e)
        you = camp["progress"]["you"]
        return c.page(request, "judge.html" if camp["kind"] == "ab" else "label.html",
                      title=("Compare" if camp["kind"] == "ab" else "Label") + f" · {camp['name'] or cid}",
                      camp=camp, item=item, you=you, error=error)

    @router.post("/feedback/{cid}/work")
    async def answer(request: Request, cid: str):
        if not c.can(request, "feedback"):
            return c.refused(request, "feedback")
        f = {k: str(v) for k, v in (await request.form()).items()}
        reason = (f.get("reason") or "").strip() or None
        try:
            if f.get("choice"):
                await api.post(request, f"/v1/tunelab/feedback/campaigns/{cid}/judgments",
                               {"item_id": f.get("item_id", ""), "choice": f["choice"], "reason": reason})
            else:
                body = {"item_id": f.get("item_id", ""), "reason": reason}
                body.update({"skip": True} if f.get("skip") else {"label": f.get("label")})
                await api.post(request, f"/v1/tunelab/feedback/campaigns/{cid}/labels", body)
        except ApiProblem as e:
            return await work(request, cid, error=e.message)
        return RedirectResponse(f"/console/feedback/{cid}/work", status_code=303)
