"""The shared speed-ups (tunelab/train/_cpu_speed.Speedups) in every recipe change speed, not what is learned.

Each recipe runs a few steps on a tiny model twice, ``train.speedups: auto`` and ``off`` (the plain
Trainer/TRL computation), from the same seed: the per-step training losses must agree, and the run
must record which speed-ups it applied and why the others were not.

Tolerances: under fp32 the fused paths only reorder sums (chunked log-sum-exp, a head applied to a subset
of rows), so losses agree to ~1e-6 relative after a few steps; 1e-4 leaves room for the optimizer
amplifying those roundings. Under bf16 (the AMX path, forced here) the frozen base is stored in bf16 and
autocast computes in bf16 either way: the matmuls see the same values, but eager vs SDPA attention and
the chunked head round differently in bf16 (8 mantissa bits, ~4e-3 relative per rounding): 2e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_color_data, write_topic_data
from tests.recipes.test_preference_cli import write_pairs

pytest.importorskip("torch")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}  # FastDropout draws other masks than nn.Dropout: compared apart
STEPS = 3


def _run(cfg: dict, ws: Path) -> tuple[dict, list[float]]:
    import contextlib
    import io

    from tunelab import recipes
    from tunelab.workspace import Workspace

    cls, run = recipes.get(cfg["recipe"])
    from tunelab.config import validate

    with contextlib.redirect_stdout(io.StringIO()):
        s = run(validate(cls, cfg), Workspace.resolve(ws))
    run_dir = ws / "runs" / s["run_id"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and not any(k.startswith("eval_") for k in r)]
    assert len(losses) == STEPS
    return s, losses


# fp32 unless a test asks for bf16: "auto" would be bf16 on AMX and fast AVX512-bf16 CPUs, and the fp32 cases
# check exactness at fp32 tolerances and fp32's speed-ups
def _both(cfg: dict, tmp: Path, precision: str = "fp32") -> tuple[dict, list[float], dict, list[float]]:
    train = {"max_steps": STEPS, "batch_size": 4, "eval_every": 1000, "seed": 3, "learning_rate": 5e-3,
             "early_stopping_patience": None, "precision": precision}
    fast = _run({**cfg, "train": {**train, "speedups": "auto"}}, tmp / "ws")
    plain = _run({**cfg, "train": {**train, "speedups": "off"}}, tmp / "ws")
    return (*fast, *plain)


def _check(fast, lf, plain, lp, rel: float, applied: set[str]):
    assert lf == pytest.approx(lp, rel=rel), (lf, lp)
    assert set(fast["cpu_speedups"]) == applied, fast["speedups"]
    assert fast["speedups"]["setting"] == "auto" and plain["speedups"]["setting"] == "off"
    assert plain["cpu_speedups"] == [] or plain["cpu_speedups"] == ["length-grouped batches"]
    rec = fast["speedups"]
    # every speed-up the recipe knows is either applied or has a reason it is not
    assert "fused response-only loss" in {**rec["applied"], **rec["not_applied"]}
    assert all(why for why in rec["not_applied"].values())


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("speed")
    text = d / "domain.txt"
    text.write_text("\n\n".join(json.loads(x)["instruction"] + " " + json.loads(x)["output"] for x in
                                write_color_data(d / "c.jsonl", 200, seed=4).read_text().splitlines()))
    return {"pairs": write_pairs(d / "pairs.jsonl", 64, 1), "chats": write_color_data(d / "chats.jsonl", 64, 2),
            "text": text, "model": str(tiny_model), "dir": d}


def test_cpt_fused_loss_same_losses_and_recorded(data, tmp_path):
    cfg = {"recipe": "cpt", "model": {"name": data["model"]}, "method": "lora", "lora": LORA,
           "data": {"files": [str(data["text"])], "text_unit": "paragraph", "heldout_share": 0.1, "block_size": 32}}
    fast, lf, plain, lp = _both(cfg, tmp_path)
    _check(fast, lf, plain, lp, 1e-4, {"SwiGLU recomputed in backward", "fused response-only loss",
                                       "fused LoRA linear", "norms recomputed in backward", "grouped-query SDPA"})
    assert "no LoRA dropout" in fast["speedups"]["not_applied"]["fast LoRA dropout"]


def test_cpt_fast_dropout_recorded(data, tmp_path):
    """With LoRA dropout the masks differ (another generator, same distribution): only the first step, where
    LoRA's B is still zero, must agree exactly."""
    cfg = {"recipe": "cpt", "model": {"name": data["model"]}, "method": "lora", "lora": {**LORA, "dropout": 0.1},
           "data": {"files": [str(data["text"])], "text_unit": "paragraph", "heldout_share": 0.1, "block_size": 32}}
    fast, lf, plain, lp = _both(cfg, tmp_path)
    assert lf[0] == pytest.approx(lp[0], rel=1e-5)
    assert set(fast["cpu_speedups"]) == {"SwiGLU recomputed in backward", "fused response-only loss",
                                         "fast LoRA dropout", "fused LoRA linear", "norms recomputed in backward",
                                         "grouped-query SDPA"}


