"""tunelab tune end to end on the tiny model: trials are real SFT runs, the study persists in SQLite,
the best trial is the minimum, --resume adds trials, the report has importances and the history plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, write_color_data


def _files(tmp_path: Path, model: Path, trials: int) -> Path:
    train = write_color_data(tmp_path / "train.jsonl", 96, seed=1)
    base = {"recipe": "sft", "model": {"name": str(model)},
            "data": {"train": str(train), "validation_split": 0.2, "max_length": 48},
            "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 6, "batch_size": 8, "eval_every": 2, "seed": 3, "warmup_ratio": 0.0,
                      "precision": "fp32", "early_stopping_patience": None}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"recipe": "tune", "name": "colors", "base": "base.yaml", "trials": trials, "seed": 0, "startup_trials": 2,
            "space": {"learning_rate": {"low": 1e-4, "high": 5e-2, "log": True},
                      "lora_r": {"choices": [2, 4, 8]}}}
    p = tmp_path / "tune.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_tune_study_resume_report(tmp_path, tiny_model):
    optuna = pytest.importorskip("optuna")
    ws = tmp_path / "ws"
    spec = _files(tmp_path, tiny_model, trials=3)
    r = run_cli("tune", str(spec), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "best trial" in r.stdout
    db = ws / "tune" / "colors" / "study.db"
    assert db.is_file()
    study = optuna.load_study(study_name="colors", storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    assert len(states) == 3 and all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                    for s in states)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert study.best_value == min(t.value for t in done)
    # every trial reported its validation losses (what the median pruner compares) and is a real run
    for t in study.trials:
        assert t.intermediate_values, t.number
        run = ws / "runs" / t.user_attrs["run_id"]
        assert (run / "metrics.jsonl").is_file()
    for t in done:  # the objective is the run's best validation loss
        s = json.loads((ws / "runs" / t.user_attrs["run_id"] / "summary.json").read_text())
        assert t.value == pytest.approx(s["best_eval_loss"])

    # a second start without --resume refuses; --resume continues up to the new total
    r = run_cli("tune", str(spec), "-w", str(ws))
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli("tune", str(spec), "--resume", "--trials", "4", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="colors", storage=f"sqlite:///{db}")
    assert len(study.trials) == 4

    rep = json.loads((ws / "tune" / "colors" / "report.json").read_text())
    assert rep["best"]["number"] == study.best_trial.number and rep["best"]["value"] == study.best_value
    assert len(rep["trials"]) == 4
    assert set(rep["importances"]) <= {"learning_rate", "lora_r"} and rep["importances"]
    png = ws / "tune" / "colors" / "history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
