"""A Bedrock model-customization facade: boto3's ``bedrock`` client works against tunelab.

    client = boto3.client("bedrock", endpoint_url="http://127.0.0.1:8000", region_name="us-east-1")
    # auth: AWS_BEARER_TOKEN_BEDROCK=<a tunelab API key> (sent as Authorization: Bearer)

| Bedrock | tunelab |
|---|---|
| CreateModelCustomizationJob, customizationType FINE_TUNING | sft recipe (LoRA) |
| CONTINUED_PRE_TRAINING | cpt recipe |
| DISTILLATION (customizationConfig.distillationConfig.teacherModelConfig) | distill recipe |
| baseModelIdentifier | model.name (packaged name, folder on the server, hub id) |
| trainingDataConfig.s3Uri, validationDataConfig.validators[0].s3Uri | data files: ``file:///abs/path`` or a path on the server |
| outputDataConfig.s3Uri | a folder on the server; the trained adapter/model and summary.json are copied there |
| hyperParameters epochCount, batchSize, learningRate, learningRateWarmupSteps (strings) | train.epochs, batch_size, learning_rate, warmup |
| status InProgress / Completed / Failed / Stopping / Stopped | job queued or running / succeeded / failed / cancel requested / cancelled |
| trainingMetrics.trainingLoss, validationMetrics[].validationLoss | final_train_loss, best_eval_loss |
| GetModelCustomizationJob, ListModelCustomizationJobs, StopModelCustomizationJob | the job row, the job list, cancel |

Errors use Bedrock's shape (``x-amzn-ErrorType`` header, ``{"message"}``), so boto3 raises its usual
``ValidationException``, ``ResourceNotFoundException``, ``AccessDeniedException``.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at definition time.
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import ConfigError, TunelabError
from tunelab.platform import jobs as J
from tunelab.platform.jobs import deep_merge
from tunelab.platform.store import TERMINAL, new_id

PREFIX = "/model-customization-jobs"
ARN = "arn:aws:bedrock:local:000000000000:model-customization-job/{}"
MODEL_ARN = "arn:aws:bedrock:local:000000000000:custom-model/{}"
TYPES = {"FINE_TUNING": "sft", "CONTINUED_PRE_TRAINING": "cpt", "DISTILLATION": "distill"}
HYPER = {"epochCount": ("epochs", float), "batchSize": ("batch_size", int), "learningRate": ("learning_rate", float),
         "learningRateWarmupSteps": ("warmup_steps", int), "maxSteps": ("max_steps", int)}
ERRORS = {400: "ValidationException", 401: "AccessDeniedException", 403: "AccessDeniedException",
          404: "ResourceNotFoundException", 409: "ConflictException", 413: "ValidationException",
          415: "ValidationException", 422: "ValidationException", 429: "ThrottlingException"}


def error(status: int, message: str):
    from fastapi.responses import JSONResponse

    kind = ERRORS.get(status, "InternalServerException")
    return JSONResponse({"message": message}, status_code=status if status < 500 else 500,
                        headers={"x-amzn-ErrorType": kind})


class _B(BaseModel):
    model_config = ConfigDict(extra="forbid")


class S3(_B):
    s3Uri: str = Field(min_length=1, max_length=1024)


class Validation(_B):
    validators: list[S3] = Field(min_length=1, max_length=1)


class Teacher(_B):
    teacherModelIdentifier: str = Field(min_length=1, max_length=500)
    maxResponseLengthForInference: Optional[int] = Field(None, ge=1)


class Distillation(_B):
    teacherModelConfig: Teacher


class Customization(_B):
    distillationConfig: Distillation


class CreateBody(_B):
    jobName: str = Field(min_length=1, max_length=63, pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9\+\-\.])*$")
    customModelName: str = Field(min_length=1, max_length=63)
    roleArn: str = Field(max_length=2048)
    clientRequestToken: Optional[str] = Field(None, max_length=256)
    baseModelIdentifier: str = Field(min_length=1, max_length=2048)
    customizationType: Literal["FINE_TUNING", "CONTINUED_PRE_TRAINING", "DISTILLATION"] = "FINE_TUNING"
    customModelKmsKeyId: Optional[str] = None
    jobTags: Optional[list[dict[str, str]]] = None
    customModelTags: Optional[list[dict[str, str]]] = None
    trainingDataConfig: S3
    validationDataConfig: Optional[Validation] = None
    outputDataConfig: S3
    hyperParameters: dict[str, str] = Field(default_factory=dict, max_length=20)
    vpcConfig: Optional[dict[str, Any]] = None
    customizationConfig: Optional[Customization] = None


def local_path(uri: str, param: str, must_exist: bool = True) -> str:
    """``file:///abs/path`` or a plain absolute path → the path; s3:// is refused with the reason."""
    u = urlparse(uri)
    if u.scheme == "file":
        p = Path(unquote(u.path))
    elif u.scheme == "":
        p = Path(uri)
    else:
        raise TunelabError(f"{param}: '{u.scheme}://' is not reachable from this server; use file:///absolute/path")
    if not p.is_absolute():
        raise TunelabError(f"{param}: give an absolute path (file:///absolute/path)")
    if must_exist and not p.exists():
        raise TunelabError(f"{param}: {p} does not exist on the server")
    return str(p)


