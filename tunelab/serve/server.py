"""``tunelab serve``: resolve what to serve, load it once, and run the API under uvicorn.

    tunelab serve --demo                       # the newest `tunelab demo` run's adapter on SmolLM2
    tunelab serve RUN_ID --adapter other=RUN2  # a run's adapter, plus more adapters on the same base
    tunelab serve smollm2-135m-instruct        # a packaged model, a model folder, or a full-model run
    tunelab serve MODEL --rag RUN/rag-index    # retrieval per chat request, sources in the response

Clients use the OpenAI API at http://HOST:PORT/v1 with ``model`` set to a name from /v1/models.
"""

from __future__ import annotations

import logging
from typing import Optional

from tunelab._optional import require
from tunelab.config import Strict
from tunelab.data import retrieval
from tunelab.errors import TunelabError
from tunelab.serve.adapters import Registry, newest_demo_run, resolve_target
from tunelab.models.engine import Engine
from tunelab.serve.openai_api import Limits, create_app
from tunelab.workspace import Workspace

log = logging.getLogger("tunelab.serve")


class ServeConfig(Strict):
    model: Optional[str] = None  # run id/prefix/folder, model folder, or packaged name
    demo: bool = False  # serve the newest demo run
    name: Optional[str] = None  # the name clients use for `model` (default: run id or model name)
    adapters: list[str] = []  # more adapters on the same base: NAME=RUN_OR_FOLDER, or RUN
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = []
    max_batch_size: int = 8
    prefill_batch: int = 1  # new requests prefilled in one forward (1: each alone, measured faster on CPU)
    max_queue: int = 64
    max_tokens: int = 512
    default_max_tokens: int = 256
    max_prompt_tokens: int = 2048
    threads: Optional[int] = None  # torch CPU threads (default: torch's)
    device: Optional[str] = None  # cpu | cuda (default: cuda when available)
    rag: Optional[str] = None  # a retrieval index folder (the ladder's <run>/rag-index): passages in every chat prompt


def build(cfg: ServeConfig, ws: Workspace):
    """Load the base model and adapters and start the batching engine; returns (app, registry, engine)."""
    if cfg.demo == bool(cfg.model):
        raise TunelabError("give what to serve: a run id, a model folder or a packaged model name, or --demo")
    target = resolve_target(newest_demo_run(ws) if cfg.demo else cfg.model, ws, cfg.name)
    require("fastapi", "serve")
    index = retrieval.load(cfg.rag) if cfg.rag else None  # a wrong folder fails before the model loads
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    registry = Registry(target.base_path, target.base_name, device=device)
    if target.adapter is not None:
        registry.add(target.name, target.adapter, target.run_id)
    for spec in cfg.adapters:
        name, ref = spec.split("=", 1) if "=" in spec else (None, spec)
        extra = resolve_target(ref, ws, name)
        if extra.adapter is None:
            raise TunelabError(f"--adapter {spec}: '{ref}' is not a run with an adapter")
        if extra.base_path.resolve() != target.base_path.resolve():
            raise TunelabError(f"--adapter {spec}: its base ({extra.base_path}) is not the served base "
                               f"({target.base_path})")
        registry.add(extra.name, extra.adapter, extra.run_id)
    ctx = getattr(registry.model.config, "max_position_embeddings", None)
    engine = Engine(registry.model, registry.eos_ids(), max_batch_size=cfg.max_batch_size,
                    max_queue=cfg.max_queue, max_positions=ctx, lock=registry.lock, prefill_batch=cfg.prefill_batch)
    registry.engine = engine
    limits = Limits(max_tokens=cfg.max_tokens, default_max_tokens=min(cfg.default_max_tokens, cfg.max_tokens),
                    max_prompt_tokens=cfg.max_prompt_tokens, api_keys=cfg.api_keys)
    app = create_app(registry, engine, limits, rag=index)
    engine.start()
    return app, registry, engine


def serve(cfg: ServeConfig, ws: Workspace) -> None:
    """Run the server in the foreground until interrupted."""
    uvicorn = require("uvicorn", "serve")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app, registry, engine = build(cfg, ws)
    auth = f", {len(cfg.api_keys)} API key(s)" if cfg.api_keys else ", no API key"
    rag = f", RAG over {cfg.rag}" if cfg.rag else ""
    log.info("serving %s on http://%s:%d/v1 (batch %d, queue %d%s%s)", ", ".join(registry.models), cfg.host,
             cfg.port, cfg.max_batch_size, cfg.max_queue, auth, rag)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.close()

