"""Where a job's process runs: an interface and two executors.

An executor starts ``python -m tunelab ARGS`` (the real CLI, so a job runs exactly what a user
would run at a terminal) and hands back a handle the worker polls and stops. The worker owns
the queue, leases and states; an executor only runs processes. Another back end (Slurm through
submitit, Kubernetes Jobs) is one more class with ``start`` returning a :class:`Handle`.

- :class:`LocalExecutor`: a child process of the worker. On Linux it is tied to the worker with
  ``PR_SET_PDEATHSIG``: when the worker dies (even by SIGKILL) its training process dies too, so
  the job's next holder never races a stray copy of the same run. (Linux sends the signal when the
  *thread* that started the child ends: the worker's loop thread, which lives as long as the worker.)
- :class:`RayExecutor`: a Ray job (Ray Jobs API, ``JobSubmissionClient``) on a cluster whose nodes
  see the workspace at the same path (a shared filesystem); multi-GPU jobs keep using torchrun
  inside the job (``train --nproc N``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from tunelab._optional import require


class Handle(Protocol):
    def poll(self) -> int | None:
        """The exit code once the process ended, else None."""

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM or the back end's stop)."""

    def kill(self) -> None:
        """Stop it now."""


class Executor(Protocol):
    name: str

    def start(self, job_id: str, argv: list[str], env: dict[str, str], log_path: Path) -> Handle:
        """Start ``python -m tunelab *argv`` with ``env`` added; its output goes to ``log_path``."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the worker's lease still protects the job
        pass


class _Proc:
    def __init__(self, p: subprocess.Popen, log):
        self.p, self._log = p, log

    def poll(self) -> int | None:
        rc = self.p.poll()
        if rc is not None and not self._log.closed:
            self._log.close()
        return rc

    def terminate(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()


class LocalExecutor:
    name = "local"

    def start(self, job_id: str, argv: list[str], env: dict[str, str], log_path: Path) -> Handle:
        log = open(log_path, "ab")
        p = subprocess.Popen([sys.executable, "-m", "tunelab", *argv], env={**os.environ, **env}, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        return _Proc(p, log)


class _RayJob:
    def __init__(self, client, sub_id: str, log_path: Path):
        self.client, self.sub_id, self.log_path = client, sub_id, log_path

    def poll(self) -> int | None:
        from ray.job_submission import JobStatus

        status = self.client.get_job_status(self.sub_id)
        if not status.is_terminal():
            return None
        try:  # the job's whole output, once, appended to the job's log
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(self.client.get_job_logs(self.sub_id))
        except Exception:
            pass
        return 0 if status == JobStatus.SUCCEEDED else 1

    def terminate(self) -> None:
        self.client.stop_job(self.sub_id)

    kill = terminate


class RayExecutor:
    """Jobs on a Ray cluster through the Ray Jobs API (``address``: the dashboard, http://HEAD:8265)."""

    name = "ray"

    def __init__(self, address: str, num_cpus: float | None = None, num_gpus: float | None = None):
        require("ray", "platform")
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(address)
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self._n = 0

    def start(self, job_id: str, argv: list[str], env: dict[str, str], log_path: Path) -> Handle:
        import shlex

        self._n += 1
        sub_id = f"{job_id}-{os.getpid()}-{self._n}"  # one Ray job per attempt
        keep = {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "HF_HOME", "HF_HUB_OFFLINE", "TUNELAB_SHARED",
                                                             "TUNELAB_ALLOCATOR")}
        entry = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "tunelab", *argv])
        resources = {k: v for k, v in (("entrypoint_num_cpus", self.num_cpus), ("entrypoint_num_gpus", self.num_gpus))
                     if v is not None}
        self.client.submit_job(entrypoint=entry, submission_id=sub_id, runtime_env={"env_vars": {**keep, **env}},
                               **resources)
        return _RayJob(self.client, sub_id, log_path)
