"""Measured changes that make adapter training on a CPU faster or smaller without changing what is learned.

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

Each is applied only where it was measured to help: CPU training under bf16 autocast. One more for fp32 (a
CPU without AMX), measured on 2 Xeon cores without AMX (the demo recipe: SmolLM2-135M, LoRA r=16 on all linear
layers, dropout 0.05, batch 8 of up to 256 tokens; ``/usr/bin/time`` of 4 steps, docs/methods/speed.md):

4. **Fused LoRA linear.** peft adds ``lora_B(lora_A(dropout(x))) * scaling`` to the base output, and autograd
   keeps the fp32 dropout output of every adapted linear for lora_A's weight gradient (7 per layer).
   :class:`_FusedLoraLinear` keeps the layer input (shared by q/k/v and by gate/up) and a 1-byte mask,
   scales the r-wide intermediate and accumulates the adapter's product into the base matmul: peak RSS
   5.41 → 4.12 GB at the same step time (4.8-5.1 s either way) and the same losses.
5. **Grouped-query SDPA.** With a mask, transformers' SDPA copies k and v once per query head and the CPU kernel
   keeps the copies for backward; :func:`grouped_sdpa_attention` lets the kernel share them (``enable_gqa``).
"""

from __future__ import annotations

# Imported only from inside recipe run() functions (which load torch anyway): top-level imports are fine.
import math
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from tunelab.train.memory import FUSED_LORA_METHODS  # lora, rslora: DoRA is a peft variant with its own forward
from tunelab.train.numerics import _causal_parts, release_head_workspace, response_only_loss, reuse_cast, \
    workspace_buffer


class _MaskedScale(torch.autograd.Function):
    """y = (x * keep / (1 - p)) in ``out_dtype``; saves only the mask (as bits on CPU) for backward.

    nn.Dropout under autocast keeps a mask and an fp32 output, and the next matmul keeps a bf16 copy of
    it (6 bytes an element); emitting the bf16 result here (computed in fp32, then rounded: the
    values autocast would produce) leaves 3. Backward: grad_x = grad_y * keep / (1 - p), as nn.Dropout.
    """

    @staticmethod
    def forward(ctx, x, keep, scale: float, out_dtype):
        ctx.save_for_backward(_pack_mask(keep))  # as bits on CPU
        ctx.scale, ctx.x_dtype = scale, x.dtype
        return (x * _mask_as(keep, x)).mul_(scale).to(out_dtype)  # a 0/1 multiply: a bool operand runs unvectorized

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        g = grad.to(ctx.x_dtype)
        return (g * _mask_as(_unpack_mask(keep, g.shape), g)).mul_(ctx.scale), None, None, None


def _keep_mask(shape, p: float) -> torch.Tensor:
    """A Bernoulli(1 - p) keep mask as a bool tensor, drawn by numpy's PCG64 seeded from torch's generator."""
    thr = np.uint32(min(round(p * 2 ** 32), 2 ** 32 - 1))  # P(drop) = thr / 2**32 with 32-bit uniforms: p to 2.3e-10
    seed = int(torch.randint(0, 2 ** 62, (1,)))  # from torch's generator: transformers.set_seed repeats it
    n = math.prod(shape)
    # the generator's raw 64-bit outputs read as 32-bit words: the same words, in the same order, as
    # ``Generator(PCG64(seed)).bytes(4 * n)`` gave before, without bytes()'s copies (5x faster at 8 x 143 x 576)
    bits = np.random.PCG64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(bits >= thr).view(shape)