@pytest.mark.slow
def test_cpt_bf16_path_frozen_base_and_attention(data, tmp_path):
    cfg = {"recipe": "cpt", "model": {"name": data["model"]}, "method": "lora", "lora": {**LORA, "dropout": 0.0},
           "data": {"files": [str(data["text"])], "text_unit": "paragraph", "heldout_share": 0.1, "block_size": 32}}
    fast, lf, plain, lp = _both(cfg, tmp_path, precision="bf16")
    _check(fast, lf, plain, lp, 2e-2, {"SwiGLU recomputed in backward", "fused response-only loss",
                                       "frozen base in bf16", "checkpointed eager attention", "fused LoRA linear", "norms recomputed in backward"})
    # the fp32 base is back after training: the perplexity after is the trained model's, not a bf16 one
    assert fast["domain_perplexity_after"] == pytest.approx(plain["domain_perplexity_after"], rel=5e-2)


def test_sft_shared_prompt_prefix_same_losses_and_recorded(data, tmp_path):
    """Every chat starts with the same system prompt: the prefix runs once per batch, the losses are the padded
    batch's."""
    cfg = {"recipe": "sft", "model": {"name": data["model"]}, "method": "lora", "lora": LORA,
           "data": {"train": str(data["chats"]), "validation_split": 0.0, "max_length": 256,
                    "system_prompt": "Answer in one sentence."}}
    fast, lf, plain, lp = _both(cfg, tmp_path)
    assert lf == pytest.approx(lp, rel=1e-4), (lf, lp)
    rec = fast["speedups"]["applied"]
    assert "positions not computed" in rec["shared prompt prefix"], rec
    assert plain["speedups"]["not_applied"]["shared prompt prefix"] == "off (train.speedups: off)"


def test_dpo_compact_fused_head_same_losses(data, tmp_path):
    cfg = {"recipe": "dpo", "model": {"name": data["model"]}, "method": "lora", "lora": LORA,
           "data": {"train": str(data["pairs"]), "validation_split": 0.0, "max_length": 64, "test_limit": 4}}
    fast, lf, plain, lp = _both(cfg, tmp_path)
    # TRL disables dropout for DPO (disable_dropout): no LoRA dropout to speed up
    _check(fast, lf, plain, lp, 1e-4, {"SwiGLU recomputed in backward", "fused response-only loss", "fused LoRA linear",
                                       "norms recomputed in backward", "shared prompt forward", "grouped-query SDPA"})
    assert "positions not computed" in fast["speedups"]["applied"]["shared prompt forward"]


