"""The continuous-batching engine's KV-cache layer (tunelab/models/engine.py): decoding writes in place.

transformers' ``DynamicLayer.update`` concatenates each step's keys and values to the cached ones, so every
decoding step copies the whole cache of every layer (on SmolLM2-135M at batch 50 with ~100 cached tokens, on a
2-core CPU, that copy was 30% of a step). ``SlackLayer`` keeps each layer's keys and values in a buffer with spare
room, ``[batch capacity, heads, columns, head dim]``, and hands the model views of it, ``buf[:rows, :, s:e]``
(the window of real columns):

- ``update`` (a step) writes the new columns at ``[e, e + q)`` in place and widens the window; only when the
  buffer's right end is reached is it copied into a fresh one (``LEFT`` + the window + ``RIGHT`` columns), once
  every ``RIGHT`` steps, which also gives back the columns trimmed off the left since.
- ``join`` (prefilled rows join the batch) writes the new rows into the spare rows, right-aligned in time; a
  prompt longer than the window takes columns from the spare room on the left (zeroed for the old rows), so
  the old rows are not moved unless that room or the rows run out (then one copy into a fresh buffer).
- ``keep_rows`` (rows finished) moves the last surviving rows into the holes (copies the moved rows only) and
  narrows the window past leading columns that are padding in every surviving row (no copy at all).

The engine's invariant holds in every case: a padding column of a row holds zeros (the 2D attention mask marks
it). Nothing outside the window is ever read, so the spare room is never cleared.

The subclass of ``DynamicLayer`` is what lets ``DynamicCache`` and the models' attention and mask code take it
unchanged: they read ``keys``/``values`` (the views), ``get_seq_length``/``get_mask_sizes`` (the window's
width) and ``is_initialized``. Anything that assigns ``keys``/``values`` (transformers' ``crop``,
``batch_select_indices``, ``reset``, offloading; the engine's rollback of a failed step) goes through a setter:
a window of the layer's own buffer (e.g. the views saved before a step) just moves the window back; any other
tensor is taken as it is, without spare room, and copied into a buffer of the layer's own at the next in-place
operation. Spare room is bounded: ``RIGHT`` + ``LEFT`` columns more than the widest window since the last copy,
and rows for twice the batch at the last copy (never more than the engine's ``max_batch_size``, so a server
that runs one request at a time holds room for two, and a batch that fills up reallocates about log2(max) times);
the engine drops the whole cache when its batch empties.

Written here rather than taken from transformers: its ``StaticLayer`` preallocates in place but has one fixed
length for the whole cache and no way to add or remove rows; its paged continuous-batching cache
(``transformers.generation.continuous_batching``) is a separate generation manager with its own scheduler,
not a cache that a model's forward takes from the engine.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

LEFT = 32  # spare columns before the window at each copy: longer prompts join without moving the old rows
RIGHT = 32  # spare columns after the window at each copy: steps in place before the next copy


def _window_start(t: torch.Tensor, buf: torch.Tensor) -> int | None:
    """The first column ``s`` if ``t`` is ``buf[:rows, :, s:s + cols]``, else None."""
    if t.dim() != 4 or t.dtype != buf.dtype or t.device != buf.device or t.shape[2] == 0:
        return None
    if t.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() or t.stride() != buf.stride():
        return None
    if t.shape[1] != buf.shape[1] or t.shape[3] != buf.shape[3] or t.shape[0] > buf.shape[0]:
        return None
    off = t.storage_offset() - buf.storage_offset()
    if off < 0 or off >= buf.stride(1) or off % buf.stride(2):  # not in row 0, head 0 at a column's start
        return None
    s = off // buf.stride(2)
    return s if s + t.shape[2] <= buf.shape[2] else None


class _Slot:
    """The keys (or the values) of a layer: the window handed out, the buffer it lies in (None: a tensor taken
    as it is, not yet copied into a buffer of the layer's own) and the window's first column."""

    __slots__ = ("view", "buf", "start")

    def __init__(self):
        self.view: torch.Tensor | None = None
        self.buf: torch.Tensor | None = None
        self.start = 0

    def set(self, t: torch.Tensor | None) -> None:
        if t is not None and self.buf is not None:
            s = _window_start(t, self.buf)
            if s is not None:
                self.view, self.start = t, s
                return
        self.view, self.buf, self.start = t, None, 0

    def fresh(self, rows: int, cols: int, batch_capacity: int, pad: int = 0, extra: int = 0) -> None:
        """Copy the window into a new buffer with ``pad`` free columns (counted in the window, not cleared)
        before it and room for ``extra`` more after it, plus the spare room; the window then starts at ``LEFT``."""
        v = self.view
        b, h, t, d = v.shape
        rows = max(rows, b)
        buf = v.new_empty(max(rows, min(batch_capacity, 2 * rows)), h, LEFT + pad + t + extra + RIGHT, d)
        buf[:b, :, LEFT + pad:LEFT + pad + t].copy_(v)
        self.buf, self.start = buf, LEFT
        self.view = buf[:b, :, LEFT:LEFT + pad + t]

    def append(self, new: torch.Tensor, batch_capacity: int) -> torch.Tensor:
        if self.view is None or self.view.numel() == 0:
            b, h, q, d = new.shape
            self.buf = new.new_empty(max(b, min(batch_capacity, 2 * b)), h, LEFT + q + RIGHT, d)
            self.start = LEFT
            self.view = self.buf[:b, :, LEFT:LEFT + q]
            self.view.copy_(new)
            return self.view
        b, _, t, _ = self.view.shape
        q = new.shape[2]
        if new.shape[0] != b:
            raise ValueError(f"cannot append {new.shape[0]} rows of keys/values to a cache of {b} rows")
        if self.buf is None or self.start + t + q > self.buf.shape[2]:
            self.fresh(b, t, batch_capacity, extra=q)
        s = self.start
        self.buf[:b, :, s + t:s + t + q].copy_(new)
        self.view = self.buf[:b, :, s:s + t + q]
        return self.view

    def join(self, new: torch.Tensor, batch_capacity: int) -> None:
        b, _, t, _ = self.view.shape
        n, _, length, _ = new.shape
        pad = max(0, length - t)  # columns the old rows gain on the left
        if self.buf is None or b + n > self.buf.shape[0] or self.start < pad:
            self.fresh(b + n, t, batch_capacity, pad=pad)
        else:
            self.start -= pad
        buf, s = self.buf, self.start
        e = s + pad + t  # the window's end does not move: every row's last token stays in the last column
        if pad:
            buf[:b, :, s:s + pad].zero_()
        buf[b:b + n, :, s:e - length].zero_()
        buf[b:b + n, :, e - length:e].copy_(new)
        self.view = buf[:b + n, :, s:e]

    def keep(self, dst: torch.Tensor | None, src: torch.Tensor | None, rows: int, first: int,
             batch_capacity: int) -> None:
        if self.buf is None:
            self.fresh(self.view.shape[0], self.view.shape[2], batch_capacity)
        s, e = self.start, self.start + self.view.shape[2]
        if dst is not None:
            window = self.buf[:, :, s:e]
            window.index_copy_(0, dst, window.index_select(0, src))
        self.start = s + first
        self.view = self.buf[:rows, :, s + first:e]


class SlackLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are windows of buffers with spare room (see the module's doc)."""

    def __init__(self, batch_capacity: int = 0, **kwargs):
        self._k, self._v = _Slot(), _Slot()
        self.batch_capacity = batch_capacity  # the most rows a new buffer makes room for (the engine's max_batch_size)
        super().__init__(**kwargs)

    keys = property(lambda self: self._k.view, lambda self, t: self._k.set(t))
    values = property(lambda self: self._v.view, lambda self, t: self._v.set(t))

    @classmethod
    def wrap(cls, keys: torch.Tensor, values: torch.Tensor, batch_capacity: int = 0) -> "SlackLayer":
        """A layer holding ``keys``/``values`` as they are (no copy until its first in-place operation)."""
        layer = cls(batch_capacity)
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.keys, layer.values = keys, values
        layer.is_initialized = True
        return layer

    @classmethod
    def adopt(cls, keys: torch.Tensor, values: torch.Tensor, batch_capacity: int = 0) -> "SlackLayer":
        """A layer holding a copy of ``keys``/``values`` in buffers with spare room."""
        layer = cls.wrap(keys, values, batch_capacity)
        for slot in (layer._k, layer._v):
            slot.fresh(slot.view.shape[0], slot.view.shape[2], batch_capacity)
        return layer

    def __copy__(self):
        """A shallow copy shares the tensors but not the buffers: its first in-place operation copies."""
        new = SlackLayer.wrap(self.keys, self.values, self.batch_capacity) if self.is_initialized \
            else SlackLayer(self.batch_capacity)
        return new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return (self._k.append(key_states, self.batch_capacity), self._v.append(value_states, self.batch_capacity))

    def join(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows (left-padded with zeros to their own length), right-aligned with the cached ones; the side
        that is shorter in time is left-padded with zero columns."""
        self._k.join(keys, self.batch_capacity)
        self._v.join(values, self.batch_capacity)

    def keep_rows(self, dst: torch.Tensor | None, src: torch.Tensor | None, rows: int, first: int = 0) -> None:
        """Move rows ``src`` into rows ``dst``, keep the first ``rows`` rows and drop the first ``first`` columns."""
        self._k.keep(dst, src, rows, first, self.batch_capacity)
        self._v.keep(dst, src, rows, first, self.batch_capacity)

    def capacity(self) -> tuple[int, int]:
        """(rows, columns) of the keys' buffer; (0, 0) while it has none of its own."""
        buf = self._k.buf
        return (0, 0) if buf is None else (buf.shape[0], buf.shape[2])
