"""Before a run: how much memory, compute, time and money a fine-tuning job needs, and what a
compute budget buys (Chinchilla scaling).

    tunelab estimate --model smollm2-135m --method lora --batch-size 8 --seq-len 512 --tokens 2e6 --device a100-80gb

Everything here is arithmetic on the model's shape (read from an HF ``config.json`` or a preset),
so it answers in milliseconds without torch. The memory model (weights, autocast copies, gradients,
optimizer states, activations, logits) lives in tunelab/train/memory.py, where training also uses it to
fit a run into a memory budget; it is re-exported here. The test ``tests/unit/test_estimate_measured.py``
checks the total against peak memory measured in real training runs of this project.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import Field

from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.train.device import cpu_precision
from tunelab.train.memory import (  # noqa: F401 (the memory model: re-exported for the estimator's users)
    GB,
    HEAD_CHUNK,
    LINEAR_NAMES,
    PRESETS,
    Shape,
    _layers_plain,
    _linears,
    _targets,
    cpu_fast_path,
    layer_activation_bytes,
    lora_params,
    memory as _memory,
    model_shape,
    param_counts,
    shape_from_config,
)

# ----------------------------------------------------------------------------- devices

@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float | None  # dense 16-bit tensor FLOP/s (no sparsity); None: measure (cpu)
    memory_gb: float | None
    source: str


# Peak dense BF16 (T4: FP16; it has no BF16) tensor throughput from the vendors' datasheets; the
# "with sparsity" figures there are twice these.
DEVICES: dict[str, Device] = {d.name: d for d in [
    Device("cpu", None, None, "training rate: --calibrate times training steps here, else CPU_DEFAULT_FLOPS below"),
    Device("t4", 65e12, 16, "NVIDIA T4 datasheet: 65 TFLOPS FP16 tensor"),
    Device("a10", 125e12, 24, "NVIDIA A10 datasheet: 125 TFLOPS BF16 tensor (250 with sparsity)"),
    Device("l4", 121e12, 24, "NVIDIA L4 datasheet: 242 TFLOPS BF16 with sparsity, 121 dense"),
    Device("a100-40gb", 312e12, 40, "NVIDIA A100 datasheet: 312 TFLOPS BF16 tensor"),
    Device("a100-80gb", 312e12, 80, "NVIDIA A100 datasheet: 312 TFLOPS BF16 tensor"),
    Device("h100-pcie", 756e12, 80, "NVIDIA H100 datasheet: 1513 TFLOPS BF16 with sparsity (PCIe), 756 dense"),
    Device("h100-sxm", 989e12, 80, "NVIDIA H100 datasheet: 1979 TFLOPS BF16 with sparsity (SXM), 989 dense"),
    Device("h200", 989e12, 141, "NVIDIA H200 datasheet: 1979 TFLOPS BF16 with sparsity, 989 dense"),
]}


# The CPU time estimate without --calibrate: a training rate measured on another machine, stated with its
# source. bench/sft_vs_trl.py (BENCHMARKS.md, 2026-12-06): tunelab's SFT of SmolLM2-135M-Instruct with
# LoRA r=16, fp32 (the no-AMX default), no checkpointing, on 2 cores of an Intel Xeon with AVX-512-bf16 and
# no AMX: 215.5 tokens/s (median of 2 rounds). Counted the estimator's way (4·N FLOPs a token for PEFT,
# N = 134,515,008) that is 1.16e11 FLOP/s achieved, MFU included.
CPU_DEFAULT_TOKENS_PER_S = 215.5
CPU_DEFAULT_PARAMS = 134_515_008
CPU_DEFAULT_FLOPS = CPU_DEFAULT_TOKENS_PER_S * 4 * CPU_DEFAULT_PARAMS
CPU_DEFAULT_SOURCE = ("default, not this machine: tunelab SFT of SmolLM2-135M LoRA in fp32 ran 215.5 tokens/s on "
                      "2 Xeon cores with AVX-512-bf16 and no AMX (bench/sft_vs_trl.py, BENCHMARKS.md 2026-12-06); "
                      "--calibrate measures this machine")


# ----------------------------------------------------------------------------- the question

class EstimateConfig(Strict):
    """What is estimated: a model, a method and a batch; optionally a token budget, a device and a price."""

    model: str = Field(description="preset name, HF folder, or a pulled model name")
    method: Literal["full", "lora", "qlora"] = "lora"
    batch_size: int = Field(8, ge=1, description="sequences per device per micro-batch")
    seq_len: int = Field(512, ge=1, description="tokens per sequence (padded length)")
    loss_share: float = Field(1.0, gt=0, le=1, description="share of tokens with a loss (SFT: the responses)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="compute: fp32, or 16-bit autocast; auto: what training picks on the device "
                            "(cpu: train.device.cpu_precision on this machine; a GPU: bf16, fp16 on a T4)")
    weights_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype the (non-quantized) weights are loaded in; tunelab recipes load fp32")
    checkpoint_every: int = Field(0, ge=0, description="gradient checkpointing: 0 off, 1 every layer, k every k-th")
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = "adamw"
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="eager keeps the heads x seq attention matrix")
    cpu_speedups: bool | None = Field(
        None, description="tunelab's CPU LoRA path (frozen base in bf16, checkpointed eager attention); "
                          "default: on for device cpu with bf16 LoRA, as the sft recipe does")
    lora_r: int = Field(8, ge=1)
    lora_targets: list[str] | str = "all-linear"
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    tokens: float | None = Field(None, gt=0, description="training tokens (dataset tokens x epochs) for compute")
    device: str | None = Field(None, description="device name for time and fit (see DEVICES)")
    num_devices: int = Field(1, ge=1)
    mfu: float = Field(0.4, gt=0, le=1, description="model FLOP utilization assumed (PaLM reports 46%)")
    device_flops: float | None = Field(None, gt=0, description="peak FLOP/s, overriding the device table")
    achieved_flops: float | None = Field(
        None, gt=0, description="training FLOP/s measured per device (tunelab estimate --calibrate): time = FLOPs / "
                                "this, no MFU applied")
    price_per_hour: float | None = Field(None, ge=0, description="price of one device-hour")


def resolve_precision(cfg: EstimateConfig) -> tuple[str, str]:
    """The compute precision the estimate assumes, and why: as set, or what training would pick on the device.

    For ``cpu`` this calls the trainer's own choice (``train.device.cpu_precision``, which ``train.device.plan``
    uses), so on this machine the estimate and a training run agree.
    """
    if cfg.precision != "auto":
        return cfg.precision, f"set: {cfg.precision}"
    if cfg.device == "cpu":
        p, why = cpu_precision()
        return p, f"what training picks on this machine: {why}"
    if cfg.device == "t4":
        return "fp16", "what training picks on a T4 (no bf16): fp16 mixed precision"
    return "bf16", "what training picks on a GPU with bf16: bf16 mixed precision"


def _resolved(cfg: EstimateConfig) -> EstimateConfig:
    return cfg if cfg.precision != "auto" else cfg.model_copy(update={"precision": resolve_precision(cfg)[0]})


def memory(cfg: EstimateConfig, s: Shape) -> dict:
    """Peak training memory per device by component, in bytes (train.memory.memory at the resolved precision)."""
    return _memory(_resolved(cfg), s)


def compute(cfg: EstimateConfig, s: Shape) -> dict | None:
    """Training FLOPs, time and cost for ``cfg.tokens`` tokens."""
    if cfg.tokens is None:
        return None
    N = param_counts(s)["total"]
    D = cfg.tokens
    # 6·N·D: forward 2·N·D, backward 4·N·D (Kaplan et al. 2020, sec. 2.1; attention's seq² term left out).
    # Frozen weights need no weight gradients, so PEFT's backward is ~2·N·D; recomputing checkpointed
    # layers adds their forward again.
    per_token = 6 if cfg.method == "full" else 4
    recompute = 0.0 if cfg.checkpoint_every == 0 else 1 - _layers_plain(s.layers, cfg.checkpoint_every) / s.layers
    flops = (per_token + 2 * recompute) * N * D
    out = {"tokens": D, "flops": flops, "flops_6ND": 6 * N * D, "formula": f"({per_token} + 2·{recompute:.2f})·N·D"}
    dev = DEVICES.get(cfg.device) if cfg.device else None
    if cfg.device and dev is None:
        raise TunelabError(f"unknown device '{cfg.device}'; known: {', '.join(DEVICES)}")
    if cfg.achieved_flops:
        rate, source = cfg.achieved_flops, "measured here: tunelab estimate --calibrate"
        out.update({"achieved_flops_per_device": rate, "rate_source": source})
    elif cfg.device == "cpu" and not cfg.device_flops:
        rate, source = CPU_DEFAULT_FLOPS, CPU_DEFAULT_SOURCE
        out.update({"achieved_flops_per_device": rate, "rate_source": source})
    else:
        peak = cfg.device_flops or (dev.peak_flops if dev else None)
        if peak is None:
            return out
        rate = peak * cfg.mfu
        out.update({"peak_flops_per_device": peak, "mfu": cfg.mfu,
                    "rate_source": "--device-flops" if cfg.device_flops else dev.source})
    seconds = flops / (rate * cfg.num_devices)
    out.update({"num_devices": cfg.num_devices, "hours": seconds / 3600, "device_hours": seconds / 3600 * cfg.num_devices,
                "tokens_per_s": D / seconds})
    if cfg.price_per_hour is not None:
        out["cost"] = out["device_hours"] * cfg.price_per_hour
    return out


# ----------------------------------------------------------------------------- scaling laws

# Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), approach 3 fit:
# L(N, D) = E + A / N^alpha + B / D^beta
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(n_params: float, n_tokens: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / n_params ** c["alpha"] + c["B"] / n_tokens ** c["beta"]


def chinchilla(flops: float | None = None, params: float | None = None, tokens: float | None = None) -> dict:
    """Compute-optimal sizes for a budget of ``flops`` (C = 6·N·D), or the tokens/loss for a given N (and D).

    Two answers for a budget: the rule of thumb D ≈ 20·N, and the minimum of the fitted L(N, D)
    under C = 6·N·D: N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)^(α/(α+β)) / G, G = (αA/(βB))^(1/(α+β)).
    """
    c = CHINCHILLA
    out: dict = {"constants": CHINCHILLA}
    if flops is not None:
        n20 = math.sqrt(flops / 120)
        G = (c["alpha"] * c["A"] / (c["beta"] * c["B"])) ** (1 / (c["alpha"] + c["beta"]))
        a_ = c["beta"] / (c["alpha"] + c["beta"])
        b_ = c["alpha"] / (c["alpha"] + c["beta"])
        n_fit, d_fit = G * (flops / 6) ** a_, (flops / 6) ** b_ / G
        out["budget_flops"] = flops
        out["rule_20_tokens_per_param"] = {"params": n20, "tokens": 20 * n20, "loss": chinchilla_loss(n20, 20 * n20)}
        out["parametric_optimum"] = {"params": n_fit, "tokens": d_fit, "loss": chinchilla_loss(n_fit, d_fit)}
    if params is not None:
        d = tokens if tokens is not None else 20 * params
        out["model"] = {"params": params, "tokens": d, "tokens_per_param": d / params, "flops": 6 * params * d,
                        "loss": chinchilla_loss(params, d), "compute_optimal_tokens": 20 * params}
    return out


# ----------------------------------------------------------------------------- all together

def estimate(cfg: EstimateConfig, workspace=None) -> dict:
    """Memory, compute, time, cost and fit for one configuration."""
    s = model_shape(cfg.model, workspace)
    precision, why = resolve_precision(cfg)
    cfg = cfg.model_copy(update={"precision": precision})
    mem = memory(cfg, s)
    out = {"config": cfg.model_dump(mode="json"), "precision": {"precision": precision, "why": why},
           "shape": asdict(s), "memory": mem, "compute": compute(cfg, s), "params_by_kind": param_counts(s)}
    dev = DEVICES.get(cfg.device) if cfg.device else None
    if dev and dev.memory_gb:
        out["fits"] = {"device_memory_gb": dev.memory_gb, "needed_gb": mem["total"] / GB,
                       "fits": mem["total"] / GB < dev.memory_gb * 0.9,
                       "note": "needs < 90% of device memory: the CUDA context and allocator fragmentation take the rest"}
    return out


def _duration(hours: float) -> str:
    """Hours in the unit a person reads best: seconds, minutes or hours."""
    if hours < 1 / 60:
        return f"{hours * 3600:.3g} s"
    if hours < 1:
        return f"{hours * 60:.3g} min"
    return f"{hours:,.3g} h"


def _gb(b: float) -> str:
    return f"{b / GB:,.2f} GB"


def format_estimate(r: dict) -> str:
    """The estimate as a few readable lines."""
    m, c = r["memory"], r["config"]
    lines = [f"{c['model']}: {m['params'] / 1e6:,.1f}M parameters, {m['trainable_params'] / 1e6:,.3f}M trainable "
             f"({c['method']}, {c['precision']} compute, batch {c['batch_size']} x {c['seq_len']} tokens, "
             f"checkpointing {'off' if not c['checkpoint_every'] else 'every ' + str(c['checkpoint_every'])})",
             f"precision: {r['precision']['precision']} — {r['precision']['why']}",
             "memory per device:"]
    for k in ("weights", "autocast_weight_copies", "gradients", "optimizer_states", "activations", "logits", "total"):
        lines.append(f"  {k.replace('_', ' '):24s} {_gb(m[k]):>12s}")
    if r.get("fits"):
        f = r["fits"]
        lines.append(f"  fits {c['device']} ({f['device_memory_gb']:g} GB): {'yes' if f['fits'] else 'NO'} "
                     f"(plus framework overhead, ~0.5-1 GB CUDA context)")
    comp = r.get("compute")
    if comp:
        lines.append(f"compute: {comp['tokens']:.3g} tokens, {comp['flops']:.3g} FLOPs = {comp['formula']} "
                     f"(6·N·D = {comp['flops_6ND']:.3g})")
        if "achieved_flops_per_device" in comp:
            lines.append(f"time: {_duration(comp['hours'])} on {comp['num_devices']} x {c['device'] or 'device'} at "
                         f"{comp['achieved_flops_per_device']:.3g} FLOP/s achieved in training "
                         f"({comp['tokens_per_s']:,.0f} tokens/s); rate: {comp['rate_source']}")
        elif "hours" in comp:
            lines.append(f"time: {_duration(comp['hours'])} on {comp['num_devices']} x {c['device'] or 'device'} at "
                         f"{comp['peak_flops_per_device']:.3g} FLOP/s peak x MFU {comp['mfu']:g}")
        else:
            lines.append("time: give --device (and for cpu, --calibrate) for a time estimate")
        if r.get("calibration"):
            k = r["calibration"]
            lines.append(f"calibration: {k['steps']} {k['method']} steps of {k['batch']} x {k['seq_len']} tokens in "
                         f"{k['precision']} on {k['layers']} of {k['of_layers']} decoder layers (vocab {k['vocab']:,}), "
                         f"{k['threads']} threads: {k['tokens_per_s']:,.1f} tokens/s, {k['achieved_flops']:.3g} FLOP/s "
                         f"({k['seconds']:.1f} s)")
        if "cost" in comp:
            lines.append(f"cost: {comp['cost']:,.2f} at {c['price_per_hour']:g} per device-hour "
                         f"({comp['device_hours']:.3g} device-hours)")
    return "\n".join(lines)


def format_scaling(r: dict) -> str:
    lines = []
    if "budget_flops" in r:
        a, b = r["rule_20_tokens_per_param"], r["parametric_optimum"]
        lines.append(f"budget {r['budget_flops']:.3g} FLOPs (C = 6·N·D):")
        lines.append(f"  D = 20·N rule:        N = {a['params']:.3g} params, D = {a['tokens']:.3g} tokens, "
                     f"predicted loss {a['loss']:.3f}")
        lines.append(f"  L(N,D) fit optimum:   N = {b['params']:.3g} params, D = {b['tokens']:.3g} tokens, "
                     f"predicted loss {b['loss']:.3f}")
    if "model" in r:
        m = r["model"]
        lines.append(f"N = {m['params']:.3g} params, D = {m['tokens']:.3g} tokens ({m['tokens_per_param']:.3g} per "
                     f"param; compute-optimal ≈ {m['compute_optimal_tokens']:.3g}): {m['flops']:.3g} FLOPs, "
                     f"predicted loss {m['loss']:.3f}")
    c = r["constants"]
    lines.append(f"L(N,D) = {c['E']} + {c['A']}/N^{c['alpha']} + {c['B']}/D^{c['beta']} (Hoffmann et al. 2022)")
    return "\n".join(lines)
