"""Per-device defaults: what is fast and safe where the run happens.

On CPU, bf16 autocast is a win where the hardware computes bf16 matmuls faster than fp32: always with AMX
(~5x), on some AVX512-bf16 CPUs without AMX and not on others (measured: 0.8x fp32 on an Intel Xeon, 2.2x on an
AMD EPYC of the Zen 4 generation), so on those the plan times one bf16 and one fp32 matmul and picks bf16 only
where it is clearly faster. Gradient checkpointing costs ~1.5x time for memory a small model does not need, so
plan() does not force it on CPU.
SFT adds its own measured choices below (checkpoint_every, padding_free; docs/methods/sft.md).
"""

from __future__ import annotations

import functools
import logging
import time
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


# bf16 autocast pays off where bf16 matmuls run at least this much faster than fp32. Measured with SFT of
# SmolLM2-135M (LoRA, bench/sft_vs_trl.py --configs tunelab-fp32,tunelab-bf16-nogc) on an AMD EPYC (Zen 4,
# AVX512-bf16, no AMX): a 2.2x faster bf16 matmul gave 1.47x the fp32 tokens/s; the casts autocast adds cost
# the rest, so a CPU whose bf16 matmul is only slightly faster would gain nothing.
CPU_BF16_MIN_MATMUL_SPEEDUP = 1.5


@functools.lru_cache(maxsize=1)
def cpu_bf16_matmul_speedup(reps: int = 7) -> float:
    """bf16 over fp32 throughput of a matmul the size of a small model's MLP projection (1024 x 576 @ 576 x 1536,
    ~1.8 GFLOP), timed here: the two alternate and the medians are compared, so load from other work hits both.
    Takes well under a second on CPUs with bf16 instructions; measured once per process."""
    import torch

    x, w = torch.randn(1024, 576), torch.randn(1536, 576)
    sides = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    times: dict = {dt: [] for dt in sides}
    with torch.no_grad():
        for _ in range(2):  # warm-up: oneDNN picks and caches its kernels
            for a, b in sides.values():
                torch.nn.functional.linear(a, b)
        for _ in range(reps):
            for dt, (a, b) in sides.items():
                t = time.perf_counter()
                torch.nn.functional.linear(a, b)
                times[dt].append(time.perf_counter() - t)
    med = {dt: sorted(ts)[len(ts) // 2] for dt, ts in times.items()}
    return med[torch.float32] / max(med[torch.bfloat16], 1e-9)


def cpu_precision() -> tuple[str, str]:
    """The precision training picks on this machine's CPU, and why (also what ``tunelab estimate --device cpu``
    reports, so the estimate and the trainer cannot disagree)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "bf16", "CPU with AMX-bf16: bf16 autocast"
    if "avx512_bf16" in flags:
        speedup = cpu_bf16_matmul_speedup()
        if speedup >= CPU_BF16_MIN_MATMUL_SPEEDUP:
            return "bf16", (f"CPU with AVX512-bf16: bf16 autocast (a bf16 matmul timed {speedup:.1f}x fp32's "
                            f"speed here)")
        return "fp32", (f"CPU with AVX512-bf16 but no AMX: fp32 (a bf16 matmul timed {speedup:.1f}x fp32's speed "
                        f"here, under the {CPU_BF16_MIN_MATMUL_SPEEDUP}x where bf16 autocast pays off)")
    return "fp32", "CPU without bf16 instructions: fp32 (bf16 would be emulated, far slower)"


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



# SFT under bf16 autocast on a CPU: no gradient checkpointing and the whole batch at once, unless the memory plan
# needs less (smaller micro-batches first, then checkpointing). Measured for SFT of SmolLM2-135M with LoRA r=16,
# batch 8 (bench/sft_vs_trl.py, medians of 3 alternating rounds, BENCHMARKS.md), AMD EPYC Zen 4 (AVX512-bf16,
# no AMX), 2026-12-07: the whole batch 381.3 tokens/s at 2.41 GB peak RSS, micro-batches of 4 325.9 at 1.90 GB,
# TRL's defaults 3.04 GB; then SwiGLU recomputed in backward took the whole batch to 2.28 GB. Micro-batches of
# 4 were the default for one day, when the whole batch peaked at 2.87 GB (before the fused LoRA linear served
# bf16); checkpointing every 2nd layer before that (256.9 tokens/s at 2.42 GB then).


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

    ``requested`` is ``train.gradient_checkpointing``: True (all layers) or False as set; None is what
    :func:`plan` chose (off on CPU). The memory plan may still turn it on to fit a budget.
    """
    if requested is not None:
        return int(bool(requested))
    return int(dplan.gradient_checkpointing)
