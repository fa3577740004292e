"""The platform's HTTP API: one FastAPI app (docs/platform.md).

- OpenAI: ``/v1/files``, ``/v1/fine_tuning/jobs`` (+ cancel, pause, resume, events, checkpoints),
  ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (tunelab.serve, per base model)
- native: ``/v1/tunelab/jobs`` takes any job recipe (YAML), validated like ``tunelab validate``
- Bedrock: ``/model-customization-jobs`` (tunelab.platform.bedrock)
- admin: ``/v1/tunelab/admin/keys``, ``/v1/tunelab/admin/audit``

An ASGI layer in front authenticates every request (tunelab.platform.auth), answers inference
requests through tunelab.serve, and appends each change and each refusal to the audit log.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at definition time.
import asyncio
import contextvars
import json
import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import ConfigError, TunelabError
from tunelab import config as cfglib
from tunelab.models.resolve import HUB_ID, PACKAGED
from tunelab.platform import auth as A
from tunelab.platform import bedrock, datasets, feedback, runs
from tunelab.platform import files as F
from tunelab.platform import jobs as J
from tunelab.platform.inference import PATHS as INFERENCE_PATHS, Models, dispatch
from tunelab.platform.settings import PlatformSettings
from tunelab.platform.store import TERMINAL, Store, new_id
from tunelab.workspace import Workspace, read_jsonl, sha256_file

PUBLIC = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, extra: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.extra = extra or {}


def _err_body(status, message, type_="invalid_request_error", param=None, code=None, extra=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **(extra or {})}}


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyper(_Body):
    batch_size: Union[Literal["auto"], int, None] = Field(None)
    learning_rate_multiplier: Union[Literal["auto"], float, None] = None
    n_epochs: Union[Literal["auto"], int, None] = None
    beta: Union[Literal["auto"], float, None] = None


class MethodPart(_Body):
    hyperparameters: Optional[Hyper] = None


class Method(_Body):
    type: Literal["supervised", "dpo"]
    supervised: Optional[MethodPart] = None
    dpo: Optional[MethodPart] = None


class CreateJob(_Body):
    model: str = Field(min_length=1, max_length=500)
    training_file: str = Field(min_length=1, max_length=100)
    validation_file: Optional[str] = Field(None, max_length=100)
    suffix: Optional[str] = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: Optional[int] = Field(None, ge=0, le=2 ** 31 - 1)
    metadata: Optional[dict[str, str]] = Field(None, max_length=16)
    method: Optional[Method] = None
    hyperparameters: Optional[Hyper] = None  # the older top-level form (supervised)
    integrations: Optional[list[Any]] = Field(None, max_length=0)


class NativeJob(_Body):
    recipe: Union[str, dict[str, Any], None] = Field(None, description="a job recipe: YAML text or a mapping")
    set: list[str] = Field(default_factory=list, max_length=100, description="overrides: train.learning_rate=1e-4")
    command: Optional[Literal["eval", "export"]] = Field(None, description="eval/export a run (no recipe)")
    run: Optional[str] = Field(None, max_length=200, description="eval/export: the run id")
    options: dict[str, Union[bool, int, str]] = Field(default_factory=dict, max_length=10)
    metadata: Optional[dict[str, str]] = Field(None, max_length=16)
    dry_run: bool = Field(False, description="validate the recipe and answer; queue nothing")


class KeyBody(_Body):
    role: Literal["admin", "trainer", "labeler", "viewer"]
    project: str = Field("default", min_length=1, max_length=63)
    name: Optional[str] = Field(None, max_length=200)


# ----------------------------------------------------------------------------- views


def ft_job(job: dict, store: Store, ws: Workspace) -> dict:
    s = job["spec"]
    res = job["result"] or {}
    status = "validating_files" if job["status"] == "validating_files" else job["status"]
    method = {"type": s.get("method", "supervised")}
    method[method["type"]] = {"hyperparameters": s.get("hyperparameters", {})}
    return {
        "id": job["id"], "object": "fine_tuning.job", "created_at": int(job["created_at"]),
        "error": job["error"], "fine_tuned_model": job["fine_tuned_model"] if status == "succeeded" else None,
        "finished_at": int(job["finished_at"]) if job["finished_at"] and status in TERMINAL else None,
        "hyperparameters": {k: v for k, v in s.get("hyperparameters", {}).items() if k != "beta"},
        "model": s.get("model"), "organization_id": job["project"], "result_files": [],
        "seed": s.get("seed"), "status": status, "trained_tokens": res.get("tokens_seen"),
        "training_file": s.get("training_file"), "validation_file": s.get("validation_file"),
        "integrations": [], "metadata": s.get("metadata"), "method": method, "estimated_finish": None,
        "user_provided_suffix": s.get("suffix"), "run_id": job["run_id"],
    }


def native_job(job: dict) -> dict:
    return {"id": job["id"], "object": "tunelab.job", "command": job["command"], "status": job["status"],
            "run_id": job["run_id"], "created_at": int(job["created_at"]),
            "started_at": int(job["started_at"]) if job["started_at"] else None,
            "finished_at": int(job["finished_at"]) if job["finished_at"] else None,
            "attempts": job["attempts"], "error": job["error"], "result": job["result"],
            "recipe": job["recipe_yaml"], "metadata": job["spec"].get("metadata"), "api": job["api"]}


def file_view(f: dict) -> dict:
    return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": int(f["created_at"]),
            "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None,
            "expires_at": None, "records": f["records"], "kind": f["kind"]}


def metrics_rows(ws: Workspace, run_id: Optional[str]) -> list[dict]:
    return read_jsonl(J.run_dir(ws, run_id) / "metrics.jsonl") if run_id else []


def page(items: list[dict], after: Optional[str], limit: int) -> dict:
    if after:
        ids = [x["id"] for x in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit,
            **({"first_id": items[0]["id"], "last_id": items[:limit][-1]["id"]} if items else {})}


def listing(rows: list[dict], limit: int, view) -> dict:
    """A page read from the store with ``limit + 1`` rows: the first ``limit`` shown, the extra one says more follow."""
    return {"object": "list", "data": [view(r) for r in rows[:limit]], "has_more": len(rows) > limit}


# ----------------------------------------------------------------------------- the app


class Platform:
    """The state behind the app: workspace, store, authenticator, models, settings."""

    def __init__(self, ws: Workspace, settings: PlatformSettings):
        self.ws, self.settings = ws, settings
        self.store = Store(ws.db_path)
        self.auth = A.Authenticator(self.store)
        self.models = Models(ws, self.store, max_batch_size=settings.max_batch_size, max_tokens=settings.max_tokens,
                             threads=settings.threads)
        self.files_dir = ws.root / "platform" / "files"
        # a front end served by the same app (tunelab.console) adds its public paths and its login page here
        self.public_prefixes: tuple[str, ...] = ()
        self.public_paths: tuple[str, ...] = ()
        self.login_redirects: dict[str, str] = {}


def create_app(ws: Workspace, settings: Optional[PlatformSettings] = None):
    from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or PlatformSettings()
    P = Platform(ws, settings)
    store = P.store
    api = FastAPI(title="tunelab platform", version="1",
                  description="OpenAI-compatible fine-tuning and chat, Bedrock model customization, native recipes")
    api.state.platform = P

    @api.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        if request.url.path.startswith(bedrock.PREFIX):
            return bedrock.error(e.status, e.message)
        return JSONResponse(_err_body(e.status, e.message, e.type, e.param, e.code, e.extra), status_code=e.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in err['loc'] if p not in ('body', 'query', 'path')) or 'body'}: "
                    f"{err['msg']}" for err in e.errors()]
        msg = "malformed request: " + "; ".join(problems)
        if request.url.path.startswith(bedrock.PREFIX):
            return bedrock.error(400, msg)
        return JSONResponse(_err_body(400, msg), status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        if request.url.path.startswith(bedrock.PREFIX):
            return bedrock.error(e.status_code, str(e.detail))
        return JSONResponse(_err_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @api.exception_handler(Exception)
    async def _crash(request, e: Exception):  # a bug: the reason in the log, a plain 500 to the client
        import logging

        logging.getLogger("tunelab.platform").exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(_err_body(500, "internal error; see the server log", "server_error"), status_code=500)

    def need(permission: str):
        def check(request: Request) -> A.Principal:
            p: A.Principal = request.state.principal
            if not p.can(permission):
                raise APIError(403, f"role '{p.role}' may not do this (needs '{permission}')", "permission_error",
                               code="forbidden")
            return p

        return Depends(check)

    def get_file(fid: str, p: A.Principal) -> dict:
        f = store.get_file(fid, p.project)
        if f is None:
            raise APIError(404, f"no file '{fid}'", param="file_id", code="file_not_found")
        return f

    def get_job(jid: str, p: A.Principal, api_name: Optional[str] = None) -> dict:
        j = store.get_job(jid, p.project)
        if j is None or (api_name and j["api"] != api_name):
            raise APIError(404, f"no job '{jid}'", param="fine_tuning_job_id", code="job_not_found")
        return j

    # ------------------------------------------------------------------ health, models

    @api.get("/health")
    async def health():
        return {"status": "ok", "open": P.auth.open_mode(), "worker": settings.worker}

    @api.get("/v1/models")
    async def list_models(p=need("read")):
        return {"object": "list", "data": await asyncio.to_thread(P.models.available, p.project)}

    # ------------------------------------------------------------------ files

    @api.post("/v1/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...), p=need("write")):
        if purpose not in ("fine-tune", "tunelab-data"):
            raise APIError(400, f"purpose '{purpose}' is not supported; use 'fine-tune' (or 'tunelab-data' for native "
                                "recipes)", param="purpose")
        name = F.label(file.filename)
        try:
            suffix = F.suffix(name)
        except F.BadUpload as e:
            raise APIError(e.status, str(e), param="file", code="unsupported_file") from None
        fid = new_id("file")
        d = P.files_dir / p.project
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{fid}{suffix}"
        size = 0
        try:
            with open(path, "wb") as out:
                while chunk := await file.read(1 << 20):
                    size += len(chunk)
                    if size > settings.max_upload_bytes:
                        raise APIError(413, f"the file is over this server's limit of {settings.max_upload_bytes:,} "
                                            "bytes", param="file", code="file_too_large")
                    out.write(chunk)
            records, kind = await asyncio.to_thread(F.validate, path, purpose)
        except F.BadUpload as e:
            path.unlink(missing_ok=True)
            raise APIError(e.status, str(e), param="file", code="invalid_file",
                           extra={"problems": e.problems[:100]}) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        store.add_file(id=fid, project=p.project, filename=name, purpose=purpose, bytes=size, path=str(path),
                       records=records, kind=kind, sha256=sha256_file(path), created_at=time.time())
        return file_view(store.get_file(fid, p.project))

    @api.get("/v1/files")
    async def list_files(purpose: Optional[str] = None, limit: int = Query(100, ge=1, le=10000),
                         after: Optional[str] = Query(None, max_length=100),
                         order: Literal["asc", "desc"] = "desc", p=need("read")):
        rows = store.list_files(p.project, purpose, limit + 1, after, order)
        return listing(rows, limit, file_view)

    @api.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, p=need("read")):
        return file_view(get_file(file_id, p))

    @api.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, p=need("read")):
        from fastapi.responses import FileResponse

        f = get_file(file_id, p)
        return FileResponse(f["path"], media_type="application/octet-stream", filename=f["filename"])

    @api.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, p=need("write")):
        f = get_file(file_id, p)
        store.delete_file(file_id, p.project)
        if Path(f["path"]).is_relative_to(P.files_dir):  # a dataset split's id (datasets.py) forgets the id only
            Path(f["path"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------ OpenAI fine-tuning jobs

    def check_model(model: str) -> None:
        p = Path(model)
        ok = (model.lower() in PACKAGED or (ws.models_dir / model / "config.json").is_file()
              or (p.is_absolute() and (p / "config.json").is_file()) or bool(HUB_ID.match(model)))
        if not ok:
            raise APIError(400, f"model '{model}' is not available; use a packaged model "
                                f"({', '.join(sorted(PACKAGED))}), a model in the server's cache or a hub id",
                           param="model", code="model_not_available")

    @api.post("/v1/fine_tuning/jobs")
    async def create_ft_job(body: CreateJob, p=need("write")):
        method = body.method.type if body.method else "supervised"
        part = getattr(body.method, method, None) if body.method else None
        hyper = ((part.hyperparameters if part else None) or body.hyperparameters or Hyper()).model_dump(
            exclude_none=True)
        if method == "supervised" and "beta" in hyper:
            raise APIError(400, "beta is a DPO hyperparameter", param="method.supervised.hyperparameters.beta")
        check_model(body.model)
        train_f = store.get_file(body.training_file, p.project)
        if train_f is None:
            raise APIError(400, f"training_file '{body.training_file}' does not exist", param="training_file",
                           code="invalid_training_file")
        val_f = None
        if body.validation_file:
            val_f = store.get_file(body.validation_file, p.project)
            if val_f is None:
                raise APIError(400, f"validation_file '{body.validation_file}' does not exist",
                               param="validation_file", code="invalid_validation_file")
        want = ("openai_dpo", "preference") if method == "dpo" else ("chat",)
        for param, f in (("training_file", train_f), ("validation_file", val_f)):
            if f is not None and (f["purpose"] != "fine-tune" or f["kind"] not in want):
                raise APIError(400, f"{param} '{f['id']}' holds {f['kind']} records (purpose {f['purpose']}); "
                                    f"method {method} needs {' or '.join(want)} records with purpose fine-tune",
                               param=param, code=f"invalid_{param}")
        jid = new_id("ftjob")
        kind = "dpo" if method == "dpo" else "sft"
        run_id = f"{kind}-{jid}"
        short = jid.split("-")[1][:8]
        base_label = Path(body.model).name if Path(body.model).is_absolute() else body.model
        ft_name = f"ft:{base_label}:{p.project}:{body.suffix or 'tunelab'}:{short}"
        spec = {"model": body.model, "training_file": body.training_file, "validation_file": body.validation_file,
                "suffix": body.suffix, "seed": body.seed, "metadata": body.metadata, "method": method}
        store.add_job(id=jid, project=p.project, api="openai", command="train", spec=spec, recipe_yaml=None,
                      run_id=run_id, created_by=p.key_id, status="validating_files", fine_tuned_model=ft_name)
        store.event(jid, f"Validating training file: {body.training_file}")
        d = J.job_dir(ws, jid)
        d.mkdir(parents=True, exist_ok=True)
        try:
            paths = {}
            for param, f in (("train", train_f), ("val", val_f)):
                if f is None:
                    continue
                if f["kind"] == "openai_dpo":  # OpenAI's DPO records → tunelab preference pairs
                    dst = d / f"{param}.pairs.jsonl"
                    await asyncio.to_thread(J.openai_dpo_to_pairs, Path(f["path"]), dst)
                    paths[param] = str(dst)
                else:
                    paths[param] = f["path"]
            recipe, resolved = J.openai_recipe(method=method, model=body.model, train_path=paths["train"],
                                               val_path=paths.get("val"), train_records=train_f["records"],
                                               hyper=hyper, seed=body.seed, name=body.suffix or "job",
                                               defaults=settings.recipe_defaults)
            J.validate_recipe(recipe, "the job's recipe")
        except (ConfigError, TunelabError, ValueError) as e:
            store.set_job(jid, status="failed", finished_at=time.time(),
                          error={"code": "invalid_training_file", "message": str(e), "param": "training_file"})
            store.event(jid, f"Validation failed: {e}", "error")
            return ft_job(store.get_job(jid), store, ws)
        spec["hyperparameters"] = resolved
        text = J.write_recipe(ws, jid, recipe)
        store.set_job(jid, status="queued", spec_json=json.dumps(spec), recipe_yaml=text)
        store.event(jid, "Files validated, moving job to queued state")
        return ft_job(store.get_job(jid), store, ws)

    @api.get("/v1/fine_tuning/jobs")
    async def list_ft_jobs(after: Optional[str] = Query(None, max_length=100), limit: int = Query(20, ge=1, le=100),
                           p=need("read")):
        rows = store.list_jobs(p.project, api="openai", limit=limit + 1, after=after)
        return listing(rows, limit, lambda j: ft_job(j, store, ws))

    @api.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_ft_job(job_id: str, p=need("read")):
        return ft_job(get_job(job_id, p, "openai"), store, ws)

    def stop(job: dict, what: str) -> dict:
        """Cancel or pause: at once when it is not running, else ask its worker."""
        if job["status"] in TERMINAL:
            raise APIError(400, f"job {job['id']} is already {job['status']}", code="invalid_state")
        if what == "pause" and job["status"] != "running":
            raise APIError(400, f"only a running job can be paused; {job['id']} is {job['status']}",
                           code="invalid_state")
        if job["status"] in ("queued", "validating_files", "paused"):
            if store.set_job(job["id"], status="cancelled", finished_at=time.time(), requested=None) and what == "cancel":
                store.event(job["id"], "Job cancelled")
        else:
            store.request(job["id"], what)
            store.event(job["id"], f"{what.capitalize()} requested; the job stops at the end of its current step")
        return store.get_job(job["id"])

    @api.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_ft_job(job_id: str, p=need("write")):
        return ft_job(stop(get_job(job_id, p, "openai"), "cancel"), store, ws)

    @api.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause_ft_job(job_id: str, p=need("write")):
        return ft_job(stop(get_job(job_id, p, "openai"), "pause"), store, ws)

    @api.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume_ft_job(job_id: str, p=need("write")):
        job = get_job(job_id, p, "openai")
        if job["status"] != "paused":
            raise APIError(400, f"only a paused job can be resumed; {job_id} is {job['status']}", code="invalid_state")
        store.set_job(job_id, status="queued", resume=1, requested=None)
        store.event(job_id, "Job resumed; queued to continue from its last checkpoint")
        return ft_job(store.get_job(job_id), store, ws)

    @api.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def ft_events(job_id: str, after: Optional[str] = Query(None, max_length=100),
                        limit: int = Query(20, ge=1, le=1000), p=need("read")):
        job = get_job(job_id, p, "openai")
        evs = [{"object": "fine_tuning.job.event", "id": f"ftevent-{e['seq']:010d}", "created_at": int(e["created_at"]),
                "level": "warn" if e["level"] == "warning" else e["level"], "message": e["message"], "data": {},
                "type": "message"} for e in store.events(job_id)]
        rows = metrics_rows(ws, job["run_id"])
        valid = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
        for r in rows:
            if "loss" not in r:
                continue
            data = {"step": r["step"], "train_loss": r["loss"], "learning_rate": r.get("learning_rate"),
                    "tokens_per_s": r.get("tokens_per_s")}
            if r["step"] in valid:
                data["valid_loss"] = valid[r["step"]]
            msg = f"Step {r['step']}: training loss={r['loss']:.4f}" + (
                f", validation loss={valid[r['step']]:.4f}" if r["step"] in valid else "")
            evs.append({"object": "fine_tuning.job.event", "id": f"ftevent-m{r['step']:09d}",
                        "created_at": int(r.get("time") or 0), "level": "info", "message": msg, "data": data,
                        "type": "metrics"})
        evs.sort(key=lambda e: (e["created_at"], e["id"]), reverse=True)  # newest first, as OpenAI lists them
        return page(evs, after, limit)

    @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def ft_checkpoints(job_id: str, after: Optional[str] = Query(None, max_length=100),
                             limit: int = Query(10, ge=1, le=100), p=need("read")):
        job = get_job(job_id, p, "openai")
        rows = metrics_rows(ws, job["run_id"])
        out = []
        ckdir = J.run_dir(ws, job["run_id"]) / "checkpoints"
        for c in sorted(ckdir.glob("checkpoint-*"), key=lambda c: -int(c.name.split("-")[-1])) if ckdir.is_dir() else []:
            if not (c / "trainer_state.json").is_file():
                continue  # a checkpoint being written
            step = int(c.name.split("-")[-1])
            m = {"step": step}
            for r in rows:
                if r.get("step") == step and "loss" in r:
                    m["train_loss"] = r["loss"]
                if r.get("step") == step and "eval_loss" in r:
                    m["valid_loss"] = r["eval_loss"]
            out.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job_id.split('-')[1][:8]}-{step}",
                        "created_at": int(c.stat().st_mtime), "fine_tuning_job_id": job_id, "step_number": step,
                        "metrics": m, "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-{step}"})
        return page(out, after, limit)

    # ------------------------------------------------------------------ native recipes

    def file_lookup(p: A.Principal):
        def lookup(fid: str):
            f = store.get_file(fid, p.project)
            return f["path"] if f else None

        return lookup

    def run_in_project(run: str, p: A.Principal) -> str:
        for j in store.list_jobs(p.project, limit=10000):
            if j["run_id"] and (j["run_id"] == run or j["run_id"].startswith(run)) and \
                    (J.run_dir(ws, j["run_id"]) / "config.yaml").is_file():
                return j["run_id"]
        raise APIError(404, f"no run '{run}' in this project", param="run", code="run_not_found")

    @api.post("/v1/tunelab/jobs")
    async def create_native_job(body: NativeJob, p=need("write")):
        import yaml


        jid = new_id("job")
        recipe = None
        run_id = None
        if body.command:
            if body.recipe is not None:
                raise APIError(422, f"command {body.command} takes a run, not a recipe", param="recipe")
            if not body.run:
                raise APIError(422, f"command {body.command} needs 'run' (a run id of this project)", param="run")
            run = run_in_project(body.run, p)
            command, spec = body.command, {"run": run, "options": body.options, "metadata": body.metadata}
        else:
            if body.recipe is None:
                raise APIError(422, "give 'recipe' (a job recipe as YAML or a mapping), or 'command' eval/export with "
                                    "'run'", param="recipe")
            try:
                raw = yaml.safe_load(body.recipe) if isinstance(body.recipe, str) else body.recipe
            except yaml.YAMLError as e:
                raise APIError(422, f"recipe: not valid YAML: {e}", param="recipe",
                               extra={"problems": [f"not valid YAML: {e}"]}) from None
            if not isinstance(raw, dict):
                raise APIError(422, "recipe: the top level must be a mapping of sections (recipe:, model:, ...)",
                               param="recipe", extra={"problems": ["(top level): must be a mapping"]})
            try:
                raw = cfglib.apply_overrides(resolve_ids(raw, p), body.set)
                name = str(raw.get("recipe") or "")
                command = J.command_for(name) if name else "train"
                J.validate_recipe(raw, "the recipe")
            except ConfigError as e:
                raise APIError(422, str(e), param="recipe", code="invalid_recipe",
                               extra={"problems": [{"loc": pr.split(":", 1)[0], "msg": pr.split(":", 1)[-1].strip()}
                                                   for pr in e.problems]}) from None
            recipe = raw
            if body.dry_run:
                return {"object": "tunelab.job.validation", "valid": True, "command": command, "recipe": name}
            if command == "train":
                run_id = f"{name}-{jid}"
            spec = {"recipe": name, "metadata": body.metadata, "set": body.set, "options": body.options}
        text = J.write_recipe(ws, jid, recipe)
        store.add_job(id=jid, project=p.project, api="native", command=command, spec=spec, recipe_yaml=text,
                      run_id=run_id, created_by=p.key_id)
        store.event(jid, "Job queued")
        return native_job(store.get_job(jid))

    def resolve_ids(raw: dict, p: A.Principal) -> dict:
        return J.resolve_file_ids(raw, file_lookup(p))

    @api.get("/v1/tunelab/jobs")
    async def list_native_jobs(after: Optional[str] = Query(None, max_length=100),
                               limit: int = Query(20, ge=1, le=100), status: Optional[str] = Query(None, max_length=32),
                               p=need("read")):
        rows = store.list_jobs(p.project, limit=limit + 1, after=after, status=status)
        return listing(rows, limit, native_job)

    @api.get("/v1/tunelab/jobs/{job_id}")
    async def retrieve_native_job(job_id: str, p=need("read")):
        return native_job(get_job(job_id, p))

    @api.post("/v1/tunelab/jobs/{job_id}/cancel")
    async def cancel_native_job(job_id: str, p=need("write")):
        return native_job(stop(get_job(job_id, p), "cancel"))

    @api.post("/v1/tunelab/jobs/{job_id}/pause")
    async def pause_native_job(job_id: str, p=need("write")):
        job = get_job(job_id, p)
        if job["command"] != "train":
            raise APIError(400, f"only a training job can be paused; {job_id} runs {job['command']}",
                           code="invalid_state")
        return native_job(stop(job, "pause"))

    @api.post("/v1/tunelab/jobs/{job_id}/resume")
    async def resume_native_job(job_id: str, p=need("write")):
        """A paused job, or a cancelled or failed training job that saved a checkpoint: queued again to continue
        from its newest complete checkpoint (``tunelab train --resume``)."""
        job = get_job(job_id, p)
        ckdir = J.run_dir(ws, job["run_id"]) / "checkpoints" if job["run_id"] else None
        has_ckpt = bool(ckdir and ckdir.is_dir() and any((c / "trainer_state.json").is_file()
                                                          for c in ckdir.glob("checkpoint-*")))
        if not (job["status"] == "paused" or (job["command"] == "train" and job["status"] in ("cancelled", "failed")
                                              and has_ckpt)):
            raise APIError(400, f"{job_id} is {job['status']}: only a paused job, or a cancelled or failed training "
                                "job with a checkpoint, can be resumed", code="invalid_state")
        store.set_job(job_id, status="queued", resume=1, requested=None, finished_at=None, error=None)
        store.event(job_id, "Job resumed; queued to continue from its last checkpoint")
        return native_job(store.get_job(job_id))

    @api.get("/v1/tunelab/jobs/{job_id}/log")
    async def job_log(job_id: str, tail: int = Query(65536, ge=1, le=2 ** 24),
                      offset: Optional[int] = Query(None, ge=0), p=need("read")):
        """The log's last ``tail`` bytes; with ``offset`` (an earlier answer's ``X-Tunelab-Next-Offset``) nothing
        before that byte, so a client following the log reads only what is new. The headers say where the text
        starts (``X-Tunelab-Offset``: later than ``offset`` when more than ``tail`` bytes came since) and where
        the next read starts; an offset past the end answers no text."""
        get_job(job_id, p)
        text, start, end = J.read_log(J.job_dir(ws, job_id) / "log.txt", tail, offset)
        return PlainTextResponse(text, headers={"x-tunelab-offset": str(start), "x-tunelab-next-offset": str(end)})

    @api.get("/v1/tunelab/jobs/{job_id}/metrics")
    async def job_metrics(job_id: str, offset: Optional[int] = Query(None, ge=0), p=need("read")):
        """Every row of the run's metrics.jsonl and ``next_offset``; with ``offset``, only the rows after it."""
        job = get_job(job_id, p)
        path = J.run_dir(ws, job["run_id"]) / "metrics.jsonl" if job["run_id"] else None
        return runs.metrics_answer(path, offset, APIError)

    # ------------------------------------------------------------------ admin

    @api.post("/v1/tunelab/admin/keys")
    async def create_key(body: KeyBody, p=need("admin")):
        try:
            kid, key = A.create_key(store, body.role, body.project, body.name)
        except TunelabError as e:
            raise APIError(400, str(e), param="project") from None
        return {"id": kid, "key": key, "role": body.role, "project": body.project, "name": body.name,
                "note": "the key is shown only now; store it"}

    @api.get("/v1/tunelab/admin/keys")
    async def list_keys(p=need("admin")):
        return {"object": "list", "data": store.list_keys()}

    @api.delete("/v1/tunelab/admin/keys/{key_id}")
    async def revoke_key(key_id: str, p=need("admin")):
        if not store.revoke_key(key_id):
            raise APIError(404, f"no active key '{key_id}'", param="key_id")
        return {"id": key_id, "revoked": True}

    @api.get("/v1/tunelab/admin/audit")
    async def audit(limit: int = Query(100, ge=1, le=10000), before: Optional[int] = Query(None, ge=0),
                    p=need("admin")):
        return {"object": "list", "data": store.audit_log(limit, before)}

    bedrock.routes(api, P, need, APIError)
    datasets.routes(api, P, need, APIError)
    feedback.routes(api, P, need, APIError)
    runs.routes(api, P, need, APIError)
    return Gate(api, P)


