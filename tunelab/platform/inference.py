"""Chat with base models and finished jobs' models, in the platform's own process.

``/v1/chat/completions`` and ``/v1/completions`` are tunelab.serve's app (its validation, batching,
streaming and errors), one per base model, loaded on the first request that names it. A request
whose ``model`` is a succeeded job's ``fine_tuned_model`` (in the caller's project) has that run's
adapter loaded onto its base under that name (serve's run-time ``Registry.add``), so the model is
usable the moment the job succeeds, without a restart. A full-model run is served as its own base.
Any other succeeded training job of the project (a native recipe, a Bedrock job) is served the same way
under its run id, on the base recorded in the run's lineage.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.models.resolve import PACKAGED, resolve
from tunelab.platform.jobs import run_dir
from tunelab.serve.adapters import Registry
from tunelab.models.engine import Engine
from tunelab.serve.openai_api import Limits, create_app
from tunelab.platform.auth import Principal
from tunelab.platform.store import Store
from tunelab.workspace import Workspace

PATHS = ("/v1/chat/completions", "/v1/completions")


class NotServed(Exception):
    pass


@dataclass
class _Base:
    app: object
    registry: object
    engine: object


class Models:
    """Serving engines by base model folder; adapters of finished jobs added on demand."""

    def __init__(self, ws: Workspace, store: Store, *, max_batch_size: int = 8, max_tokens: int = 512,
                 threads: int | None = None):
        self.ws, self.store = ws, store
        self.max_batch_size, self.max_tokens, self.threads = max_batch_size, max_tokens, threads
        self.bases: dict[str, _Base] = {}
        self._lock = threading.Lock()

    def available(self, project: str) -> list[dict]:
        """Model cards: packaged and pulled bases, and this project's succeeded jobs' models."""
        cards = [{"id": n, "object": "model", "created": 0, "owned_by": "tunelab", "kind": "base"}
                 for n in sorted(PACKAGED)]
        for j in self.store.list_jobs(project, status="succeeded", limit=1000):
            if j["fine_tuned_model"]:
                cards.append({"id": j["fine_tuned_model"], "object": "model", "created": int(j["finished_at"] or 0),
                              "owned_by": project, "kind": "fine-tuned", "job_id": j["id"], "run_id": j["run_id"],
                              "base": j["spec"].get("model")})
            elif j["command"] == "train" and j["run_id"] and self._weights(j["run_id"]) is not None:
                cards.append({"id": j["run_id"], "object": "model", "created": int(j["finished_at"] or 0),
                              "owned_by": project, "kind": "fine-tuned", "job_id": j["id"], "run_id": j["run_id"],
                              "base": self._run_base(j["run_id"])})
        return cards

    def _weights(self, run_id: str) -> Path | None:
        """A run's trained weights: its adapter folder or its full model folder (None before it has any)."""
        d = run_dir(self.ws, run_id)
        if (d / "adapter" / "adapter_config.json").is_file():
            return d / "adapter"
        if (d / "model" / "config.json").is_file():
            return d / "model"
        return None

    def _run_base(self, run_id: str) -> str | None:
        """The base model name the run's recipe named (what a client calls the base), from its lineage."""
        try:
            lin = json.loads((run_dir(self.ws, run_id) / "lineage.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return lin.get("base_model") or lin.get("base_model_path")

    def _run_job(self, model: str, project: str) -> dict | None:
        """The project's succeeded training job whose run is ``model`` (a run served under its id)."""
        for j in self.store.list_jobs(project, limit=100000):
            if j["run_id"] == model and j["command"] == "train" and not j["fine_tuned_model"]:
                return j
        return None

    def app_for(self, principal: Principal, model: str):
        """The serve app answering ``model`` for this caller (loading it if needed), or NotServed."""
        job = self.store.job_by_model(model, principal.project)
        if job is not None:
            if job["status"] != "succeeded":
                raise NotServed(f"model '{model}' is not ready: its job is {job['status']}")
            out = Path((job["result"] or {}).get("output") or run_dir(self.ws, job["run_id"]) / "adapter")
            if (out / "adapter_config.json").is_file():
                base = self._base(job["spec"]["model"])
                with self._lock:
                    if model not in base.registry.models:
                        base.registry.add(model, out, job["run_id"])
                return base.app
            return self._base(str(out), name=model).app  # a full model: its own base
        job = self._run_job(model, principal.project)
        if job is not None:
            if job["status"] != "succeeded":
                raise NotServed(f"model '{model}' is not ready: its job is {job['status']}")
            out = self._weights(model)
            if out is None:
                raise NotServed(f"run '{model}' has no trained weights to serve")
            if out.name == "model":
                return self._base(str(out), name=model).app
            lin = json.loads((run_dir(self.ws, model) / "lineage.json").read_text(encoding="utf-8"))
            base = self._base(lin.get("base_model_path") or lin["base_model"])
            with self._lock:
                if model not in base.registry.models:
                    base.registry.add(model, out, model)
            return base.app
        # a base model: a packaged one, one in the server's model cache, or the base of one of this project's
        # jobs; never any folder or hub id a caller names (that would load arbitrary models into memory)
        jobs = self.store.list_jobs(principal.project, limit=100000)
        known = model.lower() in PACKAGED or (self.ws.models_dir / model / "config.json").is_file() or any(
            j["spec"].get("model") == model for j in jobs) or any(
            j["command"] == "train" and j["run_id"] and self._run_base(j["run_id"]) == model for j in jobs)
        if not known:
            raise NotServed(f"model '{model}' is not served here; see GET /v1/models")
        return self._base(model).app

    def _base(self, ref: str, name: str | None = None) -> _Base:
        try:
            path = resolve(ref, self.ws, pull_packaged=True)
        except TunelabError as e:
            raise NotServed(f"model '{name or ref}' is not available here: {e}") from None
        key = str(path)
        with self._lock:
            if key not in self.bases:
                self.bases[key] = self._load(path, name or ref)
            b = self.bases[key]
            if (name or ref) not in b.registry.models:  # the same folder asked for under another name
                b.registry.models[name or ref] = b.registry.models[b.registry.base_name]
            return b

    def _load(self, path: Path, name: str) -> _Base:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        registry = Registry(path, name, device="cuda" if torch.cuda.is_available() else "cpu")
        ctx = getattr(registry.model.config, "max_position_embeddings", None)
        engine = Engine(registry.model, registry.eos_ids(), max_batch_size=self.max_batch_size,
                        max_positions=ctx, lock=registry.lock)
        registry.engine = engine
        app = create_app(registry, engine, Limits(max_tokens=self.max_tokens,
                                                  default_max_tokens=min(256, self.max_tokens)))
        engine.start()
        return _Base(app, registry, engine)

    def close(self) -> None:
        for b in self.bases.values():
            b.engine.close()


async def dispatch(scope, receive, send, models: Models, principal: Principal, body: bytes, error) -> None:
    """Hand an inference request to the serve app for its model (``error(status, message, code)`` answers)."""
    import asyncio

    try:
        model = json.loads(body or b"{}").get("model")
    except (ValueError, AttributeError):
        model = None
    if not isinstance(model, str) or not model:
        return await error(400, "malformed request: model: field required", None)
    try:
        app = await asyncio.to_thread(models.app_for, principal, model)
    except NotServed as e:
        return await error(404, str(e), "model_not_found")
    except TunelabError as e:
        return await error(400, str(e), None)
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect, which serve watches for

    await app(scope, replay, send)