def recipe_for(body: CreateBody, defaults: dict) -> dict:
    kind = TYPES[body.customizationType]
    train_path = local_path(body.trainingDataConfig.s3Uri, "trainingDataConfig.s3Uri")
    val_path = local_path(body.validationDataConfig.validators[0].s3Uri, "validationDataConfig.validators[0].s3Uri") \
        if body.validationDataConfig else None
    train: dict[str, Any] = {"early_stopping_patience": None}
    warmup = None
    for k, v in body.hyperParameters.items():
        if k not in HYPER:
            raise TunelabError(f"hyperParameters.{k}: unknown; known: {', '.join(HYPER)}")
        field, cast = HYPER[k]
        try:
            val = cast(v)
        except ValueError:
            raise TunelabError(f"hyperParameters.{k}: '{v}' is not a {cast.__name__}") from None
        if field == "warmup_steps":
            warmup = val
        else:
            train[field] = val
    name = body.customModelName
    if kind == "sft":
        data = {"train": train_path, **({"validation": val_path} if val_path else {})}
        recipe = {"recipe": "sft", "name": name, "model": {"name": body.baseModelIdentifier}, "data": data}
    elif kind == "cpt":
        recipe = {"recipe": "cpt", "name": name, "model": {"name": body.baseModelIdentifier},
                  "data": {"files": [train_path]}}
    else:
        if body.customizationConfig is None:
            raise TunelabError("customizationConfig.distillationConfig.teacherModelConfig is required for "
                               "DISTILLATION")
        teacher = body.customizationConfig.distillationConfig.teacherModelConfig
        # distillation reports the student's held-out quality: without a validation file, hold out a tenth
        data = {"train": train_path, **({"validation": val_path} if val_path else {"validation_split": 0.1})}
        recipe = {"recipe": "distill", "name": name, "teacher": {"name": teacher.teacherModelIdentifier},
                  "student": {"name": body.baseModelIdentifier}, "data": data}
    if warmup is not None:  # Bedrock counts warmup in steps; tunelab as a share of the run's steps
        steps = train.get("max_steps")
        if not steps:
            raise TunelabError("hyperParameters.learningRateWarmupSteps needs maxSteps here (tunelab's warmup is a "
                               "share of the steps)")
        train["warmup_ratio"] = min(0.99, warmup / steps)
    recipe["train"] = train
    return deep_merge(defaults.get(kind, {}), recipe)


def _iso(t: Optional[float]) -> Optional[str]:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z") if t else None


STATUS = {"validating_files": "InProgress", "queued": "InProgress", "running": "InProgress", "paused": "Stopping",
          "succeeded": "Completed", "failed": "Failed", "cancelled": "Stopped"}


def status_of(job: dict) -> str:
    if job["status"] == "running" and job.get("requested") == "cancel":
        return "Stopping"
    return STATUS.get(job["status"], "InProgress")


def details(job: dict) -> dict:
    s = status_of(job)
    created, updated = _iso(job["created_at"]), _iso(job["updated_at"])
    training = {"queued": "InProgress", "validating_files": "InProgress"}.get(job["status"], s)
    return {"validationDetails": {"status": "Completed" if job["status"] != "validating_files" else "InProgress",
                                  "creationTime": created, "lastModifiedTime": updated},
            "dataProcessingDetails": {"status": "Completed" if job["status"] not in ("queued", "validating_files")
                                      else "InProgress", "creationTime": created, "lastModifiedTime": updated},
            "trainingDetails": {"status": training, "creationTime": created, "lastModifiedTime": updated}}


