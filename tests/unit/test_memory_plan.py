"""The SFT memory plan (tunelab/train/memory.py): micro-batch x accumulation and gradient checkpointing chosen so a run
fits its memory budget, values the user set kept, and the same losses as the unsplit batch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tunelab.train.memory import PRESETS, Job, memory_budget, plan_memory, predicted_gb

SMOL = PRESETS["smollm2-135m"]
JOB = Job(method="lora", seq_len=512, loss_share=0.15, precision="fp32", lora_r=16, device="cpu")


def _plan(budget, **kw):
    args = {"device": "cpu", "batch_size": 8, "grad_accum": 1, "micro_batch": None, "checkpoint_every": 0,
            "checkpoint_set": False, "budget_gb": budget, "budget_from": "test", "runtime_gb": 0.5}
    args.update(kw)
    return plan_memory(JOB, SMOL, **args)


def test_unsplit_batch_when_it_fits():
    p = _plan(100)
    assert (p.micro_batch, p.grad_accum, p.checkpoint_every, p.chosen, p.fits) == (8, 1, 0, False, True)
    assert "fits without splitting" in p.line()


def test_cpu_splits_the_batch_before_checkpointing_and_keeps_examples_per_step():
    full = predicted_gb(JOB, SMOL, "cpu", 0.5)
    p = _plan(full * 0.6, grad_accum=2)
    assert p.fits and p.chosen and p.checkpoint_every == 0
    assert p.micro_batch < 8 and p.micro_batch * p.grad_accum == 8 * 2  # same examples per optimizer step
    assert p.estimate_gb <= full * 0.6
    # a budget only checkpointing can meet: every 2nd layer if that fits, else every layer, at the largest
    # micro-batch that then fits
    def pred(m, ck):
        return predicted_gb(Job(**{**JOB.__dict__, "batch_size": m, "checkpoint_every": ck}), SMOL, "cpu", 0.5)

    one = pred(1, 0)
    for budget in (one * 0.9, pred(1, 2) * 0.99):
        q = _plan(budget)
        assert q.fits and q.checkpoint_every in (1, 2) and q.estimate_gb <= budget
        assert (q.checkpoint_every == 2) == any(pred(m, 2) <= budget for m in (1, 2, 4, 8))
    assert _plan(pred(1, 2) * 0.99).checkpoint_every == 1


def test_the_whole_batch_when_it_fits_and_a_set_micro_batch_wins():
    p = _plan(100, grad_accum=2)
    assert (p.micro_batch, p.grad_accum, p.checkpoint_every, p.fits) == (8, 2, 0, True)
    assert "fits without splitting" in p.line()
    assert _plan(100, micro_batch=4).micro_batch == 4
    # a budget that only a micro-batch of 2 meets splits to 2 (the largest divisor that fits), not to 1
    assert _plan(predicted_gb(Job(**{**JOB.__dict__, "batch_size": 2}), SMOL, "cpu", 0.5)).micro_batch == 2


def test_gpu_checkpoints_before_splitting():
    full = predicted_gb(JOB, SMOL, "cuda", 0.0)
    p = _plan(full * 0.6, device="cuda", runtime_gb=0.0)
    assert p.fits and p.checkpoint_every == 1 and p.micro_batch == 8


def test_user_settings_win_and_an_impossible_budget_says_so():
    p = _plan(0.1, micro_batch=8, checkpoint_set=True)
    assert (p.micro_batch, p.checkpoint_every, p.fits) == (8, 0, False)
    assert "unset train.micro_batch_size and train.gradient_checkpointing" in p.why
    q = _plan(0.1, micro_batch=8)  # checkpointing is still free to choose: it is the only lever
    assert (q.micro_batch, q.checkpoint_every, q.fits) == (8, 1, False)
    assert "unset train.micro_batch_size" in q.why and "gradient_checkpointing" not in q.why


def test_budget_setting_and_default():
    assert memory_budget(3.5, "cpu") == (3.5, "train.memory_budget_gb")
    gb, src = memory_budget(None, "cpu")
    assert 0 < gb and ("RAM" in src or "available" in src)


def test_micro_batch_must_divide_batch_size():
    from tunelab.config import validate
    from tunelab.errors import ConfigError
    from tunelab.sections import TrainSection

    with pytest.raises((ConfigError, ValueError), match="must divide train.batch_size 8"):
        validate(TrainSection, {"batch_size": 8, "micro_batch_size": 3})


def _long_data(path: Path, n: int) -> Path:
    from tests.conftest import ADJECTIVES, ANIMALS, COLORS

    rng = random.Random(7)
    with open(path, "w") as f:
        for _ in range(n):  # responses of very different lengths: padding and response-only masks matter
            out = " ".join(f"The {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} is {rng.choice(COLORS)}."
                           for _ in range(rng.randint(1, 12)))
            f.write(json.dumps({"instruction": "Tell me the colors.", "input": "", "output": out}) + "\n")
    return path


def _sft(tiny_model, data, ws, **train):
    from tunelab.config import validate
    from tunelab.train.sft import SFTConfig, run
    from tunelab.workspace import Workspace

    cfg = validate(SFTConfig, {
        "recipe": "sft", "model": {"name": str(tiny_model)}, "data": {"train": str(data), "max_length": 256},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # no dropout: masks would differ between the splits
        "train": {"batch_size": 8, "max_steps": 2, "eval_every": 100, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "precision": "fp32", **train}})
    s = run(cfg, Workspace.resolve(ws))
    rows = [json.loads(x) for x in (Path(s["output"]).parent / "metrics.jsonl").read_text().splitlines()]
    return s, [r["loss"] for r in rows if "loss" in r and "step_time_s" in r]


def test_split_batch_trains_the_same_as_the_whole_batch(tiny_model, tmp_path, monkeypatch):
    from tunelab.train import sft

    # the process's resident size before the model is the CPU prediction's base; inside pytest it grows from run to
    # run, so pin it: this test is about the choice and the losses (tests/real/test_memory_fit.py measures RSS)
    monkeypatch.setattr(sft, "resident_gb", lambda: 0.5)
    data = _long_data(tmp_path / "long.jsonl", 24)
    whole, l_whole = _sft(tiny_model, data, tmp_path / "a", memory_budget_gb=1000)
    budget = whole["memory"]["estimate_gb"] - 1e-3  # just under what the whole batch needs: it must split
    split, l_split = _sft(tiny_model, data, tmp_path / "b", memory_budget_gb=budget)
    assert whole["memory"]["micro_batch"] == 8 and not whole["memory"]["chosen"]
    m = split["memory"]
    assert m["chosen"] and m["micro_batch"] < 8 and m["micro_batch"] * m["grad_accum"] == 8 and m["fits"]
    assert m["estimate_gb"] <= budget
    assert len(l_whole) == len(l_split) == 2
    # the same examples per step, the loss summed over the step's response tokens and divided by their count
    assert l_split == pytest.approx(l_whole, rel=1e-4)
    assert split["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-4)

