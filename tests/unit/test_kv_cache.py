"""The engine's KV-cache layer (tunelab/models/kv_cache.py) writes in place: a decoding step writes only its new
column, removing a finished row copies only the rows moved into its hole, a joining row is written into the spare
rows, and the whole engine still decodes exactly what transformers' generate decodes for each prompt alone, with
rows finishing at different steps, rows joining mid-decode with prompts shorter and longer than the running cache,
and a batched forward that fails half-way through the model's layers (rolled back, each row run alone)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tunelab.models import kv_cache
from tunelab.models.kv_cache import LEFT, RIGHT, SlackLayer

H, D = 2, 4


class _Written(TorchDispatchMode):
    """Counts the elements the aten ops run under it write: an in-place op's target (for ``index_copy_``, the
    rows copied), a new tensor's elements (an allocation alone writes nothing); views write nothing."""

    ALLOC = {"empty", "new_empty", "empty_strided", "new_empty_strided", "empty_like"}

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in self.ALLOC:
            return out
        if name.endswith("_"):
            self.elements += (args[3] if name == "index_copy_" else args[0]).numel()
        else:
            self.elements += sum(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                                 if isinstance(t, torch.Tensor))
        return out


def _kv(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, t, D, generator=g), torch.randn(b, H, t, D, generator=g)


def _padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``x`` with each row's leading columns (all but its last ``lengths[i]``) zeroed: left padding."""
    x = x.clone()
    for i, n in enumerate(lengths):
        x[i, :, : x.shape[2] - n] = 0
    return x


def test_a_step_writes_its_column_in_place_until_the_spare_room_is_used():
    k, v = _kv(3, 10, 0)
    layer = SlackLayer.adopt(k, v, batch_capacity=5)
    assert layer.capacity() == (5, LEFT + 10 + RIGHT)
    ptr = layer.keys.untyped_storage().data_ptr()
    ref_k, ref_v = k, v
    for step in range(RIGHT):
        nk, nv = _kv(3, 1, 100 + step)
        with _Written() as w:
            out_k, out_v = layer.update(nk, nv)
        assert w.elements == nk.numel() + nv.numel()  # the new column only, not the cache
        ref_k, ref_v = torch.cat([ref_k, nk], 2), torch.cat([ref_v, nv], 2)
        assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
        assert out_k.untyped_storage().data_ptr() == ptr
        assert layer.get_seq_length() == 10 + step + 1 and layer.get_mask_sizes(1) == (10 + step + 2, 0)
    nk, nv = _kv(3, 1, 999)
    out_k, _ = layer.update(nk, nv)  # the room is used up: one copy into a fresh buffer with room again
    assert out_k.untyped_storage().data_ptr() != ptr
    assert torch.equal(out_k, torch.cat([ref_k, nk], 2))
    assert layer.capacity() == (5, LEFT + 10 + RIGHT + 1 + RIGHT)


def test_removing_rows_copies_only_the_rows_moved_into_the_holes_and_trims_without_copying():
    k, v = _kv(6, 12, 1)
    lengths = [5, 12, 9, 4, 7, 3]  # real columns of each row: once row 1 leaves, 3 columns are padding in all
    k, v = _padded(k, lengths), _padded(v, lengths)
    layer = SlackLayer.adopt(k, v, batch_capacity=6)
    ptr = layer.keys.untyped_storage().data_ptr()
    row0 = layer.keys[0].data_ptr()
    # keep rows 0, 2, 3, 5 of 6: row 5 moves into hole 1 (row 4 is dropped); rows 0, 2, 3 stay where they are
    with _Written() as w:
        layer.keep_rows(torch.tensor([1]), torch.tensor([5]), 4, first=3)
    assert w.elements == 2 * 2 * H * 12 * D  # one row of keys and one of values, read out and written in: no more
    order = [0, 5, 2, 3]
    assert torch.equal(layer.keys, k[order][:, :, 3:]) and torch.equal(layer.values, v[order][:, :, 3:])
    assert layer.keys.untyped_storage().data_ptr() == ptr and layer.keys[0].data_ptr() == row0 + 3 * D * 4
    assert layer.get_seq_length() == 9
    with _Written() as w:
        layer.keep_rows(None, None, 2, first=2)  # drop the last two rows and two columns: no copy at all
    assert w.elements == 0
    assert torch.equal(layer.keys, k[[0, 5]][:, :, 5:])


