"""`tunelab estimate --device cpu`: the precision training really picks here, and a time from --calibrate
(training steps timed on this machine) or from the stated, measured default rate."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tunelab.advise import estimate as est
from tunelab.advise.calibrate import calibrate_cpu, calibration_shape
from tunelab.advise.estimate import (CPU_DEFAULT_PARAMS, CPU_DEFAULT_TOKENS_PER_S, EstimateConfig, estimate,
                                     model_shape, param_counts)
from tunelab.errors import TunelabError
from tunelab.train import device


def _no_timing():
    raise AssertionError("the bf16 matmul is timed only on CPUs with AVX512-bf16 and no AMX")


# AVX512-bf16 without AMX: bf16 only where a bf16 matmul times clearly faster (0.8x on an Intel Xeon, 2.2x on an
# AMD EPYC Zen 4, measured); AMX always; AVX2 only never (bf16 would be emulated)
@pytest.mark.parametrize("flags,speedup,expected", [({"avx512_bf16"}, 0.8, "fp32"), ({"avx512_bf16"}, 2.2, "bf16"),
                                                    ({"avx512_bf16", "amx_bf16"}, None, "bf16"),
                                                    ({"avx2"}, None, "fp32")])
def test_cpu_precision_is_the_trainers_choice(monkeypatch, flags, speedup, expected):
    import torch

    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    monkeypatch.setattr(device, "cpu_bf16_matmul_speedup", (lambda: speedup) if speedup else _no_timing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = device.plan("auto")  # what every recipe calls
    res = estimate(EstimateConfig(model="smollm2-135m", device="cpu"))
    assert trainer.device == "cpu" and res["precision"]["precision"] == trainer.precision == expected
    assert res["config"]["precision"] == expected and trainer.why in res["precision"]["why"]
    # the memory follows the chosen precision: bf16 LoRA on a CPU takes the recipe's speed-ups (bf16 frozen base)
    fp32 = estimate(EstimateConfig(model="smollm2-135m", device="cpu", precision="fp32"))
    assert (res["memory"]["weights"] < fp32["memory"]["weights"]) == (expected == "bf16")
    # set by hand, it stays as set
    assert estimate(EstimateConfig(model="smollm2-135m", device="cpu", precision="bf16"))["precision"]["why"] == "set: bf16"



@pytest.mark.parametrize("flags,warned", [({"avx2"}, True), ({"avx2", "avx512_bf16"}, False),
                                          ({"avx2", "amx_bf16"}, False)])
def test_bf16_set_by_hand_on_a_cpu_without_bf16_instructions_is_warned(monkeypatch, caplog, flags, warned):
    import torch

    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="tunelab.device"):
        p = device.plan("bf16")
    assert p.precision == "bf16"  # the recipe's choice is kept
    assert ("no bf16 instructions" in p.why) == warned and bool(caplog.records) == warned
    assert "no bf16 instructions" not in device.plan("auto").why  # tunelab's own pick never warns


def test_the_bf16_matmul_timing_is_a_ratio_measured_once():
    device.cpu_bf16_matmul_speedup.cache_clear()
    r = device.cpu_bf16_matmul_speedup()
    assert r > 0 and device.cpu_bf16_matmul_speedup() == r  # cached: one timing per process
    if "avx512_bf16" in device.cpu_flags() and "amx_bf16" not in device.cpu_flags():
        p, why = device.cpu_precision()
        assert (p == "bf16") == (r >= device.CPU_BF16_MIN_MATMUL_SPEEDUP) and f"{r:.1f}x" in why


def test_gpu_devices_keep_16_bit():
    assert estimate(EstimateConfig(model="smollm2-135m", device="a100-80gb"))["precision"]["precision"] == "bf16"
    assert estimate(EstimateConfig(model="smollm2-135m", device="t4"))["precision"]["precision"] == "fp16"
    assert estimate(EstimateConfig(model="smollm2-135m"))["config"]["precision"] == "bf16"


def test_default_cpu_rate_reproduces_the_measured_run():
    # the default is the measured SFT run (SmolLM2-135M LoRA fp32, 215.5 tokens/s): estimating that very job
    # must give back that throughput
    assert param_counts(model_shape("smollm2-135m"))["total"] == CPU_DEFAULT_PARAMS
    res = estimate(EstimateConfig(model="smollm2-135m", method="lora", device="cpu", precision="fp32", tokens=1e6))
    c = res["compute"]
    assert c["tokens_per_s"] == pytest.approx(CPU_DEFAULT_TOKENS_PER_S)
    assert c["hours"] == pytest.approx(1e6 / CPU_DEFAULT_TOKENS_PER_S / 3600)
    assert "default, not this machine" in c["rate_source"] and "BENCHMARKS.md" in c["rate_source"]
    assert "rate: default, not this machine" in est.format_estimate(res)
    # a bigger model takes proportionally longer at the same rate
    big = estimate(EstimateConfig(model="smollm2-360m", method="lora", device="cpu", precision="fp32", tokens=1e6))
    ratio = param_counts(model_shape("smollm2-360m"))["total"] / CPU_DEFAULT_PARAMS
    assert big["compute"]["hours"] == pytest.approx(c["hours"] * ratio)


def test_calibration_times_training_steps_here(tiny_model):
    cfg = EstimateConfig(model=str(tiny_model), method="lora", device="cpu", batch_size=2, seq_len=32, tokens=1e5)
    s = model_shape(str(tiny_model))
    cal = calibrate_cpu(cfg, s, steps=2)
    assert cal["layers"] == s.layers and cal["tokens_per_s"] > 0 and cal["precision"] == device.cpu_precision()[0]
    assert cal["achieved_flops"] == pytest.approx(4 * param_counts(s)["total"] * 2 * 2 * 32 / cal["seconds"])
    res = estimate(cfg.model_copy(update={"achieved_flops": cal["achieved_flops"]}))
    assert res["compute"]["hours"] == pytest.approx(res["compute"]["flops"] / cal["achieved_flops"] / 3600)
    assert res["compute"]["rate_source"].startswith("measured here")


def test_calibration_cuts_large_models_to_a_rate_it_can_measure():
    small = model_shape("smollm2-135m")
    assert calibration_shape(small) == small
    cut = calibration_shape(model_shape("llama-3.1-8b"))
    assert cut.layers == 1 and cut.vocab == 32768 and cut.hidden == 4096 and cut.intermediate == 14336
    with pytest.raises(TunelabError, match="too large to calibrate"):
        calibrate_cpu(EstimateConfig(model="llama-3.1-70b", device="cpu"), model_shape("llama-3.1-70b"))


def test_cli_cpu_estimate_prints_precision_and_time(tiny_model):
    r = run_cli("estimate", "--model", "smollm2-135m", "--device", "cpu", "--tokens", "1e6")
    assert r.returncode == 0, r.stderr
    assert f"precision: {device.cpu_precision()[0]} — what training picks on this machine" in r.stdout
    assert "time:" in r.stdout and "rate: default, not this machine" in r.stdout
    # in process: torch is loaded already, so the calibration costs only its steps
    from typer.testing import CliRunner

    from tunelab.cli import app

    r = CliRunner().invoke(app, ["estimate", "--model", str(tiny_model), "--device", "cpu", "--tokens", "1e5",
                                 "--seq-len", "32", "--batch-size", "2", "--calibrate", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["calibration"]["tokens_per_s"] > 0 and out["compute"]["rate_source"].startswith("measured here")
    r = CliRunner().invoke(app, ["estimate", "--model", "smollm2-135m", "--device", "a10", "--calibrate"])
    assert r.exit_code == 2 and "--device cpu" in r.output
