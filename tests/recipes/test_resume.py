"""SIGKILL a training process mid-run; --resume reaches the same final loss as an uninterrupted run."""

from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import run_cli, write_color_data


def _recipe(tmp_path: Path, model: Path) -> Path:
    train = write_color_data(tmp_path / "train.jsonl", 400, seed=3)
    cfg = {
        "recipe": "sft", "name": "resume",
        "model": {"name": str(model)},
        "data": {"train": str(train), "validation_split": 0.1, "max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: the RNG state must be restored too
        "train": {"learning_rate": 1e-2, "epochs": 2, "batch_size": 4, "eval_every": 15, "seed": 11,
                  "early_stopping_patience": None, "save_total_limit": 3},
    }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _final(run_dir: Path) -> tuple[list[float], float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return losses, evals[-1]


@pytest.mark.slow  # two full runs and a SIGKILL: ~45 s; make test-slow (CI runs it)
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model)

    ws_a = tmp_path / "a"
    r = run_cli("train", str(recipe), "-w", str(ws_a))
    assert r.returncode == 0, r.stderr[-3000:]
    (run_a,) = list((ws_a / "runs").iterdir())

    ws_b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(recipe), "-w", str(ws_b)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ws_b.glob("runs/*/checkpoints/checkpoint-*") if (p / "trainer_state.json").exists()]
        if any(int(p.name.split("-")[-1]) >= 30 for p in done):
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = max(int(p.name.split("-")[-1]) for p in done)
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "training finished before it could be killed; make the run longer"
    (run_b,) = list((ws_b / "runs").iterdir())
    assert not (run_b / "summary.json").exists()  # really interrupted
    # the catalog still says "running" (nobody could write otherwise), but the process is gone
    shown = run_cli("runs", "show", run_b.name, "-w", str(ws_b))
    assert json.loads(shown.stdout)["catalog"]["status"] == "interrupted", shown.stdout[-2000:]

    r = run_cli("train", "--resume", run_b.name, "-w", str(ws_b))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from checkpoint-" in r.stdout

    losses_a, eval_a = _final(run_a)
    losses_b, eval_b = _final(run_b)
    assert len(losses_a) == len(losses_b)  # metrics after the checkpoint were not logged twice
    assert abs(losses_a[-1] - losses_b[-1]) < 1e-4
    assert abs(eval_a - eval_b) < 1e-4
    sa = json.loads((run_a / "summary.json").read_text())
    sb = json.loads((run_b / "summary.json").read_text())
    assert sa["steps"] == sb["steps"]
    assert abs(sa["best_eval_loss"] - sb["best_eval_loss"]) < 1e-4