def test_joining_rows_go_into_the_spare_rows_and_longer_prompts_into_the_spare_columns():
    k, v = _kv(3, 10, 2)
    layer = SlackLayer.adopt(k, v, batch_capacity=8)
    assert layer.capacity() == (6, LEFT + 10 + RIGHT)  # room for twice the rows, at most batch_capacity
    ptr = layer.keys.untyped_storage().data_ptr()

    nk, nv = _kv(1, 6, 3)  # shorter than the cache: left-padded with zero columns, the old rows untouched
    with _Written() as w:
        layer.join(nk, nv)
    assert w.elements == 2 * H * 10 * D  # the new row (its zeros and its keys/values), nothing of the old rows
    ref_k = torch.cat([k, torch.nn.functional.pad(nk, (0, 0, 4, 0))])
    ref_v = torch.cat([v, torch.nn.functional.pad(nv, (0, 0, 4, 0))])
    assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)

    nk, nv = _kv(1, 10 + LEFT, 4)  # longer by all the spare room on the left: the old rows gain zero columns
    with _Written() as w:
        layer.join(nk, nv)
    assert w.elements == 2 * (4 * H * LEFT * D + nk.numel())  # zeros for the old rows + the new row, no move
    ref_k = torch.cat([torch.nn.functional.pad(ref_k, (0, 0, LEFT, 0)), nk])
    ref_v = torch.cat([torch.nn.functional.pad(ref_v, (0, 0, LEFT, 0)), nv])
    assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)
    assert layer.keys.untyped_storage().data_ptr() == ptr

    nk, nv = _kv(1, 11 + LEFT, 5)  # one column more than the room left: one copy into a fresh buffer
    layer.join(nk, nv)
    assert layer.keys.untyped_storage().data_ptr() != ptr
    assert torch.equal(layer.keys, torch.cat([torch.nn.functional.pad(ref_k, (0, 0, 1, 0)), nk]))
    assert layer.capacity() == (8, LEFT + 11 + LEFT + RIGHT)
    nk, nv = _kv(3, 3, 6)  # more rows than the room left: a fresh buffer with the rows needed
    layer.join(nk, nv)
    assert layer.keys.shape[0] == 9 and layer.capacity()[0] == 9
    layer.keep_rows(None, None, 2)
    layer.update(*_kv(2, RIGHT + 1, 7))  # the next copy makes room for twice the rows left
    assert layer.capacity()[0] == 4


def test_assigning_keys_keeps_dynamic_layer_semantics():
    """What transformers and the engine's rollback assign: a window of the layer's own buffer (the views saved
    before a step) puts the window back; anything else is taken as it is (crop, batch_select_indices, reset)."""
    from transformers.cache_utils import DynamicLayer

    k, v = _kv(3, 8, 7)
    layer = SlackLayer.adopt(k, v, batch_capacity=4)
    plain = DynamicLayer()
    plain.update(k, v)
    saved = layer.keys, layer.values
    ptr = saved[0].untyped_storage().data_ptr()
    nk, nv = _kv(3, 1, 8)
    layer.update(nk, nv)
    layer.keys, layer.values = saved  # the step rolled back: the buffer stays, the column written is outside
    assert layer.get_seq_length() == 8 and layer.capacity() == (4, LEFT + 8 + RIGHT)
    nk, nv = _kv(3, 1, 9)
    for x in (layer, plain):
        x.update(nk, nv)
    assert torch.equal(layer.keys, plain.keys) and layer.keys.untyped_storage().data_ptr() == ptr
    for x in (layer, plain):
        x.crop(-2)
    assert torch.equal(layer.keys, plain.keys) and layer.keys.untyped_storage().data_ptr() == ptr
    for x in (layer, plain):
        x.batch_select_indices(torch.tensor([2, 0]))
        x.update(*_kv(2, 1, 10))
    assert torch.equal(layer.keys, plain.keys) and torch.equal(layer.values, plain.values)
    for x in (layer, plain):
        x.reset()
    assert layer.keys is None and not layer.is_initialized and layer.capacity() == (0, 0)
    for x in (layer, plain):
        x.update(*_kv(1, 2, 11))
    assert torch.equal(layer.keys, plain.keys) and layer.get_seq_length() == 2


# ------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def _alone(model, tok, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generate on the prompt alone (no padding), without the EOS it stopped at."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, len(prompt):].tolist()
    return new[:-1] if new and new[-1] == tok.eos_token_id else new


def _jobs(tok):
    """(prompt, answer length): lengths that make rows finish at different steps, prompts much shorter and much
    longer than the running cache when they join."""
    words = "What color is the small cat ? Tell me the color of the big dog and the old bird".split()
    ids = tok(" ".join(words * 6), add_special_tokens=False)["input_ids"]
    plan = [(3, 9), (40, 4), (7, 15), (2, 6), (60, 3), (11, 12), (1, 20), (45, 5), (5, 2), (30, 8), (4, 11),
            (70, 6)]
    return [([tok.bos_token_id] + ids[:n], m) for n, m in plan]


