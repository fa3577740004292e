"""Estimator arithmetic checked against the libraries: parameter counts against transformers and peft,
FLOPs/time/cost identities, the Chinchilla optimum, and the CLI."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli
from tunelab.advise.estimate import (DEVICES, EstimateConfig, chinchilla, chinchilla_loss, compute, estimate, lora_params,
                                     memory, model_shape, param_counts)


def test_param_counts_match_transformers_and_peft(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    s = model_shape(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert param_counts(s)["total"] == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(s, 4) == trainable


def test_preset_counts_are_the_published_sizes():
    # the model cards' parameter counts
    assert param_counts(model_shape("llama-2-7b"))["total"] == pytest.approx(6.74e9, rel=0.005)
    assert param_counts(model_shape("llama-3.1-8b"))["total"] == pytest.approx(8.03e9, rel=0.005)
    assert param_counts(model_shape("smollm2-135m"))["total"] == pytest.approx(134.5e6, rel=0.005)


def test_memory_components_follow_the_method():
    base = dict(model="llama-2-7b", batch_size=1, seq_len=512)
    full = memory(EstimateConfig(method="full", **base), model_shape("llama-2-7b"))
    lora = memory(EstimateConfig(method="lora", **base), model_shape("llama-2-7b"))
    qlora = memory(EstimateConfig(method="qlora", **base), model_shape("llama-2-7b"))
    n = full["params"]
    assert full["gradients"] == 4 * n and full["optimizer_states"] == 8 * n  # fp32 grads, AdamW's two moments
    assert lora["trainable_params"] < 0.01 * n and lora["optimizer_states"] == 8 * lora["trainable_params"]
    assert qlora["weights"] < 0.3 * lora["weights"]  # 4-bit decoder weights
    assert full["total"] > lora["total"] > qlora["total"]
    ck = memory(EstimateConfig(method="lora", checkpoint_every=1, **base), model_shape("llama-2-7b"))
    assert ck["activations"] < 0.25 * lora["activations"]
    fp32 = memory(EstimateConfig(method="lora", precision="fp32", **base), model_shape("llama-2-7b"))
    assert fp32["autocast_weight_copies"] == 0 and lora["autocast_weight_copies"] > 0


def test_compute_time_cost():
    cfg = EstimateConfig(model="llama-3.1-8b", method="full", tokens=1e9, device="h100-sxm", mfu=0.5,
                         price_per_hour=3.0, num_devices=8)
    c = compute(cfg, model_shape(cfg.model))
    n = param_counts(model_shape(cfg.model))["total"]
    assert c["flops"] == pytest.approx(6 * n * 1e9)
    hours = c["flops"] / (DEVICES["h100-sxm"].peak_flops * 0.5 * 8) / 3600
    assert c["hours"] == pytest.approx(hours) and c["cost"] == pytest.approx(hours * 8 * 3.0)
    lora = compute(cfg.model_copy(update={"method": "lora"}), model_shape(cfg.model))
    assert lora["flops"] == pytest.approx(4 * n * 1e9)  # no weight gradients for frozen weights


def test_chinchilla():
    c = 5.76e23  # Chinchilla's own budget: 70B params x 1.4T tokens
    r = chinchilla(flops=c)
    rule = r["rule_20_tokens_per_param"]
    assert 6 * rule["params"] * rule["tokens"] == pytest.approx(c) and rule["tokens"] == pytest.approx(20 * rule["params"])
    assert rule["params"] == pytest.approx(70e9, rel=0.02)
    opt = r["parametric_optimum"]
    assert 6 * opt["params"] * opt["tokens"] == pytest.approx(c)
    for f in (0.8, 1.25):  # the fitted optimum is the minimum of L along C = 6·N·D
        n = opt["params"] * f
        assert chinchilla_loss(n, c / (6 * n)) > opt["loss"]
    assert chinchilla_loss(1e9, 2e10) == pytest.approx(1.69 + 406.4 / 1e9**0.34 + 410.7 / 2e10**0.28)


def test_cli(tmp_path, tiny_model):
    r = run_cli("estimate", "--model", "llama-3.1-8b", "--method", "qlora", "--tokens", "1e8", "--device", "l4",
                "--price", "0.8")
    assert r.returncode == 0, r.stderr
    assert "optimizer states" in r.stdout and "cost:" in r.stdout and "fits l4" in r.stdout
    r = run_cli("estimate", "--model", str(tiny_model), "--method", "full", "--json")
    assert json.loads(r.stdout)["memory"]["params"] > 0
    r = run_cli("scaling", "--flops", "1e21")
    assert r.returncode == 0 and "Hoffmann" in r.stdout
    r = run_cli("estimate", "--model", "no-such-model")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown model" in r.stderr
    r = run_cli("estimate", "--model", "llama-2-7b", "--method", "full", "--device", "t4", "--tokens", "1e6")
    assert "fits t4 (16 GB): NO" in r.stdout
