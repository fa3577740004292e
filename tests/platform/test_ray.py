"""Executor ray: jobs go to a Ray cluster through the Ray Jobs API; the catalog stays the source of truth.

The test starts its own local head (2 CPUs) and stops only the processes it started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import write_color_data
from tests.platform.conftest import JOB_ENV, free_port

pytest.importorskip("ray.job_submission")


@pytest.fixture
def ray_head():
    tmp = tempfile.mkdtemp(prefix="tlray")  # short: Ray's socket paths must fit in 107 characters
    dash = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard",
                             "true", "--temp-dir", tmp, "--disable-usage-stats"],
                            env={**os.environ, **JOB_ENV}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.skip("the local Ray head did not start")
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_jobs_run_on_ray_and_the_catalog_records_them(ray_head, tmp_path):
    import httpx2 as httpx

    from tests.platform.conftest import Server
    from tunelab.platform.executors import RayExecutor
    from tunelab.platform.worker import Worker

    srv = Server(tmp_path / "ws", worker=False)
    try:
        srv.worker = Worker(srv.ws, srv.store, RayExecutor(ray_head, num_cpus=1), poll_s=0.5, lease_s=30,
                            env=JOB_ENV).start()
        raw = write_color_data(tmp_path / "raw.jsonl", 30)
        ok = httpx.post(srv.url + "/v1/tunelab/jobs", json={"recipe": {
            "recipe": "data", "name": "colors", "inputs": [{"path": str(raw)}], "profile": None, "workers": 0}}).json()
        bad = httpx.post(srv.url + "/v1/tunelab/jobs", json={"recipe": {
            "recipe": "data", "name": "gone", "inputs": [{"path": str(tmp_path / "gone.jsonl")}],
            "profile": None}}).json()
        job = srv.wait(ok["id"], timeout=240)
        assert job["status"] == "succeeded", job["error"]
        assert list(srv.ws.root.glob("datasets/*/manifest.json"))  # the Ray job wrote into the shared workspace
        log = (srv.ws.root / "platform" / "jobs" / ok["id"] / "log.txt").read_text()
        assert "(ray)" in log and "kept" in log  # the job's own output, fetched from Ray
        failed = srv.wait(bad["id"], timeout=240)
        assert failed["status"] == "failed" and "gone.jsonl" in failed["error"]["message"]
        from ray.job_submission import JobSubmissionClient

        subs = {j.submission_id for j in JobSubmissionClient(ray_head).list_jobs()}
        assert any(s.startswith(ok["id"]) for s in subs) and any(s.startswith(bad["id"]) for s in subs)
    finally:
        srv.close()