class FastDropout(torch.nn.Module):
    """Inverted dropout with the mask drawn by numpy's PCG64 (fast on CPU); identity in eval mode.

    Under autocast the output is in the autocast dtype (what the following LoRA matmul would cast it to).
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = _keep_mask(x.shape, self.p)
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


_SHARED = threading.local()  # the last layer input cast to the autocast dtype (q/k/v and gate/up read one input)


def _cast_shared(x, dtype):
    """``x.to(dtype)``, the same tensor for consecutive calls on one unchanged ``x`` (q, k and v project one
    input: autocast casts it once for each; this casts it once and the three backward passes share it)."""
    if x.dtype == dtype:
        return x
    _SHARED.last, xc = reuse_cast(getattr(_SHARED, "last", None), x, dtype)
    return xc


def recomputable(out, fn, *inputs):
    """Mark ``out`` as ``fn(*inputs)`` (deterministic, with ``inputs`` kept for backward by their own op anyway):
    a fused LoRA linear reading ``out`` keeps ``inputs`` instead and calls ``fn`` again in backward, unless ``out``
    was changed in place since (its version)."""
    out._tunelab_recompute = (fn, inputs, out._version)
    return out


_AGAIN = threading.local()  # the last input recomputed in backward: q/k/v (gate/up) share one recomputation


def _recomputed(fn, inputs, dtype):
    """``fn(*inputs)`` cast to ``dtype``, the same tensor while ``fn``, ``dtype`` and the inputs (storage, view and
    version) are unchanged since the last call on this thread. Backward may hand out each saved input as a new
    tensor object (saved-tensor hooks, checkpointing), so the inputs are compared by what they address; the entry
    holds them, so no other tensor can take their memory while it is kept."""
    key = [(t.data_ptr(), t.shape, t.stride(), t.dtype, t._version) for t in inputs]
    entry = getattr(_AGAIN, "last", None)
    if entry is not None and entry[0] is fn and entry[1] == dtype and entry[2] == key:
        return entry[4]
    out = fn(*inputs).to(dtype)
    _AGAIN.last = (fn, dtype, key, tuple(inputs), out)
    return out


def _scratch(name: str, shape, dtype, device) -> torch.Tensor:
    """A reused per-thread buffer (:func:`numerics.workspace_buffer`) for the fused LoRA linear's temporaries. The
    masked input and the float mask of each adapted linear in forward and backward (12 [tokens x in] temporaries a
    layer and step) allocated afresh each time left freed blocks among the kept activations, which the allocator
    did not all reuse: LoRA SFT of SmolLM2-135M in fp32 (8 x 138 tokens) peaked 0.43 GB above the same run without
    dropout. Nothing kept for backward or returned is a buffer."""
    rows, cols = shape
    return workspace_buffer(f"lora {name}", rows, cols, dtype, device)


def _scratch_mask(keep, shape, dtype) -> torch.Tensor:
    """The bool keep mask as 0/1 in ``dtype`` (:func:`_mask_as`), in this thread's ``mask`` buffer."""
    return _scratch("mask", shape, dtype, keep.device).copy_(keep.view(torch.uint8).view(shape))


def _pack_mask(keep):
    """A CPU bool mask as bits (numpy's packbits: 13 us for 256 x 1536), for what backward keeps: an eighth of
    the bytes. Another device's mask is kept as it is."""
    if keep is None or keep.device.type != "cpu":
        return keep
    return torch.from_numpy(np.packbits(keep.numpy().reshape(-1)))


def _unpack_mask(packed, shape):
    if packed is None or packed.dtype == torch.bool:
        return packed
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).view(np.bool_)).view(shape)


def _mask_as(keep, like):
    """The bool keep mask as 0/1 in ``like``'s dtype and shape. Elementwise ops that read a bool mask run
    unvectorized on CPU: ``torch.where(keep, x, 0)`` took 337 us for a 256 x 1536 bf16 input, this
    conversion (through uint8) and a multiply 53 + 70 us (2 Zen 4 cores, one thread)."""
    return keep.view(torch.uint8).to(like.dtype).view(like.shape)