@pytest.mark.parametrize("room", [(LEFT, RIGHT), (2, 3)])
def test_engine_decodes_as_generate_alone_while_rows_leave_and_join(model_and_tok, monkeypatch, room):
    """Every path of the cache (steps in place and at a full buffer, holes filled by the last rows, trims, joins
    into spare rows, into spare columns and into a fresh buffer) gives each request generate's tokens alone."""
    from tunelab.models.engine import Engine, GenRequest

    monkeypatch.setattr(kv_cache, "LEFT", room[0])
    monkeypatch.setattr(kv_cache, "RIGHT", room[1])
    calls = {"fresh": 0, "join": 0, "moved": 0}
    fresh, join, keep = kv_cache._Slot.fresh, kv_cache._Slot.join, kv_cache._Slot.keep
    monkeypatch.setattr(kv_cache._Slot, "fresh", lambda s, *a, **k: (calls.__setitem__("fresh", calls["fresh"] + 1),
                                                                       fresh(s, *a, **k))[1])
    monkeypatch.setattr(kv_cache._Slot, "join", lambda s, *a: (calls.__setitem__("join", calls["join"] + 1),
                                                                join(s, *a))[1])
    monkeypatch.setattr(kv_cache._Slot, "keep", lambda s, dst, *a: (
        calls.__setitem__("moved", calls["moved"] + (dst is not None)), keep(s, dst, *a))[1])
    model, tok = model_and_tok
    jobs = _jobs(tok)
    engine = Engine(model, {tok.eos_token_id}, max_batch_size=4, prefill_batch=1)
    reqs = [GenRequest(p, tok, lambda *a: None, adapter=None, max_tokens=m) for p, m in jobs]
    engine.run(reqs)
    assert {r.finish_reason for r in reqs} <= {"stop", "length"}
    for r, (p, m) in zip(reqs, jobs):
        assert r.out_ids == _alone(model, tok, p, m), (len(p), m)
    assert calls["join"] > 0 and calls["moved"] > 0, calls
    assert engine._cache is None and engine._mask is None  # the batch emptied: the buffers are released


def test_a_decoding_step_does_not_reallocate_and_the_room_stays_bounded(model_and_tok):
    from tunelab.models.engine import Engine, GenRequest

    model, tok = model_and_tok
    jobs = _jobs(tok)[:4]
    engine = Engine(model, set(), max_batch_size=4, prefill_batch=4)
    reqs = [GenRequest(p, tok, lambda *a: None, adapter=None, max_tokens=200) for p, _ in jobs]
    with torch.inference_mode():
        engine._tick(reqs)
        layers = engine._cache.layers
        assert all(type(layer) is SlackLayer for layer in layers)
        width = engine._mask.shape[1]
        ptrs = [layer.keys.untyped_storage().data_ptr() for layer in layers]
        for _ in range(RIGHT - 1):
            engine._tick([])
            assert [layer.keys.untyped_storage().data_ptr() for layer in layers] == ptrs
        for _ in range(3 * RIGHT):
            engine._tick([])
            for layer in layers:  # compacted each time the room ran out: never more than the window + the room
                assert layer.capacity()[1] <= LEFT + layer.get_seq_length() + RIGHT
                assert layer.capacity()[0] == 4
        assert engine._mask.shape[1] == width + 4 * RIGHT - 1
    for r in reqs:
        r.cancelled = True
    with torch.inference_mode():
        engine._tick([])
    assert engine._cache is None


def test_a_batched_forward_failing_half_way_through_the_layers_is_rolled_back(model_and_tok, monkeypatch):
    """The first layer's cache is already written in place when the second layer raises: the rollback puts every
    layer's window back, each row runs alone on its slice and then the batch goes on, all tokens as generate's."""
    from tunelab.models.engine import Engine, GenRequest

    model, tok = model_and_tok
    jobs = _jobs(tok)[:6]
    engine = Engine(model, {tok.eos_token_id}, max_batch_size=3, prefill_batch=1)
    state = {"steps": 0, "raised": 0}
    second = model.model.layers[1]

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[0] > 1 and h.shape[1] == 1:  # a batched decoding step
            state["steps"] += 1
            if state["steps"] in (3, 7, 8):
                state["raised"] += 1
                raise RuntimeError("injected failure half-way through the model")

    handle = second.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        reqs = [GenRequest(p, tok, lambda *a: None, adapter=None, max_tokens=m) for p, m in jobs]
        engine.run(reqs)
    finally:
        handle.remove()
    assert state["raised"] == 3
    assert {r.finish_reason for r in reqs} <= {"stop", "length"}
    for r, (p, m) in zip(reqs, jobs):
        assert r.out_ids == _alone(model, tok, p, m), (len(p), m)
