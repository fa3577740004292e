"""Training memory: the arithmetic of how much memory a fine-tuning job needs, and the per-device policy
that picks gradient checkpointing and micro-batch x accumulation so a run fits a memory budget.

The arithmetic (model shape, parameter counts, the memory model) is the estimator's
(``tunelab estimate``, tunelab/advise/estimate.py re-exports it); it lives here because training uses it
too: the SFT recipe asks it, before the Trainer is built, which micro-batch and checkpointing fit
``train.memory_budget_gb`` (:func:`plan_memory`). The memory model counts, in bytes:

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
(docs/advise.md has the table). The sum is the peak if every part were alive at once. Framework overhead
(CUDA context ~0.5-1 GB, the Python process) is reported apart. The test
``tests/unit/test_estimate_measured.py`` checks the total against peak memory measured in real training
runs of this project.

``cfg`` in the functions below is any object with the fields of ``tunelab.advise.estimate.EstimateConfig``
(:class:`Job` here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.train.distributed import world_size

FUSED_LORA_METHODS = ("lora", "rslora")  # the recipe methods the fused LoRA linear serves (_cpu_speed.py)

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


# ----------------------------------------------------------------------------- the memory model

def _bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def cpu_fast_path(cfg) -> bool:
    """Whether the estimate models the SFT recipe's CPU speed-ups (tunelab/train/_cpu_speed.py)."""
    if cfg.cpu_speedups is None:
        return cfg.device == "cpu" and cfg.precision == "bf16" and cfg.method == "lora"
    if cfg.cpu_speedups and (cfg.method != "lora" or cfg.precision != "bf16"):
        raise TunelabError("cpu_speedups apply to LoRA under bf16 only (the sft recipe's CPU path)")
    return cfg.cpu_speedups


def fused_lora_path(cfg) -> bool:
    """Whether the estimate models the fused LoRA linear of CPU training (tunelab/train/_cpu_speed.py): in fp32,
    or under bf16 with the frozen base in bf16 (the CPU fast path). The dropout mask as bits per adapted input
    instead of a masked copy, and under bf16 one cast of a layer input shared by q/k/v and by gate/up.
    ``fused_lora`` (a :class:`Job` field; the estimator has none and gets the default) is False where the recipe
    does not use it (DoRA, ``train.speedups: off``)."""
    return cfg.device == "cpu" and cfg.method == "lora" and getattr(cfg, "fused_lora", True) and (
        cfg.precision == "fp32" or cpu_fast_path(cfg))


# The frozen LM head's NLL is computed this many tokens at a time (tunelab/train/numerics.py)
HEAD_CHUNK = 512


def memory(cfg, s: Shape) -> dict:
    """Peak training memory per device by component, in bytes (see the module docstring)."""
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
        # chunk (frozen_head_nll) and keeps only the fp32 gradient of its input; its buffers for one chunk of
        # logits (16-bit matmul output, also reused for the 16-bit probabilities, and an fp32 copy) and the
        # head's 16-bit copy are kept from step to step
        acts_edges = tokens * 4 * s.hidden + loss_tokens * 4 * s.hidden
        logits = min(HEAD_CHUNK, loss_tokens) * s.vocab * ((2 + 4) if half else 4) + (head * 2 if half else 0)
    total = weights + copies + grads + optim + acts_layers + acts_edges + logits
    return {"params": N, "trainable_params": trainable, "weights": weights, "autocast_weight_copies": copies,
            "gradients": grads, "optimizer_states": optim, "activations": acts_layers + acts_edges,
            "logits": logits, "activation_bytes_per_token_per_layer": per_layer, "total": total}


def _layers_plain(layers: int, every: int) -> int:
    """Layers whose activations are all kept (transformers checkpoints layers idx % every == 0)."""
    if every <= 0:
        return layers
    return layers - len(range(0, layers, every))


