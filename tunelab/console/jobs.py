"""Jobs: the queue, a new job (a form for the common recipes, or any recipe as YAML, validated as you type),
and a job's page with its curves (every logged point, live), its log and cancel / pause / resume."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, StreamingResponse

from tunelab.console.web import ApiProblem, Console
from tunelab.models.resolve import PACKAGED

NAV = [("Jobs", "/console/jobs", "read")]
STATES = ("queued", "validating_files", "running", "paused", "succeeded", "failed", "cancelled")
LIVE = ("queued", "validating_files", "running")
LOG_TAIL = 16384  # bytes of the log a job's page shows
FORM_RECIPES = {  # recipe → (what it trains on, the data it reads)
    "sft": "instruction tuning: chat / Alpaca / prompt-completion records",
    "dpo": "preference tuning (DPO): prompt, chosen, rejected pairs",
    "reward": "a reward model: prompt, chosen, rejected pairs",
    "classify": "text classification: text and label columns",
    "cpt": "continued pre-training: plain text files",
}
METHODS = {"sft": ("lora", "full"), "dpo": ("lora", "full"), "reward": ("lora", "full"),
           "classify": ("full", "lora", "linear_probe"), "cpt": ("lora", "full")}
FORM_FIELDS = ("recipe", "name", "model", "train_file", "validation_file", "text_field", "label_field", "method",
               "lora_r", "learning_rate", "epochs", "batch_size", "max_steps", "max_length")
# a recipe problem's location → the form field that shows it
FIELD_OF = {"model.name": "model", "data.train": "train_file", "data.files": "train_file",
            "data.validation": "validation_file", "data.max_length": "max_length", "data.block_size": "max_length",
            "data.text_field": "text_field", "data.label_field": "label_field", "method": "method",
            "lora.r": "lora_r", "train.learning_rate": "learning_rate", "train.epochs": "epochs",
            "train.batch_size": "batch_size", "train.max_steps": "max_steps", "name": "name"}


def _num(v: Any, kind=float) -> Any:
    v = str(v or "").strip()
    if not v:
        return None
    try:
        return kind(v)
    except ValueError:
        return v  # the recipe's validation names the field and the expected type


def recipe_from_form(f: dict) -> dict:
    """The job recipe the form describes (shown to the user as YAML too: the form is a way to write it)."""
    kind = f.get("recipe") or "sft"
    r: dict[str, Any] = {"recipe": kind}
    if (f.get("name") or "").strip():
        r["name"] = f["name"].strip()
    r["model"] = {"name": (f.get("model") or "").strip()}
    data: dict[str, Any] = {}
    train = (f.get("train_file") or "").strip()
    if kind == "cpt":
        data["files"] = [train] if train else []
        data["block_size"] = _num(f.get("max_length"), int) or 256
    else:
        data["train"] = train
        data["max_length"] = _num(f.get("max_length"), int) or 256
        val = (f.get("validation_file") or "").strip()
        if val:
            data["validation"] = val
        else:
            data["validation_split"] = 0.1
        if kind == "classify":
            data["text_field"] = (f.get("text_field") or "text").strip()
            data["label_field"] = (f.get("label_field") or "label").strip()
    r["data"] = data
    r["method"] = f.get("method") or METHODS.get(kind, ("lora",))[0]
    if r["method"] == "lora":
        r["lora"] = {"r": _num(f.get("lora_r"), int) or 8}
    train_s: dict[str, Any] = {}
    for key, conv in (("learning_rate", float), ("epochs", float), ("batch_size", int), ("max_steps", int)):
        v = _num(f.get(key), conv)
        if v is not None:
            train_s[key] = int(v) if key == "epochs" and isinstance(v, float) and v.is_integer() else v
    r["train"] = train_s
    return r


def problems_by_field(problems: list) -> tuple[dict[str, list[str]], list[str]]:
    """API problems ({loc, msg}) → messages per form field, and the ones no field shows."""
    fields: dict[str, list[str]] = {}
    rest = []
    for pr in problems:
        loc, msg = (pr.get("loc", ""), pr.get("msg", "")) if isinstance(pr, dict) else ("", str(pr))
        field = FIELD_OF.get(loc) or next((v for k, v in FIELD_OF.items() if loc.startswith(k + ".")), None)
        (fields.setdefault(field, []) if field else rest).append(msg if field else f"{loc}: {msg}" if loc else msg)
    return fields, rest


def chart_spec(rows: list[dict]) -> dict:
    """The curve of a run: training loss and validation loss per step (every logged point), plus learning rate."""
    keep = [{"step": r["step"], **{k: r[k] for k in ("loss", "eval_loss") if k in r}} for r in rows
            if "step" in r and ("loss" in r or "eval_loss" in r)]
    return {"x": "step", "xlabel": "step", "ylabel": "loss",
            "series": [{"key": "loss", "label": "training loss"}, {"key": "eval_loss", "label": "validation loss"}],
            "rows": keep}


def routes(router: APIRouter, c: Console) -> None:
    api = c.api

    async def files(request: Request) -> list[dict]:
        try:
            return (await api.get(request, "/v1/files", limit=1000))["data"]
        except ApiProblem:
            return []

    async def models(request: Request) -> list[str]:
        names = sorted(PACKAGED)
        try:
            names += [m["id"] for m in (await api.get(request, "/v1/models"))["data"] if m["id"] not in names]
        except ApiProblem:
            pass
        return names

    @router.get("/jobs")
    async def jobs(request: Request, status: Optional[str] = None):
        if not c.can(request, "read"):
            return c.refused(request, "read")
        return c.page(request, "jobs.html", title="Jobs", jobs=await _list(request, status), status=status,
                      states=STATES)

    @router.get("/jobs/rows")
    async def job_rows(request: Request, status: Optional[str] = None):
        return c.page(request, "jobs_rows.html", jobs=await _list(request, status), status=status)

    async def _list(request: Request, status: Optional[str]) -> list[dict]:
        return (await api.get(request, "/v1/tunelab/jobs", limit=100, status=status or None))["data"]

    async def new_page(request: Request, form: dict, tab: str, yaml_text: str, problems: list, status_code=200):
        by_field, rest = problems_by_field(problems)
        return c.page(request, "job_new.html", status_code, title="New job", form=form, tab=tab, yaml_text=yaml_text,
                      field_errors=by_field, problems=rest, recipes=FORM_RECIPES, methods=METHODS,
                      files=await files(request), models=await models(request))

    @router.get("/jobs/new")
    async def new_job(request: Request, tab: str = "form", recipe: str = "sft"):
        """The form; its fields may come in the query (the recipe selector reloads the form keeping what was typed)."""
        if not c.can(request, "write"):
            return c.refused(request, "write")
        form = {"recipe": recipe if recipe in FORM_RECIPES else "sft", "model": "smollm2-135m-instruct",
                "learning_rate": "2e-4", "epochs": "1", "batch_size": "8", "max_length": "256", "lora_r": "8"}
        form.update({k: v for k, v in request.query_params.items() if k in FORM_FIELDS and k != "recipe"})
        if form.get("method") not in METHODS[form["recipe"]]:
            form["method"] = METHODS[form["recipe"]][0]
        text = yaml.safe_dump(recipe_from_form(form), sort_keys=False)
        return await new_page(request, form, "yaml" if tab == "yaml" else "form", text, [])

    async def submitted(request: Request) -> tuple[dict, str, Any]:
        form = {k: str(v) for k, v in (await request.form()).items()}
        tab = form.pop("tab", "form")
        if tab == "yaml":
            return form, tab, form.get("yaml", "")
        return form, tab, recipe_from_form(form)

    @router.post("/jobs/validate")
    async def validate(request: Request):
        """As the user types: the API's own validation (a dry run), every problem at once."""
        form, tab, recipe = await submitted(request)
        try:
            await api.post(request, "/v1/tunelab/jobs", {"recipe": recipe, "dry_run": True})
            problems, ok = [], True
        except ApiProblem as e:
            problems, ok = (e.problems or [e.message]), False
        by_field, rest = problems_by_field(problems)
        text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
        return c.page(request, "job_problems.html", ok=ok, problems=rest, field_errors=by_field, tab=tab,
                      yaml_text=text, fragment=True)

    @router.post("/jobs")
    async def create(request: Request):
        if not c.can(request, "write"):
            return c.refused(request, "write")
        form, tab, recipe = await submitted(request)
        try:
            job = await api.post(request, "/v1/tunelab/jobs", {"recipe": recipe})
        except ApiProblem as e:
            text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
            return await new_page(request, form, tab, text, e.problems or [e.message], status_code=422)
        return RedirectResponse(f"/console/jobs/{job['id']}", status_code=303)

    @router.get("/jobs/{job_id}")
    async def job_page(request: Request, job_id: str):
        try:
            job = await api.get(request, f"/v1/tunelab/jobs/{job_id}")
            metrics = await api.get(request, f"/v1/tunelab/jobs/{job_id}/metrics")
            log = await api.call(request, "GET", f"/v1/tunelab/jobs/{job_id}/log", params={"tail": LOG_TAIL})
        except ApiProblem as e:
            return c.problem(request, e)
        # the page holds every row so far; its stream starts where these answers ended
        log_from = _int(log.headers.get("x-tunelab-next-offset"))
        return c.page(request, "job.html", title=f"Job {job_id}", job=job, log=log.text,
                      chart=chart_spec(metrics["data"]), live=job["status"] in LIVE,
                      metrics_from=metrics.get("next_offset", 0), log_from=log_from)

    @router.post("/jobs/{job_id}/{action}")
    async def act(request: Request, job_id: str, action: str):
        if action not in ("cancel", "pause", "resume"):
            return c.page(request, "message.html", 404, title="Not found", message=f"no action '{action}'")
        if not c.can(request, "write"):
            return c.refused(request, "write")
        try:
            await api.post(request, f"/v1/tunelab/jobs/{job_id}/{action}")
        except ApiProblem as e:
            return c.problem(request, e, f"Could not {action} the job")
        return RedirectResponse(f"/console/jobs/{job_id}", status_code=303)

    @router.get("/jobs/{job_id}/stream")
    async def stream(request: Request, job_id: str):
        """Server-sent events until the job ends: "metrics" (the chart rows logged since), "state" (when it
        changes), "log" (the text appended since) and "end". ``from`` and ``log_from`` are where the page's own
        metrics and log end (the API's next offsets); a reconnecting browser sends the last event's id, which
        carries both. Each second costs what is new, not the whole run: the API reads from those offsets."""
        q = request.query_params
        metrics_at, log_at = _int(q.get("from")), _int(q.get("log_from"))
        last_id = (request.headers.get("last-event-id") or "").split(":")
        if len(last_id) == 2 and all(x.isdigit() for x in last_id):
            metrics_at, log_at = int(last_id[0]), int(last_id[1])
        try:
            await api.get(request, f"/v1/tunelab/jobs/{job_id}")
        except ApiProblem as e:
            return c.problem(request, e)

        async def events():
            m_at, l_at, attempts, last_state = metrics_at, log_at, None, None
            while True:
                if await request.is_disconnected():
                    return
                try:
                    job = await api.get(request, f"/v1/tunelab/jobs/{job_id}")
                    if attempts is not None and job["attempts"] != attempts:
                        m_at = 0  # a retried run rewrites its metrics from its checkpoint: read them again
                    attempts = job["attempts"]
                    try:
                        metrics = await api.get(request, f"/v1/tunelab/jobs/{job_id}/metrics", offset=m_at)
                    except ApiProblem as e:
                        if e.status != 400:
                            raise
                        # the offset is no longer a row start (the file was rewritten): every row again; the chart
                        # merges rows of the same step, so nothing is drawn twice
                        metrics = await api.get(request, f"/v1/tunelab/jobs/{job_id}/metrics", offset=0)
                    log = await api.call(request, "GET", f"/v1/tunelab/jobs/{job_id}/log",
                                         params={"offset": l_at, "tail": LOG_TAIL})
                except ApiProblem:
                    return
                rows = chart_spec(metrics["data"])["rows"]
                m_at = metrics["next_offset"]
                if rows:
                    yield f"id: {m_at}:{l_at}\nevent: metrics\ndata: {json.dumps(rows)}\n\n"
                state = {"status": job["status"], "error": job["error"]}
                if state != last_state:
                    yield f"event: state\ndata: {json.dumps(state)}\n\n"
                    last_state = state
                if log.status_code == 200:
                    start = _int(log.headers.get("x-tunelab-offset"))
                    l_next = _int(log.headers.get("x-tunelab-next-offset"))
                    if log.text or start > l_at:
                        # reset: more than LOG_TAIL bytes came since, so the text does not continue the page's
                        data = {"text": log.text, "reset": start > l_at}
                        yield f"id: {m_at}:{l_next}\nevent: log\ndata: {json.dumps(data)}\n\n"
                    l_at = l_next
                if job["status"] not in LIVE:
                    yield "event: end\ndata: {}\n\n"
                    return
                await asyncio.sleep(1.0)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})


def _int(v: Any) -> int:
    """A non-negative offset from a query or header; anything else is 0 (from the start)."""
    v = str(v or "").strip()
    return int(v) if v.isdigit() else 0