class _FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + c * ((x * keep) A^T) B^T for a frozen base (W, b) and one LoRA adapter (A, B), where
    c = scaling / (1 - p) and ``keep`` is the dropout mask (None: no dropout).

    peft computes the same sum as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: a dropout output
    scaled over [tokens x in], then a [tokens x out] product scaled and added to the base output, and the
    mirror of each pass in backward. Here the scale is applied to the [tokens x r] intermediate (r is
    16, the widths 576-1536) and the adapter's product is accumulated into the base output by the matmul
    itself (``addmm_``); backward saves x (shared with whatever else keeps it) and the mask as bits instead
    of a masked copy of x. Same values up to floating-point rounding order.

    ``mm``: the matmul dtype under autocast (bf16, with the frozen base weight stored in it), None in fp32.
    The input is cast to it once (:func:`_cast_shared`: one copy for q/k/v, one for gate/up, where autocast
    and peft cast it for each linear and again for each adapter), A and B as autocast casts them, the output
    is in ``mm`` as autocast's is; the gradient of an fp32 input is summed in fp32 as peft's path sums it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, keep, c: float, mm=None):
        shape, ab_dtype = x.shape, A.dtype
        xm = x if mm is None else _cast_shared(x, mm)
        if mm is not None:
            A, B = A.to(mm), B.to(mm)
            bias = None if bias is None else bias.to(mm)
        x2 = xm.reshape(-1, shape[-1])
        xd = x2 if keep is None else torch.mul(x2, _scratch_mask(keep, x2.shape, x2.dtype),
                                               out=_scratch("masked", x2.shape, x2.dtype, x2.device))
        u = (A @ xd.t()).t().mul_(c)  # = xd A^T; this order is the faster one for a narrow A (fp32 1536: 107 vs 185 us)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(u, B.t())
        # an input that says how to compute it again from tensors kept anyway (:func:`recomputable`: the SwiGLU
        # product from gate and up, a norm's output from its input) is not kept: recomputed in backward (and cast
        # again to ``mm``), bit for bit
        again = getattr(x, "_tunelab_recompute", None)
        if again is not None and again[2] != x._version:
            again = None
        kept = again[1] if again is not None else (xm,)
        ctx.save_for_backward(*kept, _pack_mask(keep), u, weight, A, B)
        ctx.again = None if again is None else again[0]
        ctx.c, ctx.x_dtype, ctx.ab_dtype, ctx.x_shape, ctx.xm_dtype = c, x.dtype, ab_dtype, xm.shape, xm.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        *kept, keep, u, weight, A, B = ctx.saved_tensors
        x = kept[0] if ctx.again is None else _recomputed(ctx.again, kept, ctx.xm_dtype) \
            if ctx.needs_input_grad[3] else None
        keep = _unpack_mask(keep, ctx.x_shape)
        c = ctx.c
        g2 = gy.reshape(-1, gy.shape[-1]).to(weight.dtype)
        # [tokens, r]; in fp32 the transposed order is the faster one (256 x 1536 by 1536 x 8: 121 vs 454 us), in
        # bf16 not (97 vs 83 us; one Zen 4 core)
        gu = (B.t() @ g2.t()).t() if g2.dtype == torch.float32 else g2 @ B
        gx = gA = gB = None
        if ctx.needs_input_grad[4]:
            gB = (u.t() @ g2).t().to(ctx.ab_dtype)  # = g2^T u; this order is the faster one for a narrow u
        rows = (math.prod(ctx.x_shape[:-1]), ctx.x_shape[-1])
        kf = None if keep is None else _scratch_mask(keep, rows, ctx.xm_dtype)
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(rows)
            xd = x2 if kf is None else torch.mul(x2, kf, out=_scratch("masked", rows, x2.dtype, x2.device))
            gA = (gu.t() @ xd).mul_(c).to(ctx.ab_dtype)
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight).to(ctx.x_dtype)  # an fp32 input's gradient: the two parts summed in fp32
            if kf is not None:
                gx.view(rows).addcmul_(torch.mm(gu, A, out=_scratch("masked", rows, A.dtype, A.device)), kf, value=c)
            elif gx.dtype == A.dtype:
                gx.addmm_(gu, A, alpha=c)
            else:
                gx.add_(gu @ A, alpha=c)
            gx = gx.view(ctx.x_shape)
        return gx, None, None, gA, gB, None, None, None


def _fused_lora_forward(module, orig):
    """The forward that replaces a peft ``lora.Linear``'s: :class:`_FusedLoraLinear` while training one plain
    LoRA adapter with gradients on, in fp32 or under CPU bf16 autocast with the frozen base weight stored in bf16
    (:class:`FrozenBf16`); peft's own forward in every other case (eval, no-grad, merged, disabled, several
    adapters, DoRA and other variants, mixed-adapter batches, other dtypes)."""

    def forward(x, *args, **kwargs):
        if args or kwargs or not (module.training and torch.is_grad_enabled()) or module.merged \
                or module.disable_adapters or len(module.active_adapters) != 1:
            return orig(x, *args, **kwargs)
        name = module.active_adapters[0]
        base = module.base_layer
        if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
            return orig(x, *args, **kwargs)
        A, B, drop = module.lora_A[name].weight, module.lora_B[name].weight, module.lora_dropout[name]
        p = drop.p if isinstance(drop, (FastDropout, torch.nn.Dropout)) else 0.0 if isinstance(drop, torch.nn.Identity) else None
        if p is None or module.lora_B[name].bias is not None or base.weight.requires_grad or \
                (base.bias is not None and base.bias.requires_grad) or not (A.dtype == B.dtype == torch.float32):
            return orig(x, *args, **kwargs)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            mm = torch.get_autocast_dtype(dev)
            if dev != "cpu" or mm != torch.bfloat16 or base.weight.dtype != mm or x.dtype not in (torch.float32, mm):
                return orig(x, *args, **kwargs)
        elif x.dtype == base.weight.dtype == torch.float32:
            mm = None
        else:
            return orig(x, *args, **kwargs)
        keep = _keep_mask(x.shape, p) if p > 0 else None
        return _FusedLoraLinear.apply(x, base.weight, base.bias, A, B, keep, module.scaling[name] / (1.0 - p), mm)

    return forward


