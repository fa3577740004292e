"""A run stops promptly in the held-out evaluations of the reward and DPO recipes, outside the training steps,
and ends as a stop between steps ends: a cancel (the CANCEL file that `tunelab runs cancel` and the platform
write) → exit 0, catalog ``cancelled``, no summary; SIGTERM → exit 130, catalog ``interrupted``, no summary.

The run is a tiny model with a held-out set large enough that its evaluation outlasts the stop; the test
stops it when the evaluation's progress bar appears (TUNELAB_PROGRESS_INTERVAL=0 prints its first line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.recipes.test_preference_cli import write_pairs

HELD = 3000  # held-out pairs: the evaluation takes seconds on the tiny model, the stop a batch
# Promptness is read from the evaluation's progress, which does not depend on the machine's load: the run stops
# inside the pass it was stopped in (its "chosen and rejected" bar never ends, no result is printed). The time
# bound only catches a run that does not stop at all (the process exit alone can take tens of seconds on a
# loaded machine).
BOUND_S = 120
BAR = "held-out {}: chosen and rejected"  # the evaluation's progress bar: each pair's two sequences in one batch


def _start(tmp_path: Path, tiny_model: Path, recipe: str, run_id: str, **extra) -> tuple[subprocess.Popen, Path]:
    cfg = {"recipe": recipe, "name": "stop", "model": {"name": str(tiny_model)},
           "data": {"train": str(write_pairs(tmp_path / "train.jsonl", 32, 1)),
                    "test": str(write_pairs(tmp_path / "test.jsonl", HELD, 2)), "max_length": 48},
           "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 2, "batch_size": 8, "eval_every": 1},
           **extra}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    ws = tmp_path / "ws"
    env = {**os.environ, "TUNELAB_RUN_ID": run_id, "TUNELAB_PROGRESS_INTERVAL": "0", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(tmp_path / "r.yaml"), "-w", str(ws)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, ws / "runs" / run_id


def _stop_when(proc: subprocess.Popen, marker: str, stop) -> tuple[list[str], float]:
    """Read the run's output; at the first line containing ``marker`` call ``stop()``. Returns (all lines, the
    seconds from the stop to the process's end)."""
    lines: list[str] = []
    killer = threading.Timer(600, proc.kill)  # a run that never stops fails the test, it does not hang it
    killer.start()
    try:
        stopped = None
        for line in proc.stdout:
            lines.append(line)
            if stopped is None and marker in line:
                stop()
                stopped = time.time()
        proc.wait()
    finally:
        killer.cancel()
    assert stopped is not None, f"'{marker}' never appeared:\n" + "".join(lines[-40:])
    return lines, time.time() - stopped


def _status(run_dir: Path) -> str:
    from tunelab.workspace import Workspace

    return Workspace.resolve(run_dir.parents[1]).catalog().get_run(run_dir.name)["status"]


# dpo ~11 s here; reward ~21 s (its pairwise evaluation tokenizes every held-out pair first): make test-slow
@pytest.mark.parametrize("recipe, extra", [pytest.param("reward", {"eval_batch_size": 2}, marks=pytest.mark.slow),
                                           ("dpo", {})])
def test_cancel_in_the_heldout_evaluation_before_training(tmp_path, tiny_model, recipe, extra):
    proc, run_dir = _start(tmp_path, tiny_model, recipe, f"{recipe}-stop-before", **extra)
    lines, took = _stop_when(proc, BAR.format("before"),
                             lambda: (run_dir / "CANCEL").write_text("cancel", encoding="utf-8"))
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert "cancelled at step 0, in the held-out evaluation before training" in out, out[-3000:]
    # it stopped within a batch: no training step, no "after" numbers; the held-out bar never reached its end
    assert "held-out before:" not in out.replace(BAR.format("before"), ""), out[-3000:]
    assert not any(f"{HELD}/{HELD}" in line for line in lines), out[-3000:]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "summary.json").exists()
    assert _status(run_dir) == "cancelled"
    assert took < BOUND_S, f"{took:.1f} s from the cancel to the end"


@pytest.mark.slow  # ~25 s: a full evaluation before, two steps, saving and reloading come first
def test_cancel_in_the_heldout_evaluation_after_training(tmp_path, tiny_model):
    proc, run_dir = _start(tmp_path, tiny_model, "dpo", "dpo-stop-after")
    lines, took = _stop_when(proc, BAR.format("after"),
                             lambda: (run_dir / "CANCEL").write_text("cancel", encoding="utf-8"))
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert "cancelled at step 2, in the held-out evaluation after training" in out, out[-3000:]
    assert not (run_dir / "summary.json").exists() and _status(run_dir) == "cancelled"
    assert (run_dir / "adapter").is_dir()  # saved before the evaluation: nothing trained is lost
    assert "held-out after (n=" not in out, out[-3000:]
    assert not any(f"{HELD}/{HELD}" in line and BAR.format("after") in line for line in lines), out[-3000:]
    assert took < BOUND_S, f"{took:.1f} s from the cancel to the end"


def test_sigterm_in_the_heldout_evaluation_before_training(tmp_path, tiny_model):
    """SIGTERM interrupts any phase (tunelab/train/_run.py turns it into KeyboardInterrupt), the held-out
    evaluation included: the run ends interrupted, as one stopped by SIGTERM between steps does."""
    proc, run_dir = _start(tmp_path, tiny_model, "reward", "reward-term-before", eval_batch_size=2)
    lines, took = _stop_when(proc, BAR.format("before"), lambda: proc.send_signal(signal.SIGTERM))
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted; continue with --resume RUN_ID" in out and "Traceback" not in out, out[-3000:]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "summary.json").exists()
    assert _status(run_dir) == "interrupted"
    assert "held-out before:" not in out.replace(BAR.format("before"), ""), out[-3000:]
    assert not any(f"{HELD}/{HELD}" in line for line in lines), out[-3000:]
    assert took < BOUND_S, f"{took:.1f} s from SIGTERM to the end"
    assert json.loads((run_dir / "lineage.json").read_text())["run_id"] == run_dir.name