def layer_activation_bytes(s: Shape, cfg, targets: list[str]) -> int:
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
    # (with LoRA the frozen base op needs no input for its weight gradient, but lora_A's op casts its own);
    # the fused LoRA linear casts each distinct input once
    fused = bool(targets) and fused_lora_path(cfg)
    recompute = cfg.device == "cpu" and getattr(cfg, "speedups", True)
    lin_in = (3 * h + q + 2 * h + i) if half and not fused else (h + q + h + i)
    if fused:  # q/k/v and gate/up keep their norm's input (kept by the norm) and recompute the norm in backward;
        # down_proj keeps gate and up (kept by the recomputed MLP) and recomputes act(gate)·up (_cpu_speed.recomputable)
        lin_in -= 2 * h + i
    if cpu_fast_path(cfg):
        # checkpointed eager attention keeps its inputs for the recomputation: q cast to bf16 after the fp32
        # rotary embedding (the cast autocast makes for the first matmul), k in fp32, v in bf16; the heads x seq
        # probabilities are recomputed, not kept
        attn = 2 * q + 4 * kv + 2 * kv
    elif cfg.attention == "eager":
        attn = (q + 2 * kv) * a + s.heads * cfg.seq_len * a
    else:  # sdpa keeps q, k, v and its output; o_proj's input is that output, except under autocast
        # with a LoRA o_proj, whose peft forward casts it to the adapter's fp32 and autocast back to 16 bits
        attn = (q + 2 * kv) * a + (q * a if half and "o_proj" in targets else 0)
    # gate, up, act(gate) outputs (act·up is down_proj's input, counted in lin_in); bitsandbytes' 4-bit
    # linear returns its output in its input's dtype, the fp32 of the residual stream, so QLoRA keeps them in fp32.
    # The CPU speed-ups recompute act(gate) in backward (_cpu_speed._SwiGLU): gate and up only
    mlp = (2 if recompute else 3) * i * (4 if cfg.method == "qlora" else a)
    extra = 0
    if fused:  # the fused LoRA linear keeps the layer input (counted in lin_in), the
        # dropout mask as bits per adapted linear and the r-wide intermediate (in the matmul dtype)
        lin = _linears(s)
        extra = sum((lin[t][0] / 8 if cfg.lora_dropout > 0 else 0) + cfg.lora_r * a for t in targets)
    elif targets:  # LoRA: dropout output (an input-sized copy) and the r-wide intermediate per adapted linear
        lin = _linears(s)
        extra = sum((lin[t][0] if cfg.lora_dropout > 0 else 0) * 4 + cfg.lora_r * a for t in targets)
    return norms + lin_in * a + attn + mlp + extra


# ----------------------------------------------------------------------------- fitting a run into a budget

# Share of the machine's RAM (CPU) or of the GPU's memory a run may use when train.memory_budget_gb is unset.
# Half the RAM leaves the rest to the operating system, the page cache and whatever else the machine runs.
DEFAULT_RAM_SHARE = 0.5
DEFAULT_GPU_SHARE = 0.9

# CPU: the memory model counts the tensors alive at the peak; a process's resident size is more than that.
# (1) What the training machinery adds once the model is loaded (the Trainer, the optimizer, the autograd
# engine's and oneDNN's buffers): CPU_TRAINING_OVERHEAD_GB. (2) The allocator: glibc serves freed activation
# buffers again from a heap it does not shrink, and raises its mmap threshold (up to 32 MiB) each time a mapped
# block is freed, so the resident size grows beyond what is alive. Measured on LoRA SFT of SmolLM2-135M in fp32
# at 8 x 512 tokens on 2 cores (docs/methods/sft.md): the memory model 7.59 GiB, peak RSS 10.83 GiB after 2
# steps. CPU_RESIDENT_FACTOR scales the model's total to the resident size; both constants are calibrated
# against measured runs (that one and tests/unit/test_memory_fit_measured.py), not derived. The overhead was
# 0.25 GB until the LoRA dropout mask stopped making float copies of itself (2026-12-06): then the small run of
# test_memory_fit_measured peaked at 0.71 GB against 0.90 predicted (0.79x; 0.73 GB before the change), while
# SmolLM2 at batch 8 of ~140 tokens (bench/sft_vs_trl.py, default config) peaked at 3.58 GB against 3.41-3.61
# predicted; 0.15 GB puts the first at 0.89x and keeps the second at 1.02-1.08x.
CPU_TRAINING_OVERHEAD_GB = 0.15
CPU_RESIDENT_FACTOR = 1.35


@dataclass(frozen=True)
class Job:
    """What the memory model needs to know of a training run (the fields of the estimator's EstimateConfig)."""

    method: str = "lora"  # full | lora | qlora
    batch_size: int = 8
    seq_len: int = 512
    loss_share: float = 1.0
    precision: str = "fp32"
    weights_dtype: str = "fp32"
    checkpoint_every: int = 0
    optimizer: str = "adamw"
    attention: str = "sdpa"
    cpu_speedups: bool | None = None
    lora_r: int = 8
    lora_targets: list[str] | str = "all-linear"
    lora_dropout: float = 0.05
    device: str | None = None
    fused_lora: bool = True  # CPU LoRA through the fused linear (False: DoRA, or train.speedups: off)
    speedups: bool = True  # train.speedups is not off (on CPU: the MLP's act(gate) recomputed in backward)