def use_fused_lora_linear(model) -> int:
    """Route every plain peft LoRA ``Linear`` (an ``nn.Linear`` base, not fan-in-fan-out) through
    :func:`_fused_lora_forward` while training in fp32; returns how many layers."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and type(module.base_layer) is torch.nn.Linear \
                and not getattr(module, "fan_in_fan_out", False) and not getattr(module, "_tunelab_fused", False):
            module.forward = _fused_lora_forward(module, module.forward)
            module._tunelab_fused = True
            n += 1
    return n


def _swiglu_product(gate, up):
    return torch.nn.functional.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, keeping gate and up for backward and computing silu(gate) again there.

    Autograd keeps gate (for silu's backward), silu(gate) and up (for the product's): three [tokens x
    intermediate] tensors, the largest activations of a decoder layer. Recomputing silu (one cheap elementwise
    pass) keeps two. Forward and backward run the ops autograd runs (``silu``, the products, ``silu_backward``),
    in the same dtypes: the same values bit for bit.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_product(gate, up)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        if ctx.needs_input_grad[1]:
            d_up = g * torch.nn.functional.silu(gate)
        if ctx.needs_input_grad[0]:
            d_gate = torch.ops.aten.silu_backward(g * up, gate)
        return d_gate, d_up


# MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (transformers 5)
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP", "OlmoMLP", "Olmo2MLP", "GraniteMLP")


def _swiglu_forward(module, orig):
    def forward(x, *args, **kwargs):
        if args or kwargs or not (module.training and torch.is_grad_enabled()):
            return orig(x, *args, **kwargs)
        gate = module.gate_proj(x)  # gate first, as the model's forward: LoRA dropout masks are drawn in order
        up = module.up_proj(x)
        # down_proj's fused LoRA linear keeps gate and up (kept here anyway) instead of its input
        return module.down_proj(recomputable(_SwiGLU.apply(gate, up), _swiglu_product, gate, up))

    return forward


def use_recomputed_swiglu(model) -> int:
    """Route the MLP of every decoder layer of a known SwiGLU family (:data:`SWIGLU_MLPS`, SiLU activation)
    through :class:`_SwiGLU` while training; returns how many MLPs."""
    n = 0
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if type(module).__name__ in SWIGLU_MLPS and type(act).__name__ in ("SiLUActivation", "SiLU") \
                and all(hasattr(module, k) for k in ("gate_proj", "up_proj", "down_proj")) \
                and not getattr(module, "_tunelab_swiglu", False):
            module.forward = _swiglu_forward(module, module.forward)
            module._tunelab_swiglu = True
            n += 1
    return n


NORMS = ("input_layernorm", "post_attention_layernorm")  # a decoder layer's norms before q/k/v and gate/up


def _norm_forward(module, orig):
    def forward(x, *args, **kwargs):
        out = orig(x, *args, **kwargs)
        if args or kwargs or not torch.is_grad_enabled():
            return out
        return recomputable(out, orig, x)  # the norm keeps its input: the fused q/k/v (gate/up) keep it, not out

    return forward


def use_recomputed_norms(model) -> int:
    """Mark the output of each decoder layer's RMSNorms (:data:`NORMS`) as recomputable from its input while
    training (:func:`recomputable`: the fused LoRA linears of q/k/v and gate/up keep the norm's input, which the
    norm keeps anyway, and compute the norm again in backward); returns how many norms."""
    n = 0
    for layer in model.modules():
        for name in NORMS:
            norm = getattr(layer, name, None)
            if norm is not None and type(norm).__name__.endswith("RMSNorm") \
                    and not getattr(norm, "_tunelab_recompute", False):
                norm.forward = _norm_forward(norm, norm.forward)
                norm._tunelab_recompute = True
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

    def __init__(self, model, workdir: str | Path, all_linear: bool = False):
        from safetensors.torch import save_file

        self._params: dict[str, torch.nn.Parameter] = {}
        if all_linear:  # a model used only under no-grad (a distillation teacher): every frozen Linear weight,
            # except one shared with an embedding (a tied LM head: the embedding lookup must stay fp32)
            emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
            for name, module in model.named_modules():
                w = getattr(module, "weight", None)
                if isinstance(module, torch.nn.Linear) and not w.requires_grad and w.dtype == torch.float32 \
                        and id(w) not in emb:
                    self._params[f"{name}.weight"] = w
        for name, module in ([] if all_linear else model.named_modules()):
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
        dev = query.device.type
        if torch.is_autocast_enabled(dev):
            # autocast casts q (fp32 after the rotary embedding) for the first matmul anyway: cast it before the
            # checkpoint, which then keeps it in 16 bits (the same values and gradients; half the bytes kept).
            # Not k: its gradient is summed over the query heads that share it (grouped-query attention), in
            # fp32 only while k is fp32
            query = query.to(torch.get_autocast_dtype(dev))
        return checkpoint(eager, module, query, key, value, attention_mask, use_reentrant=False, **kwargs)

    AttentionInterface.register(CHECKPOINTED_EAGER, attention)
    AttentionMaskInterface.register(CHECKPOINTED_EAGER, eager_mask)
    return CHECKPOINTED_EAGER


GROUPED_SDPA = "tunelab_sdpa_grouped"


def grouped_sdpa_attention() -> str:
    """Register (once) and return the name of an ``attn_implementation``: SDPA with grouped-query attention done by
    the kernel (``enable_gqa``) and the additive mask eager attention uses, built once per forward.

    transformers' SDPA path copies k and v once per query head (``repeat_kv``) whenever there is a mask, and the
    CPU kernel keeps those copies for backward; a boolean mask is also converted to a float mask inside every
    layer's call and kept there. Measured on SmolLM2-135M (9 query heads over 3 key/value heads, batch 8 x 159
    tokens, fp32): 12.6 → 8.7 MB kept per layer, forward + backward of the attention core 21 → 18 ms. Values
    equal ``sdpa``'s; k and v gradients differ by rounding (the sum over a group's heads runs in another order).
    Anything this path does not cover (one query token, attention weights asked for, position bias, a paged
    cache, no grouping) goes to transformers' own SDPA function.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if GROUPED_SDPA in AttentionInterface._global_mapping:
        return GROUPED_SDPA

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if (getattr(module, "num_key_value_groups", 1) <= 1 or query.shape[2] == 1 or key.shape[-1] != value.shape[-1]
                or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "cache"))
                or kwargs.get("output_attentions")):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        if attention_mask is not None and attention_mask.ndim == 4:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=bool(causal and attention_mask is None), enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(GROUPED_SDPA, attention)
    AttentionMaskInterface.register(GROUPED_SDPA, eager_mask)
    return GROUPED_SDPA