# The request being served in this task, seen by the calls made in-process while serving it (the console calls /v1
# through an ASGI transport): its client address, and how many audit rows those calls wrote. A context variable,
# not a header such as X-Forwarded-For: only code in this process can set it, so no HTTP client can claim an
# address in the audit log, and a console action is audited once (by the API call it makes) with the browser's
# address.
_OUTER: "contextvars.ContextVar[Optional[dict]]" = contextvars.ContextVar("tunelab_gate_request", default=None)


class Gate:
    """ASGI layer before the FastAPI app: authentication, upload size and type, inference, audit."""

    def __init__(self, app, platform: Platform):
        self.app, self.platform = app, platform
        self.state = app.state  # tests and servers reach the platform as app.state.platform

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        outer = _OUTER.get()
        # a call made in-process while serving a request (the console's calls to /v1) acts for that request's client
        this = {"client": outer["client"] if outer else (scope.get("client") or ("", 0))[0], "audited": 0}
        token = _OUTER.set(this)
        try:
            await self._http(scope, receive, send, this, outer)
        finally:
            _OUTER.reset(token)

    async def _http(self, scope, receive, send, this: dict, outer: Optional[dict]):
        from starlette.datastructures import Headers

        P = self.platform
        path, method = scope["path"], scope["method"]
        headers = Headers(scope=scope)
        client = this["client"]
        is_bedrock = path.startswith(bedrock.PREFIX)

        async def answer(status: int, message: str, code: Optional[str] = None, type_: str = "invalid_request_error",
                         extra_headers: Optional[dict] = None):
            from fastapi.responses import JSONResponse

            if is_bedrock:
                resp = bedrock.error(status, message)
            else:
                resp = JSONResponse(_err_body(status, message, type_, None, code), status_code=status,
                                    headers=extra_headers)
            await resp(scope, receive, send)

        def audit(principal, status: int, outcome: str):
            try:
                P.store.audit(key_id=principal.key_id if principal else None,
                              role=principal.role if principal else None,
                              project=principal.project if principal else None, action=f"{method} {path}",
                              target=path, status=status, outcome=outcome, client=client)
                if outer is not None:
                    outer["audited"] += 1
            except Exception:
                import logging

                logging.getLogger("tunelab.platform").exception("audit write failed")

        if path in PUBLIC or path in P.public_paths or path.startswith(P.public_prefixes or ("\0",)):
            return await self.app(scope, receive, send)
        key = A.key_from_headers(headers)
        by_cookie = False
        if key is None and headers.get("cookie"):  # a browser session (tunelab.console): the key in a cookie
            from http.cookies import SimpleCookie

            try:
                jar = SimpleCookie(headers.get("cookie"))
            except Exception:
                jar = {}
            if A.SESSION_COOKIE in jar:
                key, by_cookie = jar[A.SESSION_COOKIE].value, True
        principal = await asyncio.to_thread(P.auth.authenticate, key)
        browser_cross_site = (headers.get("sec-fetch-site") or headers.get("origin")) and not A.same_origin(headers)
        if principal is not None and method not in SAFE_METHODS and (
                (by_cookie and not A.same_origin(headers)) or (principal.key_id is None and browser_cross_site)):
            # a cookie rides along with any request the browser sends, and the open server needs no key at all:
            # a change made from a browser must come from this server's own pages
            await asyncio.to_thread(audit, principal, 403, "refused: cross-site request")
            return await answer(403, "cross-site request refused: send the key in the Authorization header",
                                "csrf", "permission_error")
        if principal is None:
            await asyncio.to_thread(audit, None, 401, "refused: missing or wrong API key")
            login = next((url for prefix, url in P.login_redirects.items() if path.startswith(prefix)), None)
            if login and method in SAFE_METHODS:
                from urllib.parse import quote

                from starlette.responses import RedirectResponse

                nxt = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
                return await RedirectResponse(f"{login}?next={quote(nxt, safe='')}", status_code=303)(
                    scope, receive, send)
            return await answer(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key",
                                "authentication_error")
        scope.setdefault("state", {})["principal"] = principal

        if method == "POST" and path in INFERENCE_PATHS:
            if not principal.can("infer"):
                await asyncio.to_thread(audit, principal, 403, "refused: role")
                return await answer(403, f"role '{principal.role}' may not run models", "forbidden", "permission_error")
            body = b""
            more = True
            while more:
                msg = await receive()
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > 4 * 2 ** 20:
                    return await answer(413, "request body over 4 MiB", "request_too_large")
            return await dispatch(scope, receive, send, P.models, principal, body,
                                  lambda s, m, c: answer(s, m, c))

        if method == "POST" and path == "/v1/files":
            ctype = headers.get("content-type", "")
            if not ctype.lower().startswith("multipart/form-data"):
                await asyncio.to_thread(audit, principal, 415, "refused: content type")
                return await answer(415, f"upload files as multipart/form-data (fields 'file' and 'purpose'); got "
                                         f"'{ctype or 'no content type'}'", "unsupported_media_type")
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > P.settings.max_upload_bytes + 64 * 1024:
                await asyncio.to_thread(audit, principal, 413, "refused: too large")
                return await answer(413, f"the upload is over this server's limit of "
                                         f"{P.settings.max_upload_bytes:,} bytes", "file_too_large")

        status_box = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, send_wrapper)
        status = status_box["status"]
        if this["audited"]:
            return  # the in-process API calls this request made (a console action) are its audit rows: one each
        if method not in ("GET", "HEAD", "OPTIONS") or status in (401, 403):
            outcome = "ok" if status < 400 else ("refused" if status in (401, 403) else "error")
            await asyncio.to_thread(audit, principal, status, outcome)
