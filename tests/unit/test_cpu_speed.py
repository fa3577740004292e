"""The CPU training speed-ups change speed, not what is computed (tunelab/train/_cpu_speed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def test_fast_dropout_is_inverted_dropout_with_the_right_rate():
    from tunelab.train._cpu_speed import FastDropout

    d = FastDropout(0.05)
    x = torch.ones(400_000)
    torch.manual_seed(3)
    y = d(x)
    dropped = float((y == 0).float().mean())
    # Binomial(400k, 0.05): sd of the rate 3.4e-4, so 0.05 +- 0.002 is ~6 sd
    assert abs(dropped - 0.05) < 0.002
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.95))
    torch.manual_seed(3)
    assert torch.equal(d(x), y), "the mask must follow torch's seed"
    assert not torch.equal(d(x), y), "a new draw each call"
    d.eval()
    assert d(x) is x


def test_keep_mask_draws_the_words_of_the_generators_byte_stream():
    """The mask reads PCG64's raw outputs as 32-bit words (no bytes() copies): the very words
    ``Generator(PCG64(seed)).bytes(4 * n)`` gives, so a run draws the same masks as before the change, odd sizes
    included (the last 64-bit output is half used)."""
    import numpy as np

    from tunelab.train._cpu_speed import _keep_mask

    for shape, p in [((3, 7, 5), 0.05), ((2, 143, 576), 0.3), ((1,), 0.5)]:
        torch.manual_seed(11)
        got = _keep_mask(shape, p)
        torch.manual_seed(11)
        seed = int(torch.randint(0, 2 ** 62, (1,)))
        n = int(np.prod(shape))
        words = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(4 * n), dtype=np.uint32)
        want = torch.from_numpy(words >= np.uint32(round(p * 2 ** 32))).view(shape)
        assert got.dtype == torch.bool and got.shape == shape
        assert torch.equal(got, want)


def test_fast_dropout_gradient_is_the_mask():
    from tunelab.train._cpu_speed import FastDropout

    d = FastDropout(0.3)
    x = torch.randn(64, 32, requires_grad=True)
    y = d(x)
    y.sum().backward()
    keep = y.detach() != 0
    assert torch.allclose(x.grad, keep.float() / 0.7)


def test_fast_dropout_rejects_bad_p():
    from tunelab.train._cpu_speed import FastDropout

    with pytest.raises(ValueError):
        FastDropout(1.0)


def _lora_model(tiny_model, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():  # a non-zero adapter, so it takes part in the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


class _KeptBytes:
    """Bytes autograd keeps for backward inside the block: activations only (storages that are not ``model``'s
    parameters), each storage counted once.

        with _KeptBytes(model) as kept: model(...)
        kept.total
    """

    def __init__(self, model):
        from torch.autograd.graph import saved_tensors_hooks

        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self.hooks = saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if t.untyped_storage().data_ptr() not in self.params:
            self.seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def test_use_fast_lora_dropout_swaps_every_lora_dropout(tiny_model):
    from tunelab.train._cpu_speed import FastDropout, use_fast_lora_dropout

    model = _lora_model(tiny_model, 0.1)
    n = use_fast_lora_dropout(model)
    assert n > 0
    left = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
            for d in m.lora_dropout.values() if isinstance(d, torch.nn.Dropout)]
    assert not left
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == n
    assert use_fast_lora_dropout(_lora_model(tiny_model, 0.0)) == 0  # p = 0: nothing to swap


def test_frozen_bf16_same_autocast_logits_and_exact_restore(tiny_model, tmp_path):
    from tunelab.train._cpu_speed import FrozenBf16

    model = _lora_model(tiny_model, 0.0).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids).logits.float()
    frozen = FrozenBf16(model, tmp_path)
    assert frozen.count > 0 and frozen.path.exists()
    cast = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
    assert cast and all("base_layer" in n for n in cast)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(input_ids=ids).logits.float()
    # autocast casts an fp32 weight to the same bf16 values the stored weight has: same matmuls
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)
    frozen.restore()
    assert not frozen.path.exists()
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n
    frozen.restore()  # twice is harmless


def test_fast_dropout_under_autocast_emits_what_autocast_would_compute():
    from tunelab.train._cpu_speed import FastDropout

    d = FastDropout(0.2)
    x = torch.randn(32, 48, requires_grad=True)
    w = torch.randn(16, 48, requires_grad=True)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = d(x)
        out = y @ w.t()
    assert y.dtype == torch.bfloat16
    keep = (y.detach() != 0).float()
    # reference: fp32 dropout with the same mask, then autocast's own cast inside the matmul
    x2 = x.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = (x2 * keep / 0.8) @ w2.t()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    g = torch.randn_like(out.float())
    out.float().backward(g)
    ref.float().backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=0, rtol=0)
    torch.testing.assert_close(w.grad, w2.grad, atol=0, rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_frozen_head_nll_equals_linear_plus_cross_entropy(autocast):
    import torch.nn.functional as F

    from tunelab.train.numerics import frozen_head_nll

    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False).requires_grad_(False)
    h1 = torch.randn(70, 24, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    t = torch.randint(0, 300, (70,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = F.cross_entropy(head(h1).float(), t, reduction="sum")
        got = frozen_head_nll(h2, head.weight, t, chunk=16)  # several chunks and a short last one
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    (ref / 7).backward()
    (got / 7).backward()
    tol = dict(rtol=2e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, **tol)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.testing.assert_close(frozen_head_nll(h2, head.weight, t), ref.detach(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        frozen_head_nll(h2, torch.nn.Parameter(head.weight.clone()), t)


@pytest.mark.parametrize("bf16", [False, True])
def test_checkpointed_eager_attention_matches_eager(tiny_model, bf16):
    """Under bf16 autocast q and k are cast before the checkpoint (the cast the first matmul makes anyway)."""
    from transformers import AutoModelForCausalLM

    from tunelab.train._cpu_speed import checkpointed_eager_attention

    name = checkpointed_eager_attention()
    assert checkpointed_eager_attention() == name  # registering twice is harmless
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    out = {}
    for impl in ("eager", name):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        out[impl] = (loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(out[name][0], out["eager"][0], atol=0, rtol=0)
    for g1, g2 in zip(out[name][1], out["eager"][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_grouped_sdpa_matches_sdpa_and_keeps_less(tiny_model):
    """fp32 CPU LoRA training: SDPA with the key/value heads shared inside the kernel. Same loss as transformers'
    SDPA (which copies k and v per query head when there is a mask, and keeps the copies), gradients equal up to
    rounding, at least those copies fewer bytes kept for backward; generation (one query token, the fallback to
    transformers' SDPA) unchanged."""
    from transformers import AutoModelForCausalLM

    from tunelab.train._cpu_speed import grouped_sdpa_attention

    name = grouped_sdpa_attention()
    assert grouped_sdpa_attention() == name  # registering twice is harmless
    ids = torch.randint(3, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in one row
    mask[2, 9:] = 0  # right padding in another
    # padded positions are no one's keys; as queries (a fully masked row) their outputs differ: the float mask
    # is uniform there. Nothing is predicted from them, as in training (position 3 would predict token 4)
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 4] = -100
    out = {}
    for impl in ("sdpa", name):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=impl, dtype=torch.float32)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        kept = sum(n for ptr, n in storages.items() if ptr not in params)
        with torch.no_grad():
            gen = m.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
        out[impl] = (loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None], kept, gen)
    c = m.config
    assert c.num_key_value_heads < c.num_attention_heads  # the tiny model groups its heads
    torch.testing.assert_close(out[name][0], out["sdpa"][0], rtol=1e-6, atol=0)
    for g1, g2 in zip(out[name][1], out["sdpa"][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    head_dim = c.hidden_size // c.num_attention_heads
    copies = 2 * (c.num_attention_heads - c.num_key_value_heads) * ids.numel() * head_dim * 4 * c.num_hidden_layers
    assert out["sdpa"][2] - out[name][2] >= copies, (out["sdpa"][2], out[name][2], copies)
    assert torch.equal(out[name][3], out["sdpa"][3])


def test_speedups_switch_to_grouped_sdpa_for_training_only(tiny_model, tmp_path):
    """fp32 CPU LoRA training in any recipe: Speedups.apply switches the model's SDPA to the grouped one, restore()
    switches it back (evaluation after training runs transformers' own); bf16 and speedups off leave it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.train._cpu_speed import GROUPED_SDPA, Speedups
    from tunelab.train.device import DevicePlan

    def model():
        m = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
        return get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    m = model()
    sp = Speedups(DevicePlan("cpu", "fp32", False, ""), "lora").apply(m, tmp_path)
    assert m.config._attn_implementation == GROUPED_SDPA and "grouped-query SDPA" in sp.applied
    sp.restore()
    assert m.config._attn_implementation == "sdpa"
    for plan, choice in ((DevicePlan("cpu", "fp32", False, ""), "off"), (DevicePlan("cpu", "bf16", False, ""), "auto")):
        m = model()
        sp = Speedups(plan, "lora", choice).apply(m, tmp_path)
        assert m.config._attn_implementation == "sdpa" and "grouped-query SDPA" not in sp.applied
        sp.restore()


def test_frozen_bf16_releases_the_memory_mapped_weights_file(tiny_model, tmp_path):
    """transformers loads safetensors weights as views of the mapped file; after the cast no parameter may
    still view it, or the whole file (the fp32 copy of what was just cast) stays resident while training."""
    import gc

    from tunelab.train._cpu_speed import FrozenBf16

    def mapped() -> bool:
        names = {line.split()[-1] for line in open("/proc/self/maps") if len(line.split()) >= 6}
        return any(n.startswith(str(tiny_model)) and n.endswith(".safetensors") for n in names)

    if not Path("/proc/self/maps").exists():
        pytest.skip("needs Linux /proc")
    # a private copy: other tests in this process may still hold models loaded from the shared tiny model
    import shutil

    tiny_model = Path(shutil.copytree(tiny_model, tmp_path / "own-model"))
    model = _lora_model(tiny_model, 0.0)
    if not mapped():
        pytest.skip("this transformers build copies the weights at load (nothing mapped to release)")
    frozen = FrozenBf16(model, tmp_path)
    gc.collect()
    assert not mapped(), "a parameter still views the mapped weights file"
    frozen.restore()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_linear_same_loss_and_gradients_as_peft(tiny_model, dropout):
    """The fused forward computes peft's base(x) + lora_B(lora_A(dropout(x))) * scaling with the same dropout
    masks (both drawn from torch's generator by the same function): same logits and gradients up to rounding."""
    from tunelab.train._cpu_speed import use_fast_lora_dropout, use_fused_lora_linear

    ref_model, model = _lora_model(tiny_model, dropout), _lora_model(tiny_model, dropout)
    use_fast_lora_dropout(ref_model), use_fast_lora_dropout(model)
    n = use_fused_lora_linear(model)
    assert n == sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert use_fused_lora_linear(model) == 0  # already routed
    ids = torch.randint(3, 100, (3, 10))
    outs = []
    for m in (ref_model, model):
        m.train()
        torch.manual_seed(7)
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = outs
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)
    # and the masks took part: two fused forwards with different seeds differ when dropout is on
    if dropout:
        torch.manual_seed(8)
        assert not torch.allclose(model(input_ids=ids).logits, l2)


def _bf16_lora_step(model, ids, seed: int):
    """One bf16-autocast training forward and backward: logits and the adapter gradients."""
    model.train()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_linear_under_bf16_is_as_close_to_fp32_as_peft(tiny_model, tmp_path, dropout):
    """CPU bf16 training with the frozen base in bf16: the fused forward rounds in another order than peft's
    (the adapter's product accumulated into the base matmul), so it is compared with the fp32 computation of the
    same masks: its error is no larger than peft's own bf16 error (and both are bf16-sized)."""
    from tunelab.train._cpu_speed import FrozenBf16, use_fast_lora_dropout, use_fused_lora_linear

    ids = torch.randint(3, 100, (3, 24), generator=torch.Generator().manual_seed(1))
    ref = _lora_model(tiny_model, dropout)
    use_fast_lora_dropout(ref)
    ref.train()
    torch.manual_seed(7)
    out = ref(input_ids=ids, labels=ids)  # fp32: the exact values both bf16 paths approximate
    out.loss.backward()
    l32, g32 = out.logits.detach(), {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    results = []
    for fused in (False, True):
        m = _lora_model(tiny_model, dropout)
        use_fast_lora_dropout(m)
        frozen = FrozenBf16(m, tmp_path)
        if fused:
            assert use_fused_lora_linear(m) > 0
        results.append(_bf16_lora_step(m, ids, 7))
        frozen.restore()
    (lp, gp), (lf, gf) = results

    def err(a, b):
        return float((a - b).norm() / b.norm())

    # bf16-sized errors (this tiny model's weights are large: ~2% on the logits, ~5% on the gradients) ...
    assert err(lf, l32) < 5e-2 and err(lp, l32) < 5e-2
    # ... and the fused path's no larger than peft's: on the logits, and on all adapter gradients together
    assert err(lf, l32) <= 1.1 * err(lp, l32), (err(lf, l32), err(lp, l32))
    cat = lambda g: torch.cat([g[k].flatten() for k in sorted(g32)])  # noqa: E731
    assert err(cat(gf), cat(g32)) <= 1.1 * err(cat(gp), cat(g32)), (err(cat(gf), cat(g32)), err(cat(gp), cat(g32)))
    assert all(gf[k].dtype == torch.float32 and err(gf[k], g32[k]) < 0.15 for k in g32)


def test_fused_lora_linear_under_bf16_casts_a_shared_input_once(tiny_model, tmp_path):
    """q, k and v read one input: the fused path casts it to bf16 once and the three saved copies are one tensor;
    autocast and peft cast it for each linear and each adapter. Per token and layer the fused path keeps less."""
    from tunelab.train import _cpu_speed
    from tunelab.train._cpu_speed import FrozenBf16, use_fast_lora_dropout, use_fused_lora_linear

    def saved(model):
        model.train()
        with _KeptBytes(model) as kept, torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=torch.randint(3, 100, (4, 64))).logits.float().sum()
        return kept.total

    sizes = []
    for fused in (False, True):
        m = _lora_model(tiny_model, 0.1)
        use_fast_lora_dropout(m)
        frozen = FrozenBf16(m, tmp_path)
        if fused:
            use_fused_lora_linear(m)
            casts = []
            real = _cpu_speed._cast_shared

            def counting(x, dtype):
                y = real(x, dtype)
                casts.append(None if y is x else y.untyped_storage().data_ptr())  # None: bf16 already
                return y

            _cpu_speed._cast_shared = counting
        try:
            sizes.append(saved(m))
        finally:
            if fused:
                _cpu_speed._cast_shared = real
            frozen.restore()
    layers = m.config.num_hidden_layers
    # q/k/v (one input), o (bf16 already), gate/up (one input), down (bf16 already): 2 casts a layer
    made = [c for c in casts if c is not None]
    assert len(casts) == 7 * layers and len(made) == 5 * layers and len(set(made)) == 2 * layers, casts
    assert sizes[1] < 0.9 * sizes[0], sizes


def test_fused_lora_linear_falls_back_to_peft_outside_fp32_training(tiny_model):
    """Eval, no-grad, a disabled adapter and autocast take peft's own forward: the fused path is only for training."""
    from tunelab.train import _cpu_speed

    model = _lora_model(tiny_model, 0.1)
    _cpu_speed.use_fused_lora_linear(model)
    calls = []
    real = _cpu_speed._FusedLoraLinear.apply
    _cpu_speed._FusedLoraLinear.apply = lambda *a: calls.append(1) or real(*a)
    try:
        ids = torch.randint(3, 100, (2, 8))
        model.eval()
        model(input_ids=ids)
        model.train()
        with torch.no_grad():
            model(input_ids=ids)
        with model.disable_adapter():
            model(input_ids=ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        assert calls == []
        model(input_ids=ids)
        assert calls  # fp32 training with gradients on: fused
    finally:
        _cpu_speed._FusedLoraLinear.apply = real


def test_fused_lora_linear_keeps_less_for_backward(tiny_model):
    """What autograd keeps for backward in one training forward: the fused path saves the layer input once and a
    1-byte mask instead of an fp32 masked copy per adapted linear."""
    from tunelab.train._cpu_speed import use_fast_lora_dropout, use_fused_lora_linear

    def saved_bytes(model):
        model.train()
        with _KeptBytes(model) as kept:
            model(input_ids=torch.randint(3, 100, (4, 64))).logits.sum()
        return kept.total

    plain, fused = _lora_model(tiny_model, 0.1), _lora_model(tiny_model, 0.1)
    use_fast_lora_dropout(plain), use_fast_lora_dropout(fused)
    use_fused_lora_linear(fused)
    # per token and layer the plain path keeps an fp32 masked copy of each adapted linear's input (q, k, v, o,
    # gate, up: hidden; down: intermediate); the fused one keeps each distinct input once (q/k/v share one,
    # gate/up another): the difference is the copies minus those four inputs (the 1-byte masks are on both sides)
    cfg = plain.config
    h, i, tokens = cfg.hidden_size, cfg.intermediate_size, 4 * 64
    expected = tokens * cfg.num_hidden_layers * 4 * ((6 * h + i) - (3 * h + i))
    assert saved_bytes(plain) - saved_bytes(fused) >= 0.9 * expected


def test_frozen_head_nll_exact_on_sharp_logits():
    """Logits hundreds of nats apart (a confident model): the clamp that keeps exp out of subnormals changes
    nothing a float32 cross-entropy can see, including a target far down the distribution."""
    import torch.nn.functional as F

    from tunelab.train.numerics import frozen_head_nll

    torch.manual_seed(0)
    weight = torch.randn(500, 32) * 40
    h1 = torch.randn(40, 32, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    logits = h1.detach() @ weight.t()
    assert (logits.amax(-1, keepdim=True) - logits).amax() > 300  # subnormal exps without the clamp
    t = torch.randint(0, 500, (40,))
    t[0] = logits[0].argmin()  # the least likely token: an NLL of hundreds of nats
    ref = F.cross_entropy(h1 @ weight.t(), t, reduction="sum")
    got = frozen_head_nll(h2, weight, t, chunk=16)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-3)
    ref.backward()
    got.backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_recomputed_swiglu_same_values_bit_for_bit_and_keeps_less(tiny_model, bf16):
    """The MLP's silu(gate) recomputed in backward: the ops autograd runs, so the logits and every gradient are
    identical; one [tokens x intermediate] activation fewer is kept per layer; eval takes the model's forward."""
    from tunelab.train._cpu_speed import use_fast_lora_dropout, use_recomputed_swiglu

    ids = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(2))
    results, kept = [], []
    for recompute in (False, True):
        m = _lora_model(tiny_model, 0.1)
        use_fast_lora_dropout(m)
        if recompute:
            assert use_recomputed_swiglu(m) == m.config.num_hidden_layers
            assert use_recomputed_swiglu(m) == 0  # already routed
        m.train()
        torch.manual_seed(5)
        with _KeptBytes(m) as k, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
        kept.append(k.total)
        m.eval()
        with torch.no_grad():
            results[-1] += (m(input_ids=ids).logits,)
    (l0, g0, e0), (l1, g1, e1) = results
    assert torch.equal(l0, l1) and torch.equal(e0, e1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    cfg = m.config
    one = 4 * 32 * cfg.intermediate_size * (2 if bf16 else 4)  # silu(gate) of one layer
    assert kept[0] - kept[1] >= cfg.num_hidden_layers * one * 0.99, (kept, one)


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_lora_linear_recomputes_norm_and_swiglu_inputs_bit_for_bit(tiny_model, tmp_path, bf16):
    """With the fused LoRA linear, q/k/v and gate/up keep their norm's input (which the norm keeps anyway) instead
    of its output, and down_proj keeps gate and up (which the recomputed MLP keeps) instead of act(gate) * up; each
    input is computed again in backward: the same logits and gradients bit for bit as keeping them, and per layer
    two [tokens x hidden] and one [tokens x intermediate] activations fewer."""
    from tunelab.train import _cpu_speed
    from tunelab.train._cpu_speed import FrozenBf16, use_fast_lora_dropout, use_fused_lora_linear, \
        use_recomputed_norms, use_recomputed_swiglu

    ids = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(3))
    results, kept, calls = [], [], []
    real = _cpu_speed._recomputed

    def counting(fn, inputs, dtype):
        out = real(fn, inputs, dtype)
        calls.append(out)
        return out

    for recompute in (False, True):
        m = _lora_model(tiny_model, 0.1)
        use_fast_lora_dropout(m)
        frozen = FrozenBf16(m, tmp_path) if bf16 else None
        assert use_fused_lora_linear(m) > 0 and use_recomputed_swiglu(m) == m.config.num_hidden_layers
        if recompute:
            assert use_recomputed_norms(m) == 2 * m.config.num_hidden_layers
            assert use_recomputed_norms(m) == 0  # already routed
        else:  # a view of down_proj's input does not carry the recipe: down_proj keeps it
            for name, mod in m.named_modules():
                if name.endswith("mlp.down_proj"):
                    mod.register_forward_pre_hook(lambda mod, args: (args[0].view_as(args[0]),))
        m.train()
        torch.manual_seed(5)
        _cpu_speed._recomputed = counting
        try:
            with _KeptBytes(m) as k, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = m(input_ids=ids, labels=ids)
            out.loss.backward()
        finally:
            _cpu_speed._recomputed = real
        results.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
        kept.append(k.total)
        if frozen is not None:
            frozen.restore()
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    cfg, tokens, a = m.config, 4 * 32, 2 if bf16 else 4
    layers, h, i = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    # 6 adapted linears a layer read a recomputable input (not o_proj), computed 3 times: q/k/v share one, gate/up one
    fresh = sum(1 for before, now in zip([None, *calls], calls) if now is not before)
    assert len(calls) == 6 * layers and fresh == 3 * layers, (len(calls), fresh)
    # the first layer's norm input (the frozen embedding's fp32 output) is kept only for the recomputation
    assert kept[0] - kept[1] >= 0.99 * tokens * (layers * (i + 2 * h) * a - h * 4), (kept, tokens * (i + 2 * h) * a)


def test_fused_lora_linear_keeps_an_input_changed_in_place_after_it_was_marked():
    """An input marked recomputable but changed in place before the fused linear reads it is kept as it is: the
    recipe would compute the unchanged value."""
    from tunelab.train._cpu_speed import _FusedLoraLinear, recomputable

    torch.manual_seed(0)
    src = torch.randn(6, 8, requires_grad=True)
    weight, A, B = torch.randn(5, 8), torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)

    def grads(change: bool):
        x = recomputable(src * 2, lambda t: t * 2, src)
        if change:
            x.add_(1.0)  # after marking: the recipe no longer computes x
        y = _FusedLoraLinear.apply(x, weight, None, A, B, None, 0.5, None)
        gA, = torch.autograd.grad(y.sum(), [A])
        return gA

    x_true = src.detach() * 2 + 1.0
    gu = torch.ones(6, 5) @ B.detach()  # dL/du for L = sum(y)
    torch.testing.assert_close(grads(True), (gu.t() @ x_true) * 0.5)
    torch.testing.assert_close(grads(False), (gu.t() @ (src.detach() * 2)) * 0.5)


def test_every_listed_swiglu_mlp_computes_what_the_recompute_assumes():
    """The recompute replaces a forward it assumes is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: true for
    every class it lists in the installed transformers (a release that changes one fails here)."""
    import importlib
    import inspect
    import re

    from tunelab.train._cpu_speed import SWIGLU_MLPS

    for cls in SWIGLU_MLPS:
        name = re.sub(r"MLP$", "", cls).lower()
        mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        src = inspect.getsource(getattr(mod, cls).forward)
        assert "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))" in src, cls


def test_frozen_head_nll_reuses_the_cast_head_until_it_changes():
    """Under grad the bf16 cast of the frozen head is kept between steps: the same tensor while the weight is
    unchanged, a new one after an in-place change or a new ``.data``; the loss and gradient always those of a
    fresh computation; released at the end of training."""
    from tunelab.train import numerics

    torch.manual_seed(0)
    weight = torch.randn(300, 16)
    t = torch.randint(0, 300, (24,))

    def step(w):
        h = torch.randn(24, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = numerics.frozen_head_nll(h, w, t, chunk=10)
        loss.backward()
        return loss.detach(), h.grad, numerics._head_workspace().weight[4]

    def fresh(w):
        numerics.release_head_workspace()
        return step(w)[:2]

    numerics.release_head_workspace()
    l1, g1, c1 = step(weight)
    l2, g2, c2 = step(weight)
    assert c2 is c1 and torch.equal(l1, l2) and torch.equal(g1, g2)
    weight.mul_(1.5)  # in place: a new cast
    l3, g3, c3 = step(weight)
    assert c3 is not c1
    lf, gf = fresh(weight)
    assert torch.equal(l3, lf) and torch.equal(g3, gf) and not torch.equal(l3, l1)
    step(weight)
    weight.data = torch.randn(300, 16)  # new storage: a new cast
    l4, g4, _ = step(weight)
    lf, gf = fresh(weight)
    assert torch.equal(l4, lf) and torch.equal(g4, gf)
    numerics.release_head_workspace()
    assert numerics._head_workspace().weight is None and not numerics._head_workspace().buffers


def test_fused_lora_linear_under_gradient_checkpointing_draws_the_same_masks(tiny_model):
    """Checkpointing recomputes a layer's forward in backward: the fused path's dropout mask comes from torch's
    generator, whose state checkpointing restores, so the recomputed mask is the one of the forward pass and the
    gradients equal those of the same run without checkpointing."""
    from tunelab.train._cpu_speed import use_fast_lora_dropout, use_fused_lora_linear

    grads = []
    for ckpt in (False, True):
        model = _lora_model(tiny_model, 0.2)
        use_fast_lora_dropout(model)
        use_fused_lora_linear(model)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