@dataclass(frozen=True)
class MemoryPlan:
    """The micro-batch, gradient accumulation and checkpointing a run trains with, and why."""

    micro_batch: int
    grad_accum: int
    checkpoint_every: int
    estimate_gb: float | None  # predicted peak for this choice (CPU: resident memory of the process)
    budget_gb: float | None
    budget_from: str
    chosen: bool  # False: the recipe's own values, as set (or no memory model for this run)
    fits: bool | None
    why: str

    def line(self) -> str:
        ck = {0: "off", 1: "every layer"}.get(self.checkpoint_every, f"every {self.checkpoint_every} layers")
        est = f"estimated peak {self.estimate_gb:.2f} GB" if self.estimate_gb is not None else "no estimate"
        bud = f"budget {self.budget_gb:.2f} GB ({self.budget_from})" if self.budget_gb is not None else "no budget"
        return (f"memory: {est}, {bud}: micro-batch {self.micro_batch} x {self.grad_accum} accumulation, "
                f"gradient checkpointing {ck} ({self.why})")

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def memory_budget(setting_gb: float | None, device: str) -> tuple[float, str]:
    """The memory budget in GB (1024**3 bytes) and where it came from: ``train.memory_budget_gb`` when set, else
    a share of the machine's RAM (CPU: :data:`DEFAULT_RAM_SHARE`, capped by the memory available now) or of the
    GPU's memory (:data:`DEFAULT_GPU_SHARE`)."""
    if setting_gb is not None:
        return float(setting_gb), "train.memory_budget_gb"
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / GB
        return DEFAULT_GPU_SHARE * total, f"{DEFAULT_GPU_SHARE:.0%} of the GPU's {total:.1f} GB"
    import psutil

    vm = psutil.virtual_memory()
    share = DEFAULT_RAM_SHARE * vm.total / GB
    if vm.available / GB < share:
        return vm.available / GB, (f"the {vm.available / GB:.1f} GB available now (less than "
                                   f"{DEFAULT_RAM_SHARE:.0%} of {vm.total / GB:.1f} GB RAM)")
    return share, f"{DEFAULT_RAM_SHARE:.0%} of {vm.total / GB:.1f} GB RAM"


def resident_gb() -> float:
    """This process's resident memory now, in GB."""
    import psutil

    return psutil.Process().memory_info().rss / GB


def predicted_gb(job: Job, shape: Shape, device: str, runtime_gb: float) -> float:
    """Predicted peak memory of a run in GB: on CPU the process's resident size (``runtime_gb``, what the process
    held before the model was loaded, plus :data:`CPU_TRAINING_OVERHEAD_GB` and the memory model's total times
    :data:`CPU_RESIDENT_FACTOR`); on a GPU
    the memory model's total."""
    total = memory(job, shape)["total"] / GB
    return runtime_gb + CPU_TRAINING_OVERHEAD_GB + CPU_RESIDENT_FACTOR * total if device == "cpu" else total


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _micro_batches(batch_size: int, micro_batch: int | None) -> list[int]:
    """The micro-batches to consider, largest first: the one set, else the divisors of the batch."""
    if micro_batch is not None:
        return [micro_batch]
    return _divisors_desc(batch_size)


