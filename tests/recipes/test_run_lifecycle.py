"""The run lifecycle (tunelab/train/_run.py) through the real CLI: cancel at a step with a checkpoint
and resume; a failure keeps its error; a bad model name leaves no run folder and no catalog row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import run_cli, write_color_data


def _recipe(tmp_path: Path, model: str, **train) -> Path:
    data = write_color_data(tmp_path / "train.jsonl", 200, seed=5)
    cfg = {"recipe": "sft", "name": "life", "model": {"name": model},
           "data": {"train": str(data), "max_length": 64},
           "lora": {"r": 4, "alpha": 8},
           "train": {"learning_rate": 5e-3, "epochs": 4, "batch_size": 4, "eval_every": 1000,
                     "early_stopping_patience": None, **train}}
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _catalog_row(ws: Path, run_id: str) -> dict:
    r = run_cli("runs", "show", run_id, "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["catalog"]


def test_cancel_stops_at_a_step_with_a_checkpoint_and_resume_finishes(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, str(tiny_model))
    ws = tmp_path / "ws"
    run_id = "sft-life-cancel-test"
    env = {**os.environ, "TUNELAB_RUN_ID": run_id, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(recipe), "-w", str(ws)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = ws / "runs" / run_id / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be cancelled: " + proc.stderr.read()[-2000:]
    from tunelab.workspace import Workspace

    w = Workspace.resolve(ws)
    assert w.catalog().get_run(run_id)["status"] == "running"
    w.request_cancel(run_id)  # what `tunelab runs cancel` does (checked below), without its start-up time
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "cancelled at step" in out

    row = _catalog_row(ws, run_id)
    assert row["status"] == "cancelled"
    run_dir = ws / "runs" / run_id
    assert not (run_dir / "summary.json").exists()
    ckpts = sorted(int(p.name.split("-")[-1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert ckpts, "no checkpoint saved at the cancel"
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    stopped = max(r["step"] for r in rows)
    assert ckpts[-1] == stopped  # the checkpoint is the step where it stopped: nothing is lost
    total = 4 * 50  # 4 epochs x 200 examples / batch 4
    assert stopped < total
    # a cancelled run refuses another cancel, and resumes to the end
    assert run_cli("runs", "cancel", run_id, "-w", str(ws)).returncode != 0
    r = run_cli("train", "--resume", run_id, "-w", str(ws), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from checkpoint-{stopped}" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == total
    assert _catalog_row(ws, run_id)["status"] == "completed"
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, total + 1))  # every step logged once across the cancel


def test_bad_model_name_leaves_no_run_folder_or_row(tmp_path):
    recipe = _recipe(tmp_path, "no-such-model-anywhere")
    ws = tmp_path / "ws"
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode != 0
    assert "unknown model 'no-such-model-anywhere'" in (r.stdout + r.stderr)
    assert "Traceback" not in r.stderr
    assert not any((ws / "runs").glob("*")) if (ws / "runs").exists() else True
    assert run_cli("runs", "list", "-w", str(ws)).stdout.count("sft-") == 0


def test_failure_keeps_its_error_in_the_catalog(tmp_path, tiny_model):
    # every record rejected: the run starts, then fails with a message naming the rejects file
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"foo": i}) for i in range(5)) + "\n")
    recipe = _recipe(tmp_path, str(tiny_model))
    cfg = yaml.safe_load(recipe.read_text())
    cfg["data"]["train"] = str(bad)
    recipe.write_text(yaml.safe_dump(cfg))
    ws = tmp_path / "ws"
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode != 0
    (run_dir,) = list((ws / "runs").iterdir())
    row = _catalog_row(ws, run_dir.name)
    assert row["status"] == "failed"
    assert "no usable training examples" in row["error"]
    assert (run_dir / "rejects.jsonl").read_text().count("\n") == 5
