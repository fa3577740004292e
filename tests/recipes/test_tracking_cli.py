"""train.report_to: MLflow (a local file store in the run folder) and TensorBoard event files hold the training
loss, offline, next to metrics.jsonl; for SFT through the CLI and for a TRL trainer (reward) through the one
TrainingArguments builder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, write_color_data

pytest.importorskip("mlflow")
pytest.importorskip("tensorboardX")


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files under ``folder`` (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def mlflow_metric(store: Path, name: str) -> list[tuple[int, float]]:
    """A metric's (step, value) rows in an MLflow file store (one line per value: timestamp value step)."""
    files = list(store.glob(f"*/*/metrics/{name}"))
    assert len(files) == 1, files
    rows = [line.split() for line in files[0].read_text().splitlines()]
    return [(int(r[2]), float(r[1])) for r in rows]


def _check(run_dir: Path, losses: dict[int, float], tb_tag: str = "train/loss") -> None:
    tb = tb_scalars(run_dir / "tensorboard")
    assert tb.get(tb_tag), sorted(tb)
    ml = mlflow_metric(run_dir / "mlruns", "loss")
    for step, v in tb[tb_tag] + ml:
        assert v == pytest.approx(losses[step], rel=1e-5), step
    assert {s for s, _ in ml} == set(losses) == {s for s, _ in tb[tb_tag]}


def test_sft_reports_to_mlflow_and_tensorboard(tmp_path, tiny_model, monkeypatch):
    """One small SFT run checks item by item: report_to, train.threads, the truncation counts per split, the
    truncated-away example in rejects.jsonl and the summary's epoch-mean training loss."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train = write_color_data(tmp_path / "train.jsonl", 21, seed=1)
    with open(train, "a", encoding="utf-8") as f:  # a prompt longer than max_length: no response token is left
        f.write(json.dumps({"instruction": "What color is the cat? " * 30, "input": "", "output": "Red."}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": "sft", "model": {"name": str(tiny_model)},
        "data": {"train": str(train), "max_length": 64, "validation_split": 0.2},
        "method": "lora", "train": {"epochs": 2, "batch_size": 8, "threads": 1, "group_by_length": False,
                                    "report_to": ["mlflow", "tensorboard"]}}))
    ws = tmp_path / "ws"
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = list((ws / "runs").iterdir())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {x["step"]: x["loss"] for x in rows if "loss" in x}
    _check(run_dir, losses)

    assert "torch CPU threads: 1 (train.threads" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    tr, va = summary["data"]["train"], summary["data"]["validation"]
    assert f"truncated at 64 tokens: train {tr['truncated']}, validation {va['truncated']}" in r.stdout
    assert tr["dropped_no_labels"] + va["dropped_no_labels"] == 1
    rejects = [json.loads(x) for x in (run_dir / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["reason"].startswith("response truncated away")
    assert rejects[0]["split"] in ("train", "validation") and "cat" in rejects[0]["prompt"]

    # the summary's loss: the last epoch's steps, each weighted by its examples (the last step is partial)
    n, steps = tr["kept"], sorted(losses)
    spe = -(-n // 8)
    last_epoch = steps[-spe:]
    w = [min(8, n - ((s - 1) % spe) * 8) for s in last_epoch]
    assert w[-1] < 8, "the data should leave a partial last batch"
    expect = sum(x * losses[s] for x, s in zip(w, last_epoch)) / sum(w)
    assert summary["final_train_loss"] == pytest.approx(expect, rel=1e-6)
    assert summary["last_step_loss"] == losses[steps[-1]] and summary["final_train_loss_steps"] == spe


def test_trl_reward_trainer_reports_through_training_args(tmp_path, tiny_model, monkeypatch):
    """A TRL trainer (RewardTrainer with TRL's RewardConfig) built with tunelab's one builder logs there too."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from tunelab.sections import TrainSection
    from tunelab.train import _run
    from tunelab.train.device import plan

    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(k, raising=False)  # what the builder sets is undone after this test
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    pairs = Dataset.from_list([{"chosen": f"the cat is red {i}", "rejected": f"the cat is blue {i}"}
                               for i in range(12)])
    t = TrainSection(max_steps=3, batch_size=4, report_to=["mlflow", "tensorboard"])
    run_dir = tmp_path / "reward-run"
    args = _run.training_args(t, plan("fp32", None), run_dir / "checkpoints", has_val=False, total_steps=3,
                              cls=RewardConfig, checkpoint_every=0, max_length=32, disable_dropout=True)
    assert set(args.report_to) == {"mlflow", "tensorboard"} and args.run_name == "reward-run"
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok)
    trainer.train()
    _check(run_dir, {r["step"]: r["loss"] for r in _run.train_rows(trainer.state.log_history)})


def test_report_to_refuses_an_unknown_tracker():
    from pydantic import ValidationError

    from tunelab.sections import TrainSection

    with pytest.raises(ValidationError, match="report_to"):
        TrainSection(report_to=["wandb"])