def plan_memory(job: Job, shape: Shape, *, device: str, batch_size: int, grad_accum: int,
                micro_batch: int | None, checkpoint_every: int, checkpoint_set: bool, budget_gb: float,
                budget_from: str, runtime_gb: float = 0.0) -> MemoryPlan:
    """Pick micro-batch x accumulation and gradient checkpointing so the predicted peak fits ``budget_gb``.

    The examples per optimizer step (``batch_size x grad_accum``) never change: a micro-batch ``m`` divides
    ``batch_size`` and accumulation becomes ``grad_accum x batch_size / m``, so the loss and the update are
    the same (the loss is summed over the step's label tokens and divided by their count, across micro-batches).
    Values the user set win: ``micro_batch`` (train.micro_batch_size) when not None, checkpointing when
    ``checkpoint_set``; if nothing fits, the smallest choice is taken and ``fits`` is False (the caller warns).

    Order of preference: the recipe's values; then, on CPU, smaller micro-batches before checkpointing
    (measured on a 2-core Xeon without AMX, SmolLM2-135M LoRA at batch 8 of ~140 tokens: micro-batch 4 ran at
    0.92x and micro-batch 2 at 0.78x the whole batch's tokens/s, while checkpointing recomputes the
    forward pass), and on a GPU checkpointing every layer before smaller micro-batches (a smaller batch
    leaves the GPU idle; recomputation costs ~1/3 of a step).
    """
    def pred(m: int, ck: int) -> float:
        return predicted_gb(Job(**{**job.__dict__, "batch_size": m, "checkpoint_every": ck}), shape, device,
                            runtime_gb)

    ms = _micro_batches(batch_size, micro_batch)
    # on CPU partial checkpointing (every 2nd layer) before every layer: a budget is met with less recompute
    cks = [checkpoint_every] if checkpoint_set else \
        list(dict.fromkeys([checkpoint_every, *([2] if device == "cpu" else []), 1]))
    if device == "cpu":
        order = [(m, ck) for ck in cks for m in ms]
    else:
        order = [(m, ck) for m in ms for ck in cks]
    first = order[0]
    for m, ck in order:
        est = pred(m, ck)
        if est <= budget_gb:
            accum = grad_accum * batch_size // m
            if (m, ck) == first:
                why = "fits as set" if micro_batch is not None or checkpoint_set else "fits without splitting"
            else:
                changed = []
                if m != first[0]:
                    start = "the unsplit batch" if first[0] == batch_size else f"micro-batch {first[0]}"
                    changed.append(f"micro-batch {m} of the {batch_size} examples per step ({start} needs "
                                   f"{pred(first[0], first[1]):.2f} GB)")
                if ck != first[1]:
                    changed.append("gradient checkpointing to fit")
                why = "; ".join(changed)
            return MemoryPlan(m, accum, ck, est, budget_gb, budget_from, (m, ck) != first,
                              True, why)
    # nothing fits: the least memory there is, and say so
    m, ck = min(order, key=lambda c: pred(*c))
    set_ = [s for s, on in (("train.micro_batch_size", micro_batch is not None),
                            ("train.gradient_checkpointing", checkpoint_set)) if on]
    fix = f"unset {' and '.join(set_)} so they are chosen, or " if set_ else ""
    return MemoryPlan(m, grad_accum * batch_size // m, ck, pred(m, ck), budget_gb, budget_from,
                      (m, ck) != first, False,
                      f"does not fit: {fix}lower data.max_length, or raise train.memory_budget_gb")


_ESTIMATOR_METHOD = {"full": "full", "lora": "lora", "rslora": "lora", "dora": "lora", "qlora": "qlora"}


def sft_memory_plan(cfg, dplan, checkpoint_every: int, train_stats: dict, model_path: str | Path,
                    runtime_gb: float) -> MemoryPlan:
    """The SFT recipe's memory plan (:func:`plan_memory`) for its config ``cfg``, device plan ``dplan``, the
    per-device checkpointing default ``checkpoint_every``, and the tokenized training data's stats (the
    longest example is the padded length of the largest batch: length-grouped batches put it first). LoRA under
    bf16 on a CPU is modelled with the recipe's CPU speed-ups (:func:`cpu_fast_path`)."""
    t = cfg.train
    budget, source = memory_budget(t.memory_budget_gb, dplan.device)
    m0 = _micro_batches(t.batch_size, t.micro_batch_size)[0]
    as_set = MemoryPlan(m0, t.grad_accum * t.batch_size // m0, checkpoint_every, None, budget, source, False, None,
                        "")
    method = _ESTIMATOR_METHOD.get(cfg.method)
    targets = cfg.lora.target_modules
    if world_size() > 1:  # each rank would measure and choose alone: a different accumulation per rank hangs DDP
        return _replace(as_set, why="as set: under --nproc the ranks keep the recipe's micro-batch (or the whole "
                                    "batch)")
    if method is None:
        return _replace(as_set, why=f"as set: no memory model for method {cfg.method}")
    if method != "full" and targets != "all-linear" and not set(targets) <= set(LINEAR_NAMES):
        return _replace(as_set, why=f"as set: no memory model for LoRA targets {targets}")
    try:
        shape = model_shape(str(model_path))
    except TunelabError as e:
        return _replace(as_set, why=f"as set: {e}")
    tokens = max(train_stats["tokens"], 1)
    job = Job(method=method, seq_len=max(train_stats["length_max"], 1),
              loss_share=min(1.0, max(train_stats["label_tokens"], 1) / tokens), precision=dplan.precision,
              lora_r=cfg.lora.r, lora_targets=targets,
              lora_dropout=cfg.lora.dropout, device="cpu" if dplan.device == "cpu" else None,
              fused_lora=cfg.method in FUSED_LORA_METHODS and cfg.train.speedups != "off",
              speedups=cfg.train.speedups != "off")
    return plan_memory(job, shape, device=dplan.device, batch_size=t.batch_size, grad_accum=t.grad_accum,
                       micro_batch=t.micro_batch_size, checkpoint_every=checkpoint_every,
                       checkpoint_set=t.gradient_checkpointing is not None, budget_gb=budget, budget_from=source,
                       runtime_gb=runtime_gb if dplan.device == "cpu" else 0.0)


def _replace(plan: MemoryPlan, **kw) -> MemoryPlan:
    from dataclasses import replace

    return replace(plan, **kw)
