"""One forward per preference pair: the prompt that chosen and rejected share goes through the model once.

DPO (the policy and the reference forward) and reward-model training feed a batch as ``[chosen rows; rejected
rows]``: row ``i`` is prompt ``i`` followed by the chosen response, row ``i + B`` the same prompt followed by the
rejected one, right-padded (TRL's preference collators). Both rows compute the same hidden states over the shared
prompt, twice. :class:`SharedPromptForward`, installed on the decoder backbone, turns such a batch into one row per
pair, ``shared prefix | rest of chosen | rest of rejected``, with a 4D mask in which each response sees the prefix
and itself (not the other response) and position ids that restart after the prefix for the rejected part, runs the
backbone once on those rows and scatters the hidden states back to the ``[2B, L]`` layout the caller expects. The
head (TRL's fused log-prob head, a reward score head) then runs unchanged.

Same values as the padded batch up to floating-point rounding (causal attention: a prefix position sees only the
prefix, which is the same tokens in both rows); the gradient of a shared position is the sum of both rows'
(tests/unit/test_shared_prompt.py). The shared prefix is the longest common prefix of the two rows' tokens, so a
response start both share (``"I"``) is shared too. With LoRA dropout > 0 both responses see one dropout mask on the
prefix instead of two independent ones: still an unbiased draw, not the same random numbers.

Active only inside :func:`paired_batches` (the trainers' loss computations, whose batches have this layout); any
other call, or a batch that is not two right-padded halves, runs the backbone's own forward untouched.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

_state = threading.local()

# the attention implementations whose masks are known here: SDPA takes a bool mask (True: attend), eager-style
# implementations (the model's eager attention, tunelab's checkpointed eager) add a float mask
_BOOL_MASK = ("sdpa",)
_ADDITIVE_MASK = ("eager",)


@contextlib.contextmanager
def paired_batches():
    """Within this block, a backbone with :class:`SharedPromptForward` installed reads each even batch as
    ``[chosen; rejected]`` pairs."""
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def backbone_of(model) -> torch.nn.Module | None:
    """The decoder stack under a (peft-wrapped) causal-LM or sequence-classification model: ``model.model`` for
    Llama-style models (``base_model_prefix``), or None."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(m, "base_model_prefix", None)
    inner = getattr(m, prefix, None) if prefix else None
    return inner if isinstance(inner, torch.nn.Module) and inner is not m else None


def _right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's length where every row attends to exactly its first positions (right padding), else None."""
    mask = attention_mask.to(torch.bool)
    lens = mask.sum(dim=1)
    ok = bool((mask == (torch.arange(mask.shape[1], device=mask.device)[None, :] < lens[:, None])).all())
    return lens if ok else None


@dataclass
class PairLayout:
    """Where each token of a ``[2B, L]`` paired batch sits in the ``[B, T]`` shared-prefix rows."""

    ids: torch.Tensor        # [B, T] token ids of the shared-prefix rows (padding: the pad id of the batch)
    positions: torch.Tensor  # [B, T] position ids: 0.. for prefix + chosen, restarting at the prefix for rejected
    allowed: torch.Tensor    # [B, T, T] bool: query row may attend to key column
    index: torch.Tensor      # [2B * L] index into the flattened [B * T] rows, B * T for padding (a zero row)
    shared: list[int]        # shared prefix length per pair
    tokens_in: int           # 2B * L: positions the padded batch computes
    tokens_out: int          # B * T: positions the shared-prefix rows compute


def pair_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PairLayout | None:
    """The shared-prefix layout of a ``[chosen; rejected]`` batch, or None when the batch is not one (odd batch,
    a row not right-padded, nothing saved)."""
    if input_ids.dim() != 2 or attention_mask is None or attention_mask.shape != input_ids.shape:
        return None
    n, L = input_ids.shape
    if n < 2 or n % 2:
        return None
    lens = _right_padded_lengths(attention_mask)
    if lens is None:
        return None
    B = n // 2
    lens = lens.tolist()
    ids_cpu = input_ids.detach().cpu()
    shared, rows = [], []
    for i in range(B):
        lc, lr = lens[i], lens[i + B]
        m = min(lc, lr)
        diff = (ids_cpu[i, :m] != ids_cpu[i + B, :m]).nonzero()
        s = int(diff[0, 0]) if len(diff) else m
        shared.append(s)
        rows.append((lc, lr, s))
    T = max(lc + lr - s for lc, lr, s in rows)
    if B * T >= n * L:  # nothing to save (no common prefix, or it is all padding anyway)
        return None
    pad = int(ids_cpu[0, lens[0]]) if lens[0] < L else int(ids_cpu[0, -1])  # any id: padded positions are masked
    ids = torch.full((B, T), pad, dtype=input_ids.dtype)
    pos = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.zeros((B, T, T), dtype=torch.bool)
    index = torch.full((n * L,), B * T, dtype=torch.long)
    for i, (lc, lr, s) in enumerate(rows):
        r = lr - s  # rejected tokens after the shared prefix
        ids[i, :lc] = ids_cpu[i, :lc]
        ids[i, lc:lc + r] = ids_cpu[i + B, s:lr]
        pos[i, :lc] = torch.arange(lc)
        pos[i, lc:lc + r] = torch.arange(s, lr)
        allowed[i, :lc, :lc] = torch.ones(lc, lc, dtype=torch.bool).tril()
        allowed[i, lc:lc + r, :s] = True
        allowed[i, lc:lc + r, lc:lc + r] = torch.ones(r, r, dtype=torch.bool).tril()
        idle = torch.arange(lc + r, T)
        allowed[i, idle, idle] = True  # padding attends to itself only: no fully masked softmax row
        index[i * L: i * L + lc] = i * T + torch.arange(lc)
        j = (i + B) * L
        index[j: j + s] = i * T + torch.arange(s)
        index[j + s: j + lr] = i * T + lc + torch.arange(r)
    dev = input_ids.device
    return PairLayout(ids.to(dev), pos.to(dev), allowed.to(dev), index.to(dev), shared, n * L, B * T)


