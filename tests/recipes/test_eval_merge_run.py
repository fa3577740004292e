"""`tunelab eval` of a LoRA run scores the base first, then the tuned model with its adapter merged into the base
weights: the base is what the unmerged path gives (bit for bit), the tuned model's per-example reference NLL equals
the unmerged model's up to rounding, and metrics.json says which way it was scored. A prompt-tuning adapter keeps
the unmerged path (tuned first, then the base with the adapter off)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.recipes.test_sft_cli import _only_run, _recipe

TIMING = ("latency_s", "generation_s", "generation_tokens_per_s", "ci")  # wall-clock figures differ run to run


def _train(tmp_path: Path, tiny_model: Path, **over) -> Path:
    from tunelab import config as cfglib
    from tunelab.train.sft import SFTConfig, run
    from tunelab.workspace import Workspace

    over = {"data": {"validation_split": 0.0, "limit": 48},
            "train": {"max_steps": 6, "eval_every": 6, "early_stopping_patience": None}, **over}
    recipe = _recipe(tmp_path, tiny_model, **over)
    run(cfglib.load(SFTConfig, recipe), Workspace.resolve(tmp_path / "ws"))
    return _only_run(tmp_path / "ws")


def _eval(run_dir: Path, capfd, **kw) -> tuple[dict, dict, str]:
    from tunelab.eval.run import evaluate_run
    from tunelab.workspace import Workspace

    capfd.readouterr()
    res = evaluate_run(run_dir.name, Workspace.resolve(run_dir.parent.parent), limit=8, n_resamples=200, **kw)
    err = capfd.readouterr().err
    rows = {m: [json.loads(x) for x in (run_dir / "eval" / f"{m}.jsonl").read_text().splitlines()]
            for m in ("base", "tuned")}
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["tuned_model"] == res["tuned_model"]
    return res, rows, err


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMING}


def test_lora_eval_merges_the_adapter_after_scoring_the_base(tmp_path, tiny_model, capfd):
    from transformers import AutoModelForCausalLM

    run_dir = _train(tmp_path, tiny_model)
    small = {"business_cfg": {"latency_requests": 2, "max_new_tokens": 4}, "forgetting_cfg": {"block_size": 32}}
    merged, m_rows, m_err = _eval(run_dir, capfd, **small)
    plain, p_rows, p_err = _eval(run_dir, capfd, merge=False, **small)  # the unmerged reference (the old path)

    assert merged["tuned_model"]["merged"] is True and merged["tuned_model"]["adapter"] == "lora"
    assert plain["tuned_model"]["merged"] is False and "--no-merge" in plain["tuned_model"]["why"]
    assert "tuned: lora adapter merged into the base weights for scoring" in m_err
    assert "tuned: lora adapter scored unmerged" in p_err
    # merged: the base is scored first, on the weights before any merge; unmerged: tuned first, as before
    assert m_err.index("base: generate") < m_err.index("tuned: generate")
    assert p_err.index("tuned: generate") < p_err.index("base: generate")
    assert list(merged["models"]) == list(plain["models"]) == ["base", "tuned"]
    assert list(merged["business"]) == list(plain["business"]) == ["tuned", "base"]

    # the base: the same numbers, bit for bit, whichever path scored it
    assert [_untimed(r) for r in m_rows["base"]] == [_untimed(r) for r in p_rows["base"]]
    assert _untimed(merged["models"]["base"]) == _untimed(plain["models"]["base"])
    assert merged["models"]["base"]["ci"] == plain["models"]["base"]["ci"]
    assert merged["forgetting"]["before"] == plain["forgetting"]["before"]

    # the tuned model: the unmerged model's per-example reference NLL up to floating-point rounding ...
    m_nll = [r["response_nll"] for r in m_rows["tuned"]]
    p_nll = [r["response_nll"] for r in p_rows["tuned"]]
    assert [r["response_tokens"] for r in m_rows["tuned"]] == [r["response_tokens"] for r in p_rows["tuned"]]
    assert m_nll == pytest.approx(p_nll, rel=1e-5)
    assert merged["models"]["tuned"]["perplexity"] == pytest.approx(plain["models"]["tuned"]["perplexity"], rel=1e-5)
    # ... which is not the base's: the adapter changed something, so the comparison above means something
    b_nll = [r["response_nll"] for r in p_rows["base"]]
    assert max(abs(a - b) / b for a, b in zip(p_nll, b_nll)) > 1e-2
    assert merged["forgetting"]["after"]["general_perplexity"] == pytest.approx(
        plain["forgetting"]["after"]["general_perplexity"], rel=1e-5)

    # business figures: the adapter's files are still counted; the merged model has the base's parameters, and
    # the base (the same weights, adapter off) is counted without the adapter's either way
    mb, pb = merged["business"], plain["business"]
    assert mb["tuned"]["size"]["adapter_bytes"] == pb["tuned"]["size"]["adapter_bytes"] > 0
    assert "adapter_bytes" not in mb["base"]["size"]
    n_base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert mb["tuned"]["size"]["parameters"] == mb["base"]["size"]["parameters"] == n_base
    assert pb["base"]["size"]["parameters"] == n_base < pb["tuned"]["size"]["parameters"]
    assert "speed_differences" in merged


def test_prompt_tuning_eval_keeps_the_unmerged_path(tmp_path, tiny_model, capfd):
    run_dir = _train(tmp_path, tiny_model, method="prompt_tuning", prompt={"num_virtual_tokens": 4},
                     train={"max_steps": 2, "eval_every": 2, "learning_rate": 3e-1, "early_stopping_patience": None})
    res, rows, err = _eval(run_dir, capfd, business=False, forgetting=False)
    t = res["tuned_model"]
    assert t["adapter"] == "prompt_tuning" and t["merged"] is False and "extra inputs" in t["why"]
    assert "tuned: prompt_tuning adapter scored unmerged" in err
    assert err.index("tuned: generate") < err.index("base: generate")
    assert list(res["models"]) == ["base", "tuned"] and len(rows["tuned"]) == len(rows["base"]) == 8
