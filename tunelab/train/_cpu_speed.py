"""Three measured changes that make adapter training on a CPU faster without changing what is learned.

Profiled on 2 AMX cores (SmolLM2-135M, LoRA r=16 on all linear layers, dropout 0.05, batch 8,
bf16 autocast; one training step, torch.profiler; docs/methods/sft.md has the table):

1. **LoRA dropout masks.** ``nn.Dropout`` draws its mask with ``bernoulli_``, which on CPU runs on one
   thread at ~10 ns an element: 29% of the whole step (210 masks of ~1M elements). :class:`FastDropout`
   draws the same Bernoulli(1 - p) mask from numpy's PCG64 (32 random bits an element, seeded from
   torch's generator so seeded runs repeat) at ~1 ns an element. Same distribution, same scaling
   1/(1 - p), identity in eval mode; the saved adapter does not contain dropout modules.
2. **Frozen base weights in bf16.** Under bf16 autocast every linear layer casts its fp32 weight to
   bf16 on each forward pass (and keeps the copy for backward). The frozen base weights of a LoRA
   model are only ever used that way, so :class:`FrozenBf16` stores them in bf16 for training:
   the matmuls see exactly the same bf16 values, the casts and copies are gone. The original fp32
   weights are written to a temporary file first and put back after training, so probes,
   evaluation and merges use the untouched base.
3. **Eager attention, checkpointed.** The CPU backward of SDPA's flash kernel in bf16 took 1.0 s of a
   6.9 s step (30 calls); the model's own eager attention (two matmuls and a softmax) took a fraction
   of that. Eager attention keeps the [heads x tokens x tokens] probabilities for backward (the
   largest activation of a layer at 256 tokens), so :func:`checkpointed_eager_attention` runs it
   under activation checkpointing: only q, k, v are kept and the cheap softmax is recomputed.

Each is applied only where it was measured to help: CPU training under bf16 autocast.
"""

from __future__ import annotations

# Imported only from inside recipe run() functions (which load torch anyway): top-level imports are fine.
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


class _MaskedScale(torch.autograd.Function):
    """y = (x * keep / (1 - p)) in ``out_dtype``; saves only the bool mask (1 byte an element) for backward.

    nn.Dropout under autocast keeps a mask and an fp32 output, and the next matmul keeps a bf16 copy of
    it (6 bytes an element); emitting the bf16 result here (computed in fp32, then rounded: the
    values autocast would produce) leaves 3. Backward: grad_x = grad_y * keep / (1 - p), as nn.Dropout.
    """

    @staticmethod
    def forward(ctx, x, keep, scale: float, out_dtype):
        ctx.save_for_backward(keep)
        ctx.scale, ctx.x_dtype = scale, x.dtype
        return (x * keep * scale).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad.to(ctx.x_dtype) * keep * ctx.scale), None, None, None


class FastDropout(torch.nn.Module):
    """Inverted dropout with the mask drawn by numpy's PCG64 (fast on CPU); identity in eval mode.

    Under autocast the output is in the autocast dtype (what the following LoRA matmul would cast it to).
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        # P(drop) = thr / 2**32 with 32-bit uniforms: p to within 2.3e-10
        self._thr = np.uint32(min(round(self.p * 2 ** 32), 2 ** 32 - 1))

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        seed = int(torch.randint(0, 2 ** 62, (1,)))  # from torch's generator: transformers.set_seed repeats it
        bits = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(4 * x.numel()), dtype=np.uint32)
        keep = torch.from_numpy(bits >= self._thr).view(x.shape)
        dev = x.device.type
        out = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and x.is_floating_point() else x.dtype
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p), out)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_lora_dropout(model) -> int:
    """Swap every LoRA dropout (``nn.Dropout`` with p > 0) in a peft model for :class:`FastDropout`; returns how many."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name in list(drops.keys()):
            d = drops[name]
            if isinstance(d, torch.nn.Dropout) and d.p > 0:
                drops[name] = FastDropout(d.p)
                n += 1
    return n


class FrozenBf16:
    """Store a peft model's frozen base ``nn.Linear`` weights in bf16 while training; restore fp32 after.

        frozen = FrozenBf16(model, workdir)   # casts; the fp32 originals go to a temp file in workdir
        trainer.train()
        frozen.restore()                      # the exact fp32 weights back (also on error: call in finally)

    Only weights that are frozen (``requires_grad=False``) and belong to a LoRA layer's ``base_layer``
    are cast: trainable parameters, embeddings, norms and the LM head keep their dtype.
    """

    def __init__(self, model, workdir: str | Path):
        from safetensors.torch import save_file

        self._params: dict[str, torch.nn.Parameter] = {}
        for name, module in model.named_modules():
            base = getattr(module, "base_layer", None)
            if isinstance(base, torch.nn.Linear) and not base.weight.requires_grad and base.weight.dtype == torch.float32:
                self._params[f"{name}.base_layer.weight"] = base.weight
        fd, path = tempfile.mkstemp(prefix=".fp32-base-", suffix=".safetensors", dir=str(workdir))
        os.close(fd)
        self.path = Path(path)
        save_file({k: p.data.contiguous() for k, p in self._params.items()}, str(self.path))
        for p in self._params.values():
            p.data = p.data.to(torch.bfloat16)
        # transformers loads safetensors weights as views of the memory-mapped file. Reading the frozen
        # weights to cast them pulls the whole file into resident memory, and it stays mapped (and
        # counted) as long as any parameter still views it: copy the parameters left in their dtype
        # (embeddings, norms: a small share) out of the file so the mapping, and the fp32 copy of the
        # weights just cast, are released. Measured on a 17.6M model: 67 MiB less resident memory.
        cast = {id(p) for p in self._params.values()}
        for p in model.parameters():
            if id(p) not in cast:
                p.data = p.data.clone()
        self.count = len(self._params)

    def restore(self) -> None:
        """Put the original fp32 weights back (bit-exact) and delete the temp file; safe to call twice."""
        if not self.path.exists():
            return
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            for k, p in self._params.items():
                p.data = f.get_tensor(k)
        self.path.unlink()


def cpu_bf16_training(dplan) -> bool:
    """Whether the measured CPU speed-ups apply: training on a CPU under bf16 autocast."""
    return dplan.device == "cpu" and dplan.precision == "bf16"


CHECKPOINTED_EAGER = "tunelab_eager_checkpointed"


def checkpointed_eager_attention() -> str:
    """Register (once) and return the name of an ``attn_implementation``: the model's own eager attention
    (``eager_attention_forward`` of its modeling module) run under non-reentrant activation checkpointing,
    with eager's mask. Forward values are eager's exactly; backward recomputes the attention core.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if CHECKPOINTED_EAGER in AttentionInterface._global_mapping:
        return CHECKPOINTED_EAGER

    def attention(module, query, key, value, attention_mask, **kwargs):
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward; "
                               f"load the model with attn_implementation='eager' or 'sdpa'")
        if not torch.is_grad_enabled():
            return eager(module, query, key, value, attention_mask, **kwargs)
        return checkpoint(eager, module, query, key, value, attention_mask, use_reentrant=False, **kwargs)

    AttentionInterface.register(CHECKPOINTED_EAGER, attention)
    AttentionMaskInterface.register(CHECKPOINTED_EAGER, eager_mask)
    return CHECKPOINTED_EAGER
