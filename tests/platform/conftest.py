"""Fixtures for the platform: an in-process server (uvicorn in a thread) with its worker, and chat files."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from tests.conftest import ROOT, write_color_data  # noqa: E402

# job subprocesses: one thread each, and the worktree's tunelab (python -m tunelab)
JOB_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_chat_data(path: Path, n: int, seed: int = 0) -> Path:
    """OpenAI chat-format JSONL ({"messages": [...]}) with the color rule of tests/conftest.py."""
    src = write_color_data(path.with_suffix(".alpaca.jsonl"), n, seed)
    with open(path, "w", encoding="utf-8") as f:
        for line in src.read_text().splitlines():
            r = json.loads(line)
            f.write(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                             {"role": "assistant", "content": r["output"]}]}) + "\n")
    src.unlink()
    return path


def recipe_defaults() -> dict:
    """Small runs for the tiny model: short sequences, a small adapter."""
    small = {"data": {"max_length": 64}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return {"sft": small, "dpo": {"data": {"max_length": 64}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "cpt": {"data": {"block_size": 32}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}


class Server:
    def __init__(self, ws_root: Path, worker: bool = True, tls: tuple[str, str] | None = None, app_factory=None,
                 **settings):
        import uvicorn

        from tunelab.platform.app import create_app
        from tunelab.platform.settings import PlatformSettings
        from tunelab.platform.worker import Worker
        from tunelab.workspace import Workspace

        self.ws = Workspace.resolve(ws_root)
        s = {"lease_s": 6.0, "poll_s": 0.2, "cancel_grace_s": 60.0, "recipe_defaults": recipe_defaults(),
             "max_tokens": 64, **settings}
        self.settings = PlatformSettings(**s)
        self.app = (app_factory or create_app)(self.ws, self.settings)
        self.platform = self.app.platform
        self.store = self.platform.store
        self.worker = Worker(self.ws, self.store, concurrency=self.settings.concurrency, lease_s=self.settings.lease_s,
                             poll_s=self.settings.poll_s, cancel_grace_s=self.settings.cancel_grace_s,
                             env=JOB_ENV).start() if worker else None
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        ssl = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
        self.srv = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                 **ssl))
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()
        import httpx2 as httpx

        for _ in range(400):
            try:
                if httpx.get(self.url + "/health", verify=False).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)

    def client(self, key: str | None = "none"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def wait(self, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.store.get_job(job_id)
            if job["status"] in states:
                return job
            time.sleep(0.2)
        log = (self.ws.root / "platform" / "jobs" / job_id / "log.txt")
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s; log:\n"
                             f"{log.read_text()[-3000:] if log.exists() else '(none)'}")

    def close(self) -> None:
        if self.worker:
            self.worker.stop(kill=True)
        self.srv.should_exit = True
        self.thread.join(timeout=10)
        self.platform.models.close()


@pytest.fixture
def make_server(tmp_path):
    made = []

    def make(ws_root: Path | None = None, **kw) -> Server:
        s = Server(ws_root or tmp_path / "ws", **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_chat_data(tmp_path / "train.jsonl", 48, seed=1)