# ----------------------------------------------------------------------------- the shared layer every recipe uses

LORA_FAMILY = ("lora", "rslora", "dora")
FROZEN_BF16_METHODS = ("lora", "rslora")  # DoRA reads its base weight for the magnitude norm: not measured


def enabled(choice: str | None) -> bool:
    """``train.speedups``: "auto" (the default) applies what the device plan allows; "off" is the plain path."""
    return choice != "off"


def attention_kwargs(dplan, method: str, choice: str | None = "auto") -> dict:
    """Model-loading kwargs: checkpointed eager attention for a LoRA-family adapter under CPU bf16 autocast (in
    fp32 :meth:`Speedups.apply` switches SDPA to :func:`grouped_sdpa_attention` for training, in every recipe)."""
    if enabled(choice) and cpu_bf16_training(dplan) and method in LORA_FAMILY:
        return {"attn_implementation": checkpointed_eager_attention()}
    return {}


def _transformers_model(model):
    """The transformers model under a peft wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention_of(model) -> str | None:
    return getattr(getattr(_transformers_model(model), "config", None), "_attn_implementation", None)


def use_grouped_sdpa(model):
    """Switch ``model`` (a transformers model, or a peft model around one) from ``sdpa`` to
    :func:`grouped_sdpa_attention` where its query heads are grouped over fewer key/value heads and it takes its
    attention from transformers' AttentionInterface; returns the transformers model switched (to switch back with
    ``set_attn_implementation("sdpa")``), or None where nothing changed."""
    base = _transformers_model(model)
    cfg = getattr(base, "config", None)
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa" or not heads or not kv or kv >= heads \
            or not getattr(base, "_can_set_attn_implementation", lambda: False)():
        return None
    base.set_attn_implementation(grouped_sdpa_attention())
    return base if base.config._attn_implementation == GROUPED_SDPA else None


class Speedups:
    """What a run's speed-ups are, applied to one model, and why the others are not; ``restore()`` after training.

        sp = Speedups(dplan, method, "auto")
        sp.apply(model, run_dir)                       # fast LoRA dropout, frozen base in bf16 (where they apply)
        sp.note("fused response-only loss", True, "logits only where labels are set")
        try: trainer.train()
        finally: sp.restore()                          # the exact fp32 base weights back
        summary.update(sp.record())                    # cpu_speedups: [...], speedups: {name: why}

    One place decides for every recipe (docs/methods/speed.md): a recipe only says which of its own
    losses are fused and which frozen models it has (a DPO reference, a distillation teacher).
    """

    def __init__(self, dplan, method: str, choice: str | None = "auto"):
        self.dplan, self.method, self.on = dplan, method, enabled(choice)
        self.applied: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self._frozen: list[FrozenBf16] = []
        self._grouped = []  # models switched to grouped-query SDPA for training

    def _why_not(self, applies: bool, needs: str) -> str:
        if not self.on:
            return "off (train.speedups: off)"
        if not cpu_bf16_training(self.dplan):
            return f"needs CPU bf16 autocast; this run: {self.dplan.precision} on {self.dplan.device}"
        return f"needs {needs} (method {self.method})" if not applies else "not used by this recipe"

    def note(self, name: str, applied: bool, why: str) -> bool:
        (self.applied if applied else self.skipped)[name] = why
        return applied

    def apply(self, model, workdir, *, frozen_base: bool = True) -> "Speedups":
        """Fast LoRA dropout masks (CPU) and the frozen LoRA base weights in bf16 (CPU bf16) on ``model``."""
        lora = self.method in LORA_FAMILY
        eager = _attention_of(model) == CHECKPOINTED_EAGER  # chosen at load (attention_kwargs)
        self.note("checkpointed eager attention", eager,
                  "eager attention under activation checkpointing (CPU bf16: SDPA's bf16 backward is slow)" if eager
                  else self._why_not(cpu_bf16_training(self.dplan) and lora, "a LoRA-family adapter"))
        n = use_fast_lora_dropout(model) if self.on and self.dplan.device == "cpu" and lora else 0
        self.note("fast LoRA dropout", n > 0, f"{n} LoRA dropout masks drawn by numpy's PCG64" if n else
                  ("off (train.speedups: off)" if not self.on else
                   "no LoRA dropout (p = 0 or no adapter)" if self.dplan.device == "cpu" else "CPU only"))
        frozen = self.on and frozen_base and cpu_bf16_training(self.dplan) and self.method in FROZEN_BF16_METHODS
        # fp32, or CPU bf16 with the frozen base stored in bf16 (the fused forward checks both at every call)
        fused = self.on and self.dplan.device == "cpu" and self.method in FUSED_LORA_METHODS and (
            self.dplan.precision == "fp32" or frozen)
        k = use_fused_lora_linear(model) if fused else 0
        self.note("fused LoRA linear", k > 0, f"{k} LoRA layers: adapter product scaled at rank r and accumulated "
                  "into the base matmul" + (", the layer input cast to bf16 once" if k and self.dplan.precision
                                            == "bf16" else "") if k else "off (train.speedups: off)" if not self.on
                  else f"needs CPU training of lora or rslora in fp32, or in bf16 with the frozen base in bf16 "
                  f"(this run: {self.method}, {self.dplan.precision} on {self.dplan.device})" if not fused
                  else "no plain LoRA Linear layer in the model")
        r = use_recomputed_norms(model) if k else 0
        self.note("norms recomputed in backward", r > 0, f"{r} RMSNorms: the fused LoRA linears keep their input, "
                  "not their output" if r else "needs the fused LoRA linear" if not k
                  else "no decoder layer RMSNorm found")
        m = use_recomputed_swiglu(model) if self.on and self.dplan.device == "cpu" else 0
        self.note("SwiGLU recomputed in backward", m > 0, f"{m} MLPs keep gate and up, not silu(gate) too" if m
                  else "off (train.speedups: off)" if not self.on else "CPU only" if self.dplan.device != "cpu"
                  else f"no MLP of a known SwiGLU family ({', '.join(SWIGLU_MLPS)})")
        grouped = self.on and self.dplan.device == "cpu" and self.dplan.precision == "fp32" and lora
        g = use_grouped_sdpa(model) if grouped else None
        if g is not None:
            self._grouped.append(g)
        if self.dplan.device == "cpu" and not cpu_bf16_training(self.dplan):
            self.note("grouped-query SDPA", g is not None,
                      "k and v shared by their query heads inside SDPA, one additive mask per forward" if g else
                      "off (train.speedups: off)" if not self.on else
                      f"needs a LoRA-family adapter (method {self.method})" if not lora else
                      f"needs fp32 training; this run: {self.dplan.precision}" if not grouped else
                      "needs SDPA attention over grouped key/value heads, through transformers' AttentionInterface")
        if frozen:
            self._frozen.append(FrozenBf16(model, workdir))
        self.note("frozen base in bf16", frozen, f"{self._frozen[-1].count} frozen LoRA base weights stored in bf16"
                  if frozen else self._why_not(self.method in FROZEN_BF16_METHODS, "lora or rslora"))
        return self

    def freeze_model_bf16(self, name: str, model, workdir) -> bool:
        """A frozen model used only under no-grad (a distillation teacher): its Linear weights in bf16 while
        training (CPU bf16), restored to the exact fp32 weights by :meth:`restore`."""
        ok = self.on and cpu_bf16_training(self.dplan)
        if ok:
            self._frozen.append(FrozenBf16(model, workdir, all_linear=True))
        self.note(f"{name} in bf16", ok, f"{self._frozen[-1].count} {name} Linear weights stored in bf16"
                  if ok else self._why_not(True, ""))
        return ok

    def restore(self) -> None:
        for f in self._frozen:
            f.restore()
        for m in self._grouped:  # evaluation after training runs the model's own SDPA
            m.set_attn_implementation("sdpa")
        self._grouped = []
        release_head_workspace()  # the head's cast and buffers, the fused linear's temporaries
        _SHARED.last = None  # the last layer input's bf16 cast: not kept past training
        _AGAIN.last = None  # nor the last input recomputed in backward

    def names(self) -> list[str]:
        return list(self.applied)

    def record(self) -> dict:
        """For summary.json: ``cpu_speedups`` (the names applied) and ``speedups`` (each one, applied or not, why)."""
        return {"cpu_speedups": self.names(),
                "speedups": {"setting": "auto" if self.on else "off",
                             "applied": dict(self.applied), "not_applied": dict(self.skipped)}}

    def line(self) -> str:
        return (f"speed-ups: {', '.join(self.applied) or 'none'}" +
                ("" if self.on else " (train.speedups: off)"))


def fused_loss_trainer(base=None, share_prefix: bool = False):
    """``base`` (transformers' Trainer by default) with one override: the causal-LM loss computed from the
    decoder's hidden states with logits only where labels are set, a frozen head's in chunks
    (``numerics.response_only_loss``). The value is the model's own loss (mean over label tokens, or sum /
    num_items_in_batch under gradient accumulation). ``share_prefix``: the tokens every row of a batch starts
    with run once (``shared_prompt.shared_prefix_hidden``); the class's ``prefix_stats`` counts the positions."""
    if base is None:
        from transformers import Trainer as base

    class FusedLossTrainer(base):
        prefix_stats: dict | None = {} if share_prefix else None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # response_only_loss calls the decoder and the LM head directly, past the autocast wrapper that
            # accelerate puts on model.forward: enter mixed precision here (a no-op under fp32)
            with self.accelerator.autocast():
                loss = response_only_loss(model, inputs, num_items_in_batch, share_prefix=self.prefix_stats)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                    and self.accelerator.num_processes > 1:
                # num_items_in_batch counts the label tokens of all ranks and DDP averages gradients
                # over ranks: scale back by the rank count, as Trainer.compute_loss does
                loss = loss * self.accelerator.num_processes
            return (loss, {"loss": loss}) if return_outputs else loss

    return FusedLossTrainer


def fused_loss_applies(model) -> bool:
    """Whether :func:`fused_loss_trainer` can compute this model's loss (a plain causal LM, seen through LoRA)."""
    return _causal_parts(model) is not None