def test_dpo_compact_head_gives_the_same_log_probs(tiny_model):
    """The compact path projects only completion positions: the per-token log-probs are the same."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tunelab.train.dpo import compact_fused_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    add_fused_lm_head(model)
    ids = torch.randint(5, 100, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100
    import trl.trainer.utils as tu

    rows = []
    fn = tu._ChunkedLogProbFunction

    class Counting:  # the rows TRL's fused head projects through the vocabulary-wide head
        @staticmethod
        def apply(hidden, *a):
            rows.append(hidden.shape[0])
            return fn.apply(hidden, *a)

    tu._ChunkedLogProbFunction = Counting
    try:
        plain = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        with compact_fused_head():
            compact = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    finally:
        tu._ChunkedLogProbFunction = fn
    assert rows == [2 * 11, 2 * 5], rows  # every shifted position, then only the 5 labelled ones per row
    assert torch.allclose(plain, compact, atol=1e-5)
    assert (compact[:, :6] == 0).all() and (compact[:, 6:] != 0).all()


def test_reward_speedups_recorded_same_losses(data, tmp_path):
    cfg = {"recipe": "reward", "model": {"name": data["model"]}, "method": "lora", "lora": LORA,
           "data": {"train": str(data["pairs"]), "validation_split": 0.0, "max_length": 64, "test_limit": 4}}
    fast, lf, plain, lp = _both(cfg, tmp_path)
    _check(fast, lf, plain, lp, 1e-4, {"SwiGLU recomputed in backward", "fused LoRA linear", "norms recomputed in backward",
                                       "shared prompt forward", "grouped-query SDPA"})
    assert "positions not computed" in fast["speedups"]["applied"]["shared prompt forward"]
    assert "scalar head" in fast["speedups"]["not_applied"]["fused response-only loss"]


@pytest.mark.slow
def test_reward_bf16_frozen_base_same_losses(data, tmp_path):
    cfg = {"recipe": "reward", "model": {"name": data["model"]}, "method": "lora", "lora": LORA,
           "data": {"train": str(data["pairs"]), "validation_split": 0.0, "max_length": 64, "test_limit": 4}}
    fast, lf, plain, lp = _both(cfg, tmp_path, precision="bf16")
    _check(fast, lf, plain, lp, 2e-2, {"SwiGLU recomputed in backward", "frozen base in bf16", "shared prompt forward", "fused LoRA linear", "norms recomputed in backward"})
    assert "cast to bf16 once" in fast["speedups"]["applied"]["fused LoRA linear"]


def _teacher(data) -> str:
    """The tiny model with every weight perturbed (fixed seed): a teacher the student differs from. A student that
    starts as its own teacher has a KL of 0 at the first step and, under bf16, of bf16 rounding noise at the next
    ones (4.7e-4 against 8.7e-5 in fp32): the losses compared would be noise, not what the speed-ups compute."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = data["dir"] / "teacher"
    if not out.exists():
        model = AutoModelForCausalLM.from_pretrained(data["model"])
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std().clamp(min=0.02))
        model.save_pretrained(out)
        for f in Path(data["model"]).glob("*token*"):
            shutil.copy(f, out / f.name)
    return str(out)


def _distill(data) -> dict:
    return {"recipe": "distill", "teacher": {"name": _teacher(data)}, "student": {"name": data["model"]},
            "method": "lora", "lora": LORA,
            "data": {"train": str(data["chats"]), "validation_split": 0.1, "max_length": 64},
            "eval": {"max_new_tokens": 2, "limit": 2, "latency_prompts": 1}}


def test_distill_same_losses_recorded(data, tmp_path):
    fast, lf, plain, lp = _both(_distill(data), tmp_path)
    _check(fast, lf, plain, lp, 1e-4, {"SwiGLU recomputed in backward", "fused response-only loss",
                                       "fused LoRA linear", "norms recomputed in backward", "grouped-query SDPA"})
    assert "teacher in bf16" in fast["speedups"]["not_applied"]


@pytest.mark.slow
def test_distill_bf16_teacher_same_losses(data, tmp_path):
    fast, lf, plain, lp = _both(_distill(data), tmp_path, precision="bf16")
    assert min(lp) > 0.1, lp  # the KL is the teacher's distance, not rounding noise
    _check(fast, lf, plain, lp, 2e-2, {"SwiGLU recomputed in backward", "fused response-only loss", "frozen base in bf16", "teacher in bf16",
                                       "fused LoRA linear", "norms recomputed in backward"})


def test_classify_records_grouping_and_no_fused_loss(tmp_path, tiny_bert):
    train = write_topic_data(tmp_path / "train.csv", 80, seed=1)
    cfg = {"recipe": "classify", "model": {"name": str(tiny_bert)}, "method": "lora", "lora": LORA,
           "data": {"train": str(train), "validation_split": 0.0, "max_length": 32}}
    fast, lf, plain, lp = _both(cfg, tmp_path)
    _check(fast, lf, plain, lp, 1e-4, {"length-grouped batches", "fused LoRA linear"})
    assert "pooled vector" in fast["speedups"]["not_applied"]["fused response-only loss"]


def test_rlhf_refuses_the_speedups_option_it_does_not_read():
    from tunelab.config import ConfigError, validate
    from tunelab.train.rlhf import RLHFConfig

    cfg = {"recipe": "rlhf", "model": {"name": "m"}, "data": {"train": "p.jsonl"}, "reward_function": "m:f"}
    validate(RLHFConfig, cfg)
    with pytest.raises(ConfigError, match="train.speedups: the rlhf recipe does not read this option"):
        validate(RLHFConfig, {**cfg, "train": {"speedups": "off"}})
