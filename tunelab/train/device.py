"""Per-device defaults: what is fast and safe where the run happens.

On CPU, bf16 autocast is only a win with AMX (measured: ~5x faster matmuls with AMX-bf16,
but 0.8x the fp32 speed on an AVX512-bf16 CPU without AMX), and gradient checkpointing
costs ~1.5x time for memory a small model does not need, so neither is forced on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.environment import cpu_flags


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda" | "mps" | "cpu"
    precision: str  # "fp32" | "bf16" | "fp16"
    gradient_checkpointing: bool
    why: str


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
        amx = "amx_bf16" in cpu_flags()
        auto = "bf16" if amx else "fp32"
        why = "CPU with AMX-bf16: bf16 autocast" if amx else "CPU without AMX: fp32 (bf16 autocast is slower here)"
    chosen = auto if precision == "auto" else precision
    if precision != "auto":
        why = f"{why}; precision set to {precision} by the recipe"
    gc = bool(gradient_checkpointing) if gradient_checkpointing is not None else False
    return DevicePlan(dev, chosen, gc, why)
