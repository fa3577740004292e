"""The worker: take jobs from the catalog by lease, run each as a CLI process, renew, stop, finish.

A lease is ``lease_owner`` + ``lease_until`` on the job row. The worker renews it (its heartbeat)
every third of its length while the process runs; a worker that dies stops renewing, the lease
runs out, and the next worker to poll takes the job over and continues its run from the newest
checkpoint (``tunelab train --resume RUN_ID``). A worker that finds it lost a lease (it was
stalled longer than the lease) stops its process, so a job never runs twice at once.

Cancel and pause are cooperative: the worker writes the run's ``CANCEL`` file; the training loop
sees it at the end of the step, saves a checkpoint and ends the run ``cancelled`` (a held-out
evaluation before or after training sees it between batches). A process that has not stopped
``cancel_grace_s`` later gets SIGTERM. Jobs without a training loop (data, eval,
export) are stopped with SIGTERM at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.platform import jobs as J
from tunelab.platform.datasets import register
from tunelab.platform.executors import Executor, Handle, LocalExecutor
from tunelab.platform.store import Store
from tunelab.workspace import CANCEL_FILE, Workspace  # CANCEL_FILE: the run lifecycle's cooperative stop

log = logging.getLogger("tunelab.platform")


@dataclass
class _Active:
    job: dict
    handle: Handle
    last_beat: float
    stop_sent: float | None = None
    term_sent: float | None = None
    extra: dict = field(default_factory=dict)


class Worker:
    def __init__(self, ws: Workspace, store: Store, executor: Executor | None = None, *, concurrency: int = 1,
                 lease_s: float = 30.0, poll_s: float = 0.5, cancel_grace_s: float = 120.0,
                 env: dict[str, str] | None = None, owner: str | None = None):
        self.ws, self.store = ws, store
        self.executor = executor or LocalExecutor()
        self.concurrency, self.lease_s, self.poll_s = concurrency, lease_s, poll_s
        self.cancel_grace_s = cancel_grace_s
        self.env = env or {}
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.active: dict[str, _Active] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ loop

    def start(self) -> "Worker":
        self._thread = threading.Thread(target=self._loop, name="tunelab-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, kill: bool = True) -> None:
        """Stop polling and stop the running processes (their jobs are taken over after the lease). Local job
        processes end with the worker's thread in any case (executors.LocalExecutor); ``kill`` also stops
        processes of other executors (Ray jobs)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        if kill:
            for a in list(self.active.values()):
                a.handle.kill()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad job or a locked database must not end the worker
                log.exception("worker tick failed")
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        for job_id in list(self.active):
            self._check(self.active[job_id])
        while len(self.active) < self.concurrency and not self._stop.is_set():
            job = self.store.claim(self.owner, self.lease_s)
            if job is None:
                break
            self._launch(job)

    # ------------------------------------------------------------------ one job

    def _launch(self, job: dict) -> None:
        d = J.job_dir(self.ws, job["id"])
        d.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        if job["run_id"]:
            env["TUNELAB_RUN_ID"] = job["run_id"]  # the run folder is known before the process starts
        try:
            argv = J.argv_for(job, self.ws)
            with open(d / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"=== attempt {job['attempts']} on {self.owner} ({self.executor.name}): tunelab "
                        f"{' '.join(argv)}\n")
            handle = self.executor.start(job["id"], argv, env, d / "log.txt")
        except Exception as e:
            self.store.event(job["id"], f"could not start the job: {e}", "error")
            self.store.set_job(job["id"], owner=self.owner, status="failed", finished_at=time.time(),
                               lease_owner=None, lease_until=None,
                               error={"code": "start_failed", "message": str(e), "param": None})
            return
        resumed = "--resume" in argv
        self.store.event(job["id"], f"Job {'resumed from its last checkpoint' if resumed else 'started'} "
                                    f"(attempt {job['attempts']})")
        self.active[job["id"]] = _Active(job, handle, time.time())

    def _check(self, a: _Active) -> None:
        job_id = a.job["id"]
        rc = a.handle.poll()
        now = time.time()
        if rc is None and now - a.last_beat >= self.lease_s / 3:
            a.last_beat = now
            if self.store.heartbeat(job_id, self.owner, self.lease_s) is None:
                log.warning("job %s: lease lost to another worker; stopping its process here", job_id)
                a.handle.kill()
                del self.active[job_id]
                return
        fresh = self.store.get_job(job_id) or a.job
        wanted = fresh.get("requested")
        if rc is None and wanted and a.stop_sent is None:
            a.stop_sent = now
            run_dir = J.run_dir(self.ws, a.job["run_id"]) if a.job["run_id"] else None
            if a.job["command"] == "train" and run_dir is not None and run_dir.is_dir():
                (run_dir / CANCEL_FILE).write_text(wanted, encoding="utf-8")
                self.store.event(job_id, f"{wanted}: CANCEL written to the run folder; it stops after this step")
            else:
                a.handle.terminate()
                a.term_sent = now
        if rc is None and a.stop_sent is not None:
            if a.term_sent is None and now - a.stop_sent > self.cancel_grace_s:
                a.handle.terminate()
                a.term_sent = now
            elif a.term_sent is not None and now - a.term_sent > 30:
                a.handle.kill()
        if rc is not None:
            del self.active[job_id]
            self._finish(fresh, rc)

    def _finish(self, job: dict, rc: int) -> None:
        wanted = job.get("requested")
        run = self.ws.catalog().get_run(job["run_id"]) if job["run_id"] else None
        run_status = (run or {}).get("status")
        fields: dict = {"finished_at": time.time(), "lease_owner": None, "lease_until": None, "requested": None}
        if rc == 0 and run_status not in ("cancelled", "interrupted"):
            status, msg = "succeeded", "The job has successfully completed"
            fields["result"] = self._result(job)
        elif wanted == "pause":
            status, msg = "paused", "Job paused; resume continues from its last checkpoint"
            fields.update(resume=1, finished_at=None)
        elif wanted == "cancel":
            status, msg = "cancelled", "Job cancelled"
        else:
            status = "failed"
            message = _error_line(J.job_dir(self.ws, job["id"]) / "log.txt") or (run or {}).get("error") \
                or f"the job's process ended with exit code {rc}; see its log"
            fields["error"] = {"code": "job_failed", "message": message, "param": None}
            msg = f"Job failed: {message}"
        fields["status"] = status
        if self.store.set_job(job["id"], owner=self.owner, **fields):
            self.store.event(job["id"], msg, "error" if status == "failed" else "info")
        if status == "succeeded" and job["command"] == "data_prepare" and (fields.get("result") or {}).get("dataset_id"):
            try:  # the version becomes one of the project's datasets (GET /v1/tunelab/datasets)
                register(self.ws, self.store, job["project"], fields["result"]["dataset_id"], "job", job["id"])
            except Exception as e:  # noqa: BLE001 - the job did succeed; say why its dataset is not listed
                self.store.event(job["id"], f"the dataset could not be registered in the project: {e}", "warning")
        if status == "succeeded" and job["spec"].get("output_dir"):
            self._copy_output(job, fields.get("result") or {})
        if status in ("cancelled", "succeeded") and job["run_id"]:
            (J.run_dir(self.ws, job["run_id"]) / CANCEL_FILE).unlink(missing_ok=True)

    def _copy_output(self, job: dict, result: dict) -> None:
        """Bedrock's outputDataConfig: the trained adapter/model and summary.json, copied to the asked folder."""
        import shutil

        out = Path(job["spec"]["output_dir"])
        try:
            out.mkdir(parents=True, exist_ok=True)
            src = Path(result.get("output") or "")
            if src.is_dir():
                shutil.copytree(src, out / src.name, dirs_exist_ok=True)
            (out / "summary.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
            self.store.event(job["id"], f"Output written to {out}")
        except OSError as e:
            self.store.event(job["id"], f"could not write the output to {out}: {e}", "warning")

    def _result(self, job: dict) -> dict | None:
        if job["command"] == "data_prepare":  # the manifest `data prepare --result-json` wrote
            p = J.job_dir(self.ws, job["id"]) / "result.json"
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        if job["run_id"]:
            p = J.run_dir(self.ws, job["run_id"]) / "summary.json"
            if p.is_file():
                return json.loads(p.read_text(encoding="utf-8"))
        return None


def _error_line(log_path: Path, tail: int = 64 * 1024) -> str | None:
    """The CLI's one-line error ("error: ...") from the end of a job's log, or the last traceback line."""
    if not log_path.is_file():
        return None
    with open(log_path, "rb") as f:
        f.seek(max(0, log_path.stat().st_size - tail))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            return "\n".join([lines[i][7:], *[x.strip() for x in lines[i + 1:] if x.startswith("  ")]])[:2000]
    for line in reversed(lines):
        if line.strip() and not line.startswith("==="):
            return line.strip()[:2000]
    return None