def view(job: dict, full: bool = True) -> dict:
    s = job["spec"]
    res = job["result"] or {}
    out = {"jobArn": ARN.format(job["id"]), "jobName": s["jobName"], "status": status_of(job),
           "statusDetails": details(job), "creationTime": _iso(job["created_at"]),
           "lastModifiedTime": _iso(job["updated_at"]), "baseModelArn": s["baseModelIdentifier"],
           "customizationType": s["customizationType"]}
    if job["finished_at"]:
        out["endTime"] = _iso(job["finished_at"])
    if job["status"] == "succeeded":
        out["outputModelArn" if full else "customModelArn"] = MODEL_ARN.format(job["id"])
    out["outputModelName" if full else "customModelName"] = s["customModelName"]
    if not full:
        return out
    out.update({"roleArn": s["roleArn"], "hyperParameters": s["hyperParameters"],
                "trainingDataConfig": s["trainingDataConfig"], "outputDataConfig": s["outputDataConfig"],
                "validationDataConfig": s.get("validationDataConfig") or {"validators": []}})
    if s.get("clientRequestToken"):
        out["clientRequestToken"] = s["clientRequestToken"]
    if job["error"]:
        out["failureMessage"] = job["error"]["message"]
    if res.get("final_train_loss") is not None:
        out["trainingMetrics"] = {"trainingLoss": res["final_train_loss"]}
    if res.get("best_eval_loss") is not None:
        out["validationMetrics"] = [{"validationLoss": res["best_eval_loss"]}]
    return out


def routes(api, P, need, APIError) -> None:
    from fastapi import Query


    store, ws = P.store, P.ws

    def find(ident: str, project: str) -> dict:
        ident = unquote(ident)
        jid = ident.rsplit("/", 1)[-1]
        job = store.get_job(jid, project)
        if job is None:  # a job name
            for j in store.list_jobs(project, api="bedrock", limit=100000):
                if j["spec"].get("jobName") == ident:
                    return j
        if job is None or job["api"] != "bedrock":
            raise APIError(404, f"model customization job '{ident}' not found")
        return job

    @api.post(PREFIX, status_code=201)
    async def create(body: CreateBody, p=need("write")):
        existing = [j for j in store.list_jobs(p.project, api="bedrock", limit=100000)]
        if body.clientRequestToken:
            for j in existing:
                if j["spec"].get("clientRequestToken") == body.clientRequestToken:
                    return {"jobArn": ARN.format(j["id"])}  # an idempotent retry
        if any(j["spec"].get("jobName") == body.jobName for j in existing):
            raise APIError(409, f"a job named '{body.jobName}' already exists")
        try:
            recipe = recipe_for(body, P.settings.recipe_defaults)
            out_dir = local_path(body.outputDataConfig.s3Uri, "outputDataConfig.s3Uri", must_exist=False)
            J.validate_recipe(recipe, "the job's recipe")
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        except TunelabError as e:
            raise APIError(400, str(e)) from None
        jid = new_id("bdjob")
        spec = {**body.model_dump(exclude_none=True), "output_dir": out_dir}
        text = J.write_recipe(ws, jid, recipe)
        store.add_job(id=jid, project=p.project, api="bedrock", command="train", spec=spec, recipe_yaml=text,
                      run_id=f"{recipe['recipe']}-{jid}", created_by=p.key_id)
        store.event(jid, "Job queued")
        return {"jobArn": ARN.format(jid)}

    @api.get(PREFIX)
    async def list_jobs(statusEquals: Optional[str] = Query(None, max_length=20),
                        nameContains: Optional[str] = Query(None, max_length=63),
                        maxResults: int = Query(100, ge=1, le=100), nextToken: Optional[str] = Query(None, max_length=100),
                        sortOrder: Literal["Ascending", "Descending"] = "Descending",
                        sortBy: Optional[Literal["CreationTime"]] = None,
                        creationTimeAfter: Optional[str] = Query(None, max_length=40),
                        creationTimeBefore: Optional[str] = Query(None, max_length=40), p=need("read")):
        rows = store.list_jobs(p.project, api="bedrock", limit=100000)
        if sortOrder == "Ascending":
            rows.reverse()
        rows = [j for j in rows if (not statusEquals or status_of(j) == statusEquals)
                and (not nameContains or nameContains in j["spec"]["jobName"])]
        start = 0
        if nextToken:
            ids = [j["id"] for j in rows]
            start = ids.index(nextToken) if nextToken in ids else len(rows)
        chunk = rows[start:start + maxResults]
        out = {"modelCustomizationJobSummaries": [view(j, full=False) for j in chunk]}
        if start + maxResults < len(rows):
            out["nextToken"] = rows[start + maxResults]["id"]
        return out

    @api.get(PREFIX + "/{job_identifier:path}")
    async def get(job_identifier: str, p=need("read")):
        return view(find(job_identifier, p.project))

    @api.post(PREFIX + "/{job_identifier:path}/stop")
    async def stop(job_identifier: str, p=need("write")):
        job = find(job_identifier, p.project)
        if job["status"] in TERMINAL:
            raise APIError(400, f"the job is {status_of(job)}; only a job in progress can be stopped")
        if job["status"] in ("queued", "validating_files", "paused"):
            store.set_job(job["id"], status="cancelled", finished_at=time.time())
            store.event(job["id"], "Job stopped")
        else:
            store.request(job["id"], "cancel")
            store.event(job["id"], "Stop requested")
        return {}