class SharedPromptForward:
    """Replaces a decoder backbone's ``forward`` (``install``) until ``remove``; counts the positions it saved."""

    def __init__(self, backbone: torch.nn.Module):
        self.backbone = backbone
        self.original = backbone.forward
        self.calls = 0
        self.tokens_in = 0
        self.tokens_out = 0

    @classmethod
    def supports(cls, model) -> str | None:
        """None when the model's attention and backbone take the shared-prefix rows; otherwise why not."""
        backbone = backbone_of(model)
        if backbone is None:
            return "no decoder backbone found under the model"
        impl = str(getattr(backbone.config, "_attn_implementation", None))
        if impl not in _BOOL_MASK and impl not in _ADDITIVE_MASK and not impl.startswith("tunelab_"):
            return f"{impl} attention takes no custom 4D mask here"
        if getattr(backbone.config, "sliding_window", None) or getattr(backbone.config, "layer_types", None) and \
                any(t != "full_attention" for t in backbone.config.layer_types):
            return "sliding-window attention layers build their own masks"
        return None

    def install(self) -> SharedPromptForward:
        self._before = self.backbone.__dict__.get("forward")  # another wrapper already there (nested use)
        self.backbone.forward = self
        return self

    def remove(self) -> None:
        if self.backbone.__dict__.get("forward") is self:
            if self._before is None:
                del self.backbone.forward
            else:
                self.backbone.forward = self._before

    def __call__(self, *args, **kwargs):
        if not getattr(_state, "on", False):
            return self.original(*args, **kwargs)
        input_ids = args[0] if args else kwargs.get("input_ids")
        others = set(kwargs) - {"input_ids", "attention_mask", "use_cache", "return_dict", "output_attentions",
                                "output_hidden_states", "position_ids", "past_key_values", "inputs_embeds",
                                "cache_position"}
        plain = (len(args) > 1 or others or input_ids is None or any(kwargs.get(k) is not None for k in (
            "position_ids", "past_key_values", "inputs_embeds")) or kwargs.get("use_cache")
            or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"))
        lay = None if plain else pair_layout(input_ids, kwargs.get("attention_mask"))
        if lay is None:
            return self.original(*args, **kwargs)
        out = self.original(input_ids=lay.ids, attention_mask=self._mask(lay.allowed), position_ids=lay.positions,
                            use_cache=False)
        h = out.last_hidden_state
        B, T, H = h.shape
        flat = torch.cat([h.reshape(B * T, H), h.new_zeros(1, H)])
        out.last_hidden_state = flat.index_select(0, lay.index).view(*input_ids.shape, H)
        self.calls += 1
        self.tokens_in += lay.tokens_in
        self.tokens_out += lay.tokens_out
        return out

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        impl = str(getattr(self.backbone.config, "_attn_implementation", None))
        if impl in _BOOL_MASK:
            return allowed[:, None]
        dtype = self.backbone.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return m.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


NAME = "shared prompt forward"


@contextlib.contextmanager
def pairs_once(model):
    """For an evaluation that feeds ``model`` ``[chosen; rejected]`` batches: the shared prompt forward on its
    backbone where the model supports it (otherwise the padded batches as they are), inside paired_batches()."""
    fwd = SharedPromptForward(backbone_of(model)).install() if SharedPromptForward.supports(model) is None else None
    try:
        with paired_batches():
            yield fwd
    finally:
        if fwd is not None:
            fwd.remove()


def paired_trainer(base, *methods: str):
    """``base`` (a TRL trainer class) with each of ``methods`` run inside :func:`paired_batches`: the methods whose
    model calls carry ``[chosen; rejected]`` batches (DPO's loss and reference log-probs, the reward loss)."""

    def wrap(name: str):
        inner = getattr(base, name)

        def method(self, *args, **kwargs):
            with paired_batches():
                return inner(self, *args, **kwargs)

        method.__name__ = name
        return method

    return type(f"Paired{base.__name__}", (base,), {m: wrap(m) for m in methods})


@contextlib.contextmanager
def shared_prompts(speed, *models):
    """For the block: :class:`SharedPromptForward` on the backbone of each model (the policy, a separate
    reference) where ``speed`` (a run's Speedups) is on and every model supports it; the decision and, after
    the block, the share of padded positions it did not compute are noted on ``speed``."""
    why = None if speed.on else "off (train.speedups: off)"
    why = why or next((w for w in map(SharedPromptForward.supports, models) if w), None)
    speed.note(NAME, why is None, why or "the prompt chosen and rejected share runs once per pair")
    fwds = [SharedPromptForward(backbone_of(m)).install() for m in models] if why is None else []
    try:
        yield fwds
    finally:
        for f in fwds:
            f.remove()
        if fwds:
            _note_saved(speed, NAME, sum(f.tokens_in for f in fwds), sum(f.tokens_out for f in fwds),
                        "no batch had a prefix its chosen and rejected sequences share (e.g. prompts cut "
                        "differently for each response)")


def _note_saved(speed, name: str, positions: int, computed: int, why_none: str) -> None:
    """After training, on a speed-up that was applied: the share of the padded batches' positions it did not
    compute; or, where it never engaged, the speed-up moved to "not applied" with ``why_none`` (not claimed)."""
    if positions:
        speed.applied[name] += (f": {1 - computed / positions:.0%} of the padded batches' positions not computed "
                                f"({computed:,} of {positions:,} computed)")
    else:
        del speed.applied[name]
        speed.note(name, False, why_none)


# ----------------------------------------------------------------------------- SFT: one prefix for the whole batch

PREFIX_NAME = "shared prompt prefix"
MIN_PREFIX = 8  # tokens: below this the second decoder call costs more than the positions it saves


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> int:
    """The longest prefix of token ids every row of a right-padded SFT batch starts with (a system prompt and the
    chat template's header), cut so that no labelled token is predicted from inside it and every row keeps a token
    after it; 0 when the batch is not right-padded or has one row."""
    n, L = input_ids.shape
    if n < 2:
        return 0
    if attention_mask is not None:
        lens = _right_padded_lengths(attention_mask)
        if lens is None:
            return 0
        shortest = int(lens.min())
    else:
        shortest = L
    same = (input_ids == input_ids[:1]).all(dim=0)
    p = int(same.to(torch.int8).cumprod(0).sum())  # leading positions where every row agrees
    labelled = labels != -100
    first = labelled.to(torch.int8).argmax(dim=1)
    first = torch.where(labelled.any(dim=1), first, torch.full_like(first, L))  # a row without labels: no limit
    # a labelled token t is predicted from position t - 1: every such position stays after the prefix
    return max(0, min(p, shortest - 1, int(first.min()) - 1))


def shared_prefix_hidden(decoder, inputs: dict, stats: dict | None = None):
    """The decoder's last hidden states for an SFT batch whose rows start with the same tokens, the prefix computed
    once: one forward over ``[1, P]`` keeps its keys and values (with their autograd history), which the rest of
    every row, ``[B, L - P]``, attends to as a cache expanded over the batch; the gradients of the prefix are the
    sum over the rows. Same values as one forward over ``[B, L]`` up to rounding (tests/unit/test_shared_prompt.py).
    Returns None where it does not apply (no prefix of ``MIN_PREFIX`` tokens, packed rows with position ids, a
    checkpointed decoder whose layers drop caches, caches other than plain dynamic ones). ``stats`` accumulates
    ``positions`` (B x L) and ``computed`` (P + B x (L - P))."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
    if inputs.get("position_ids") is not None or getattr(decoder, "gradient_checkpointing", False):
        return None
    p = common_prefix_length(ids, mask, labels)
    if p < MIN_PREFIX:
        return None
    n, L = ids.shape
    pre = decoder(input_ids=ids[:1, :p], use_cache=True)
    cache = pre.past_key_values
    if not isinstance(cache, DynamicCache) or any(type(x) is not DynamicLayer for x in cache.layers):
        return None
    for layer in cache.layers:
        layer.keys = layer.keys.expand(n, -1, -1, -1)
        layer.values = layer.values.expand(n, -1, -1, -1)
    rest = decoder(input_ids=ids[:, p:], attention_mask=mask, past_key_values=cache, use_cache=True)
    if stats is not None:
        stats["positions"] = stats.get("positions", 0) + n * L
        stats["computed"] = stats.get("computed", 0) + p + n * (L - p)
    return torch.cat([pre.last_hidden_state.expand(n, -1, -1), rest.last_hidden_state], dim=1)


def note_prefix_saved(speed, stats: dict) -> None:
    """After training: the share of positions the shared prefix did not compute, on the run's speed-up record; or,
    where no batch had one, the speed-up moved to "not applied" with the reason."""
    _note_saved(speed, PREFIX_NAME, stats.get("positions", 0), stats.get("computed", 0),
                f"no batch's rows started with {MIN_PREFIX} or more tokens in common")
