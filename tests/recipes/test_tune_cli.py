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


@pytest.mark.slow  # ~30 s: a study of training runs, resumed; make test-slow (CI runs it)
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


@pytest.mark.slow  # parallel trial processes: ~30 s; make test-slow (CI runs it)
def test_parallel_trials_share_study_catalog_and_pruner(tmp_path, tiny_model):
    """n_jobs 2: two spawned workers share the SQLite study and the workspace catalog; each trial is its
    own run; workers use cores / 2 threads; pruning compares against the other worker's trials; a resumed
    study keeps numbering."""
    optuna = pytest.importorskip("optuna")
    from tunelab.train.tune import _cores
    from tunelab.workspace import Workspace

    ws = tmp_path / "ws"
    spec = _files(tmp_path, tiny_model, trials=2)
    raw = yaml.safe_load(spec.read_text())
    # pruning starts once 2 trials completed: the first two (one per worker) always complete
    raw.update(n_jobs=2, startup_trials=2)
    raw["space"]["learning_rate"] = {"low": 1e-2, "high": 5e-2, "log": True}  # every sampled trial learns
    spec.write_text(yaml.safe_dump(raw))
    r = run_cli("tune", str(spec), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    db = f"sqlite:///{ws / 'tune' / 'colors' / 'study.db'}"
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def check(n: int):
        study = optuna.load_study(study_name="colors", storage=db)
        trials = study.trials
        assert sorted(t.number for t in trials) == list(range(n))
        assert all(t.state in finished for t in trials), [t.state for t in trials]
        assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both workers ran trials
        assert {t.user_attrs["threads"] for t in trials} == {max(1, _cores() // 2)}
        run_ids = [t.user_attrs["run_id"] for t in trials]
        assert len(set(run_ids)) == n
        assert sorted(p.name for p in (ws / "runs").iterdir()) == sorted(run_ids)  # one folder per trial
        rows = {row["id"]: row for row in Workspace(ws).catalog().list_runs()}
        assert sorted(rows) == sorted(run_ids)  # one catalog row per trial, none lost
        for t in trials:
            assert rows[t.user_attrs["run_id"]]["status"] == "completed"
            assert rows[t.user_attrs["run_id"]]["name"] == f"colors-t{t.number}"
            s = json.loads((ws / "runs" / t.user_attrs["run_id"] / "summary.json").read_text())
            assert s["steps"] == t.user_attrs["steps"]  # each summary is its own trial's
        rep = json.loads((ws / "tune" / "colors" / "report.json").read_text())
        assert sorted(t["number"] for t in rep["trials"]) == list(range(n))
        assert {t["worker"] for t in rep["trials"]} == {0, 1}
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert rep["best"]["value"] == min(t.value for t in done) == study.best_value
        assert rep["importances"] and set(rep["importances"]) <= {"learning_rate", "lora_r"}
        assert (ws / "tune" / "colors" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return study

    study = check(2)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # the two workers' samplers are seeded apart: no repeated values
    assert len({t.params["learning_rate"] for t in study.trials}) == 2
    # two trials that cannot learn in time (learning rate 1e-7, outside the space on purpose) are
    # queued; resumed with two workers, each is pruned against the earlier trials' validation losses
    for _ in range(2):
        study.enqueue_trial({"learning_rate": 1e-7, "lora_r": 2})
    r = run_cli("tune", str(spec), "--resume", "--trials", "4", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    study = check(4)
    new = [t for t in study.trials if t.number >= 2]
    assert [t.params["learning_rate"] for t in new] == [1e-7, 1e-7]
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in new), [(t.number, t.state) for t in new]
    assert all(t.user_attrs["pruned_at_step"] < 6 for t in new)
