"""``tunelab server``: the platform API and, in the same process, a worker that runs its jobs."""

from __future__ import annotations

import logging

from tunelab._optional import require
from tunelab.errors import TunelabError
from tunelab.platform.app import create_app
from tunelab.platform.executors import LocalExecutor, RayExecutor
from tunelab.platform.store import Store
from tunelab.platform.worker import Worker
from tunelab.platform.settings import LOOPBACK, PlatformSettings
from tunelab.workspace import Workspace

log = logging.getLogger("tunelab.platform")


def check_bind(settings: PlatformSettings, ws: Workspace) -> None:
    """Listening beyond loopback needs keys: an open server on a network would let anyone train and read data."""
    if settings.host in LOOPBACK:
        return
    if Store(ws.db_path).active_keys() == 0:
        raise TunelabError(
            f"refusing to listen on {settings.host} with no API key configured: anyone who can reach it could "
            f"upload data and run jobs. Create a key first (tunelab admin keys create --role admin -w {ws.root}), "
            "or listen on 127.0.0.1")


def make_executor(settings: PlatformSettings):
    if settings.executor == "ray":
        if not settings.ray_address:
            raise TunelabError("executor ray needs ray_address (the Ray dashboard, e.g. http://HEAD:8265)")
        return RayExecutor(settings.ray_address, settings.ray_num_cpus, settings.ray_num_gpus)
    return LocalExecutor()


def serve(settings: PlatformSettings, ws: Workspace, app_factory=create_app) -> None:
    """Run the API (and the worker) in the foreground until interrupted. ``app_factory``: the platform app, or
    one that adds a front end to it (tunelab.console.create_app)."""
    uvicorn = require("uvicorn", "platform")
    require("fastapi", "platform")
    require("python_multipart", "platform")
    check_bind(settings, ws)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the console's in-process API calls: one line each
    app = app_factory(ws, settings)
    worker = None
    if settings.worker:
        worker = Worker(ws, app.platform.store, make_executor(settings), concurrency=settings.concurrency,
                        lease_s=settings.lease_s, poll_s=settings.poll_s,
                        cancel_grace_s=settings.cancel_grace_s).start()
    mode = "open (no API keys: loopback only)" if app.platform.auth.open_mode() else "API keys required"
    scheme = "https" if settings.tls_certfile else "http"
    log.info("tunelab platform on %s://%s:%d (workspace %s; %s; worker: %s)", scheme, settings.host, settings.port,
             ws.root, mode, f"{settings.executor} x{settings.concurrency}" if worker else "off")
    if app_factory is not create_app:
        log.info("web console: %s://%s:%d/console", scheme, settings.host, settings.port)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                    ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile)
    finally:
        if worker is not None:
            worker.stop(kill=True)
        app.platform.models.close()
