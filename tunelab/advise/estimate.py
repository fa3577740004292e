"""Before a run: how much memory, compute, time and money a fine-tuning job needs, and what a
compute budget buys (Chinchilla scaling).

    tunelab estimate --model smollm2-135m --method lora --batch-size 8 --seq-len 512 --tokens 2e6 --device a100-80gb

Everything here is arithmetic on the model's shape (read from an HF ``config.json`` or a preset),
so it answers in milliseconds without torch. The memory model counts, in bytes:

- weights: every parameter in its load dtype (fp32 master weights by default: what tunelab's
  recipes load), or 4-bit NF4 for QLoRA's quantized linear layers plus their quantization constants;
- autocast copies: under bf16/fp16 mixed precision each linear op casts its fp32 weight to 16 bits
  and autograd keeps that copy for the backward pass (torch.autocast; the copy of a trainable leaf
  is also cached for the whole forward);
- gradients and optimizer states of the *trainable* parameters (AdamW: two fp32 moments);
- activations saved for backward, per decoder layer per token (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", eq. 1, without dropout, adapted
  to a SwiGLU MLP, grouped-query attention, fp32 RMSNorm and autocast's per-op input casts), with
  gradient checkpointing of every k-th layer; plus the fp32 logits over the loss tokens.

LoRA under bf16 on a CPU takes the SFT recipe's speed-ups (frozen base in bf16, checkpointed eager
attention; ``cpu_speedups``), and a frozen LM head's NLL is computed in chunks; both change the terms
(docs/advise.md has the table). The sum is the peak if every part were alive at once. Framework overhead (CUDA context ~0.5-1 GB, the Python process)
is reported apart. The test ``tests/unit/test_estimate_measured.py`` checks the total against peak
memory measured in real training runs of this project.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunelab.config import Strict
from tunelab.errors import TunelabError
from tunelab.train.device import cpu_precision

GB = 1024**3


# ----------------------------------------------------------------------------- model shape

@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer of the Llama family (Llama, Mistral, Qwen2, SmolLM, Gemma-like)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd


# Shapes copied from each model's published config.json (vocab_size, hidden_size,
# intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, tie_word_embeddings).
PRESETS: dict[str, Shape] = {
    "smollm2-135m": Shape(49152, 576, 1536, 30, 9, 3, True),
    "smollm2-360m": Shape(49152, 960, 2560, 32, 15, 5, True),
    "smollm2-1.7b": Shape(49152, 2048, 8192, 24, 32, 32, True),
    "qwen2.5-0.5b": Shape(151936, 896, 4864, 24, 14, 2, True),
    "llama-3.2-1b": Shape(128256, 2048, 8192, 16, 32, 8, True, 64),
    "llama-3.2-3b": Shape(128256, 3072, 8192, 28, 24, 8, True, 128),
    "llama-3.1-8b": Shape(128256, 4096, 14336, 32, 32, 8, False),
    "mistral-7b": Shape(32000, 4096, 14336, 32, 32, 8, False),
    "llama-2-7b": Shape(32000, 4096, 11008, 32, 32, 32, False),
    "llama-2-13b": Shape(32000, 5120, 13824, 40, 40, 40, False),
    "llama-3.1-70b": Shape(128256, 8192, 28672, 80, 64, 8, False),
}
PRESETS["smollm2-135m-instruct"] = PRESETS["smollm2-135m"]


def shape_from_config(cfg: dict) -> Shape:
    """A Shape from an HF config dict (Llama-style keys)."""
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise TunelabError(f"config.json lacks {', '.join(missing)}: the estimator knows Llama-style decoders "
                           f"(model_type {cfg.get('model_type', '?')})")
    return Shape(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                 cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                 bool(cfg.get("tie_word_embeddings", False)), cfg.get("head_dim"))


def model_shape(model: str, workspace=None) -> Shape:
    """A preset name, an HF folder (or its config.json), or a pulled model in the workspace cache."""
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return shape_from_config(json.loads(p.read_text(encoding="utf-8")))
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]
    if workspace is not None:
        cached = workspace.models_dir / model / "config.json"
        if cached.is_file():
            return shape_from_config(json.loads(cached.read_text(encoding="utf-8")))
    raise TunelabError(f"unknown model '{model}': give an HF folder with config.json or one of "
                       f"{', '.join(sorted(PRESETS))}")


def param_counts(s: Shape) -> dict[str, int]:
    """Parameters by kind (no biases: Llama-family linears have none)."""
    attn = s.hidden * s.q_dim * 2 + s.hidden * s.kv_dim * 2  # q, o; k, v
    mlp = 3 * s.hidden * s.intermediate  # gate, up, down (SwiGLU)
    per_layer_linear = attn + mlp
    embed = s.vocab * s.hidden
    head = 0 if s.tied else s.vocab * s.hidden
    norms = s.layers * 2 * s.hidden + s.hidden
    total = embed + head + s.layers * per_layer_linear + norms
    return {"total": total, "embedding": embed, "lm_head": head, "decoder_linear": s.layers * per_layer_linear,
            "norms": norms, "per_layer_linear": per_layer_linear}


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linears(s: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear in a decoder layer."""
    h, i = s.hidden, s.intermediate
    return {"q_proj": (h, s.q_dim), "k_proj": (h, s.kv_dim), "v_proj": (h, s.kv_dim), "o_proj": (s.q_dim, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _targets(targets: list[str] | str) -> list[str]:
    if targets == "all-linear":
        return list(LINEAR_NAMES)
    names = [targets] if isinstance(targets, str) else list(targets)
    bad = [t for t in names if t not in LINEAR_NAMES]
    if bad:
        raise TunelabError(f"lora_targets: {', '.join(bad)} unknown; use all-linear or of {', '.join(LINEAR_NAMES)}")
    return names


def lora_params(s: Shape, r: int, targets: list[str] | str = "all-linear") -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted linear of each layer (Hu et al. 2021)."""
    lin = _linears(s)
    return s.layers * sum(r * (lin[t][0] + lin[t][1]) for t in _targets(targets))


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


def _bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def cpu_fast_path(cfg: EstimateConfig) -> bool:
    """Whether the estimate models the SFT recipe's CPU speed-ups (tunelab/train/_cpu_speed.py)."""
    if cfg.cpu_speedups is None:
        return cfg.device == "cpu" and cfg.precision == "bf16" and cfg.method == "lora"
    if cfg.cpu_speedups and (cfg.method != "lora" or cfg.precision != "bf16"):
        raise TunelabError("cpu_speedups apply to LoRA under bf16 only (the sft recipe's CPU path)")
    return cfg.cpu_speedups


# The frozen LM head's NLL is computed this many tokens at a time (tunelab/train/numerics.py)
HEAD_CHUNK = 512


def memory(cfg: EstimateConfig, s: Shape) -> dict:
    """Peak training memory per device by component, in bytes (see the module docstring)."""
    cfg = _resolved(cfg)
    pc = param_counts(s)
    N = pc["total"]
    wb = _bytes(cfg.weights_dtype)
    half = cfg.precision != "fp32"
    a = 2 if half else 4  # bytes of an activation in the matmuls
    tokens = cfg.batch_size * cfg.seq_len
    targets = _targets(cfg.lora_targets) if cfg.method != "full" else []
    fast = cpu_fast_path(cfg)

    # weights
    if cfg.method == "qlora":
        # NF4: 4 bits per quantized weight; constants: one absmax per 64 weights, themselves 8-bit with an
        # fp32 constant per 256 blocks under double quantization (Dettmers et al. 2023, sec. 3: 0.127 bits/param)
        quant = pc["decoder_linear"]
        weights = quant * (0.5 + 0.127 / 8) + (N - quant) * wb
    elif fast:  # FrozenBf16: the frozen decoder linears are held in bf16 while training
        weights = pc["decoder_linear"] * 2 + (N - pc["decoder_linear"]) * wb
    else:
        weights = N * wb
    lora = lora_params(s, cfg.lora_r, targets) if targets else 0
    trainable = N if cfg.method == "full" else lora
    weights += lora * 4  # adapters are kept in fp32 (peft's autocast_adapter_dtype)

    # 16-bit copies of the fp32 matmul weights that autograd keeps for the backward pass
    copies = 0
    head = pc["lm_head"] or pc["embedding"]  # a tied head multiplies by the embedding matrix
    if half and cfg.weights_dtype == "fp32":
        if cfg.method == "full":  # trainable leaves: autocast caches their copies for the whole forward
            copies = (pc["decoder_linear"] + head) * 2
        elif cfg.method == "lora" and not fast:  # frozen: one copy per op, saved unless the layer is checkpointed
            kept = _layers_plain(s.layers, cfg.checkpoint_every)
            copies = pc["per_layer_linear"] * (kept + (1 if kept < s.layers else 0)) * 2
        # qlora dequantizes per op, and the frozen head's 16-bit copy lives only inside its NLL (below)

    grads = trainable * (wb if cfg.method == "full" else 4)
    optim = trainable * {"adamw": 8, "adamw_8bit": 2, "sgd": 0}[cfg.optimizer]

    per_layer = layer_activation_bytes(s, cfg, targets)
    kept = _layers_plain(s.layers, cfg.checkpoint_every)
    # a checkpointed layer keeps only its fp32 input; in backward one layer is recomputed at a time
    acts_layers = tokens * (kept * per_layer + (s.layers - kept) * 4 * s.hidden
                            + (per_layer if kept < s.layers else 0))
    if fast:
        # checkpointed eager attention recomputes one layer's heads x seq scores in backward: 16-bit scores,
        # fp32 softmax and the 16-bit copy the value matmul takes, then fp32 and 16-bit score gradients
        acts_layers += tokens * s.heads * cfg.seq_len * (2 + 4 + 2 + 4 + 2)
    loss_tokens = math.ceil(tokens * cfg.loss_share)
    if cfg.method == "full":
        # embedding output and final norm (fp32 residual stream), and the logits over loss tokens:
        # the fp32 log-softmax output and its gradient, both alive when backward starts
        acts_edges = tokens * 3 * 4 * s.hidden
        logits = loss_tokens * s.vocab * (4 + 4 + (a if half else 0))
    else:
        # frozen norms and head: the final norm keeps its fp32 input; the head's NLL is computed chunk by
        # chunk (frozen_head_nll) and keeps only the fp32 gradient of its input; in passing one chunk of
        # logits (16-bit matmul output, fp32 copy, 16-bit probabilities) and the head's 16-bit copy
        acts_edges = tokens * 4 * s.hidden + loss_tokens * 4 * s.hidden
        logits = min(HEAD_CHUNK, loss_tokens) * s.vocab * ((2 + 4 + 2) if half else 4) + (head * 2 if half else 0)
    total = weights + copies + grads + optim + acts_layers + acts_edges + logits
    return {"params": N, "trainable_params": trainable, "weights": weights, "autocast_weight_copies": copies,
            "gradients": grads, "optimizer_states": optim, "activations": acts_layers + acts_edges,
            "logits": logits, "activation_bytes_per_token_per_layer": per_layer, "total": total}


def _layers_plain(layers: int, every: int) -> int:
    """Layers whose activations are all kept (transformers checkpoints layers idx % every == 0)."""
    if every <= 0:
        return layers
    return layers - len(range(0, layers, every))


def layer_activation_bytes(s: Shape, cfg: EstimateConfig, targets: list[str]) -> int:
    """Bytes one decoder layer saves for backward per token.

    Korthikanti et al. (2022) count 34·h bytes per token for a GPT layer in 16-bit with dropout;
    without dropout and with a SwiGLU MLP and GQA that becomes, in elements: the two norms'
    inputs (2h), the attention inputs of q/k/v and o (2h), q, k, v (q + 2 kv), the MLP input
    (h) and gate, up, act(gate), act·up (4i). RMSNorm computes in fp32, so its input and
    normalized output are fp32 (4 bytes) under autocast too; and autocast casts the input of
    each linear op separately, so q/k/v keep three 16-bit copies and gate/up two.
    """
    h, i, kv, q = s.hidden, s.intermediate, s.kv_dim, s.q_dim
    half = cfg.precision != "fp32"
    a = 2 if half else 4
    # two RMSNorms: fp32 input, and the normalized output when the norm's weight trains (full)
    norms = 2 * h * 4 * (2 if cfg.method == "full" else 1)
    # inputs of q,k,v,o,gate,up,down: under autocast q/k/v and gate/up each keep their own 16-bit cast
    # (with LoRA the frozen base op needs no input for its weight gradient, but lora_A's op casts its own)
    lin_in = (3 * h + q + 2 * h + i) if half else (h + q + h + i)
    if cpu_fast_path(cfg):
        # checkpointed eager attention keeps its inputs for the recomputation: q and k after the fp32
        # rotary embedding, v in bf16; the heads x seq probabilities are recomputed, not kept
        attn = 4 * q + 4 * kv + 2 * kv
    elif cfg.attention == "eager":
        attn = (q + 2 * kv) * a + s.heads * cfg.seq_len * a
    else:  # sdpa keeps q, k, v and its output; o_proj's input is that output, except under autocast
        # with a LoRA o_proj, whose peft forward casts it to the adapter's fp32 and autocast back to 16 bits
        attn = (q + 2 * kv) * a + (q * a if half and "o_proj" in targets else 0)
    # gate, up, act(gate) outputs (act·up is down_proj's input, counted in lin_in); bitsandbytes' 4-bit
    # linear returns its output in its input's dtype, the fp32 of the residual stream, so QLoRA keeps them in fp32
    mlp = 3 * i * (4 if cfg.method == "qlora" else a)
    extra = 0
    if targets:  # LoRA: dropout output (an input-sized copy) and the r-wide intermediate per adapted linear
        lin = _linears(s)
        extra = sum((lin[t][0] if cfg.lora_dropout > 0 else 0) * 4 + cfg.lora_r * a for t in targets)
    return norms + lin_in * a + attn + mlp + extra


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
