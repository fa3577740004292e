"""Per-device defaults: what is fast and safe where the run happens.

On CPU, bf16 autocast is only a win with AMX (measured: ~5x faster matmuls with AMX-bf16,
but 0.8x the fp32 speed on an AVX512-bf16 CPU without AMX), and gradient checkpointing
costs ~1.5x time for memory a small model does not need, so neither is forced on CPU by plan().
SFT adds its own measured choices below (checkpoint_every, padding_free; docs/methods/sft.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tunelab.environment import cpu_flags

log = logging.getLogger("tunelab.device")

# bf16 arithmetic in hardware: AMX tiles, or AVX-512 dot products. Without either (e.g. AVX2-only CPUs) bf16
# autocast is emulated; measured on an AMD EPYC with AVX2 only (bench/sft_vs_trl.py, docs/methods/sft.md):
# TRL's bf16 defaults 5.1 tokens/s against tunelab's fp32 default 189.9.
CPU_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda" | "mps" | "cpu"
    precision: str  # "fp32" | "bf16" | "fp16"
    gradient_checkpointing: bool
    why: str


def cpu_precision() -> tuple[str, str]:
    """The precision training picks on this machine's CPU, and why (also what ``tunelab estimate --device cpu``
    reports, so the estimate and the trainer cannot disagree)."""
    amx = "amx_bf16" in cpu_flags()
    if amx:
        return "bf16", "CPU with AMX-bf16: bf16 autocast"
    return "fp32", "CPU without AMX: fp32 (bf16 autocast is slower here)"


def plan(precision: str = "auto", gradient_checkpointing: bool | None = None) -> DevicePlan:
    import torch

    if torch.cuda.is_available():
        dev = "cuda"
        auto = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        why = f"GPU {torch.cuda.get_device_name(0)}: {auto} mixed precision"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        dev, auto, why = "mps", "fp32", "Apple GPU: fp32"
    else:
        dev = "cpu"
        auto, why = cpu_precision()
    chosen = auto if precision == "auto" else precision
    if precision != "auto":
        why = f"{why}; precision set to {precision} by the recipe"
        if dev == "cpu" and chosen == "bf16" and not cpu_flags() & CPU_BF16_FLAGS:
            why += (" (warning: this CPU has no bf16 instructions, neither AMX nor AVX-512-bf16, so bf16 is "
                    "emulated: TRL's bf16 defaults trained 37x slower than tunelab's fp32 on such a CPU; unset "
                    "train.precision for fp32)")
            log.warning("precision bf16 on a CPU without bf16 instructions: expect a far slower run than fp32")
    gc = bool(gradient_checkpointing) if gradient_checkpointing is not None else False
    return DevicePlan(dev, chosen, gc, why)



# Measured for SFT of SmolLM2-135M with LoRA on 2 AMX cores, with the CPU speed-ups of
# train/_cpu_speed.py (bench/sft_vs_trl.py, medians of 2 alternating rounds, docs/methods/sft.md):
# no checkpointing 253.9 tokens/s at 3.74 GB peak RSS, every 3rd decoder layer 183.0 at 3.36 GB,
# every 2nd layer 199.6 at 3.13 GB (TRL's defaults: 3.20 GB). Every 2nd layer keeps the peak under
# TRL's defaults; set train.gradient_checkpointing: false for the fastest run when memory allows.
CPU_BF16_CHECKPOINT_EVERY = 2


# A padding-free row of L tokens gets a dense L x L block-causal mask under sdpa/eager attention, and
# attention then runs over the whole row, masked blocks included. Measured on 2 AMX cores
# (SmolLM2-135M, LoRA, bf16, 8 examples of ~120 tokens, docs/methods/sft.md): 1.7x slower than the
# padded batch, at the same peak memory. Only a varlen kernel (flash attention, which reads the
# example boundaries from position ids) skips the cross-example blocks.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", "kernels-community/vllm-flash-attn3")


def padding_free(choice: bool | str, dplan: DevicePlan, attn_implementation: str | None) -> tuple[bool, str]:
    """Whether SFT batches go padding-free (one unpadded row, per-example position ids), and why.

    ``choice`` is ``train.padding_free``: True/False as set, or "auto": on only where it is faster,
    i.e. a GPU with a varlen attention kernel; padded (length-grouped) batches elsewhere.
    """
    if choice is True or choice is False:
        return choice, f"set to {str(choice).lower()} by the recipe"
    if dplan.device == "cuda" and str(attn_implementation) in VARLEN_ATTENTION:
        return True, f"auto: {attn_implementation} skips the blocks between examples"
    return False, f"auto: padded is faster with {attn_implementation} attention on {dplan.device}"


def checkpoint_every(requested: bool | None, dplan: DevicePlan) -> int:
    """Gradient checkpointing for SFT as "every k-th decoder layer": 0 off, 1 every layer, k > 1 partial.

    ``requested`` is ``train.gradient_checkpointing``: True (all layers) or False as set; None picks
    per device: partial checkpointing under bf16 autocast on CPU (see CPU_BF16_CHECKPOINT_EVERY),
    otherwise what :func:`plan` chose.
    """
    if requested is not None:
        return int(bool(requested))
    if dplan.device == "cpu" and dplan.precision == "bf16":
        return CPU_BF16_CHECKPOINT_EVERY
    return int(dplan.gradient_checkpointing)
