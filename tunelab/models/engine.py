"""Dynamic batching: one worker thread decodes every running request together, one token per step.

Shared by serving (``Engine.start()``: a worker thread fed by ``submit``; tunelab/serve/) and evaluation
(``Engine.run(requests)`` in the calling thread; tunelab/models/generation.py), so an answer is decoded by the
same code wherever it is served or scored. A request with ``adapter=None`` runs the model as it stands (its
active adapter, or the base inside peft's ``disable_adapter()``), as evaluation does.

Continuous batching (Yu et al., "Orca", OSDI 2022): a request that arrives while others are
decoding is prefilled (alone, or with up to ``prefill_batch`` others in one forward, left-padded
to the longest prompt) and joins the running batch before the next step; a request that
finishes leaves at once. Short and long requests therefore share a batch without waiting
for each other, and a client that streams gets each token as its step ends.

How the rows share one KV cache: every row is left-padded to the batch's cache length. The
padding columns hold zeros and are masked out by the 2D attention mask, and each row carries
its own position ids, so a row decodes exactly as it would alone (RoPE is applied before keys
are cached, so shifting a row right does not change it). Requests for different LoRA adapters
share a step through peft's mixed-adapter batches (``adapter_names=[...]``, one name a row,
``__base__`` for the plain base model).

The cache's layers are ``kv_cache.SlackLayer``s (a prefill's plain ``DynamicLayer``s are copied into
them when its rows join): windows of buffers with spare rows and columns, so that nothing is copied
whole on the hot path. A step writes its column in place; a finished row's slot is filled with the
last row (row order means nothing to the engine: each ``_Row`` carries its own state and the logits
of a step map to ``self._rows`` by index), and columns that are padding in every row left are dropped
by narrowing the window; joining rows are written into the spare rows, right-aligned, a longer prompt
taking spare columns on the left. A buffer is copied only when its room runs out (see kv_cache.py),
and the whole cache is dropped when the batch empties.

The worker owns the model; ``lock`` is held around each step so that adapters can be loaded
and unloaded between steps (tunelab/serve/adapters.py).

A failing row fails alone. Per-row work (seeding, sampling, decoding, delivering text) is guarded
row by row. When a batched forward raises, the cache is put back as it was before the step and
each row is run alone on its slice of the cache: a row that fails alone fails its request, every
other row gets its step from its own forward and the batch goes on (design principle 12: bad input
fails alone). Requests taken off the queue count as busy until they are rows, so an adapter is never
unloaded under them.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("tunelab.serve")

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class AdapterGone(Exception):
    """A request names an adapter that is unloaded (or being unloaded): refused at submit."""


class AdapterBusy(Exception):
    """An adapter still has requests queued, being admitted or decoding: it cannot be unloaded yet."""


class Overloaded(Exception):
    """The waiting queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"server overloaded: the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class GenRequest:
    """One completion to generate. ``on_event`` is called from the worker thread with
    ("delta", text) as text becomes final, then once with ("done", self) or ("error", message)."""

    prompt_ids: list[int]
    tokenizer: Any
    on_event: Callable[[str, Any], None]
    adapter: str | None = BASE  # None: the model as it stands (its active adapter, or the base under disable_adapter())
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # filled in by the engine
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    created: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None  # when the first generated token (EOS included) was sampled
    finished: float | None = None
    cancelled: bool = False

    @property
    def queue_s(self) -> float:
        return (self.started or self.created) - self.created

    @property
    def latency_s(self) -> float:
        return (self.finished or time.perf_counter()) - self.created


@dataclass
class _Row:
    req: GenRequest
    next_token: int  # sampled, not yet fed to the model
    pos: int  # position id of next_token (= real tokens already in the cache)
    sent: int = 0  # characters of text already delivered
    generator: Any = None


@dataclass
class Stats:
    """Counters for /health: requests, tokens and how full the batches were."""

    requests: int = 0
    completed: int = 0  # finished with stop or length
    cancelled: int = 0  # the client left before the end
    failed: int = 0  # failed alone (its row raised); the rest of its batch went on
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    rows_stepped: int = 0  # sum of batch sizes over steps
    prefills: int = 0  # prefill forwards
    rows_prefilled: int = 0  # requests prefilled, over all prefill forwards
    latency_s_sum: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_batch_size"] = round(self.rows_stepped / self.steps, 3) if self.steps else 0.0
        d["mean_prefill_batch_size"] = round(self.rows_prefilled / self.prefills, 3) if self.prefills else 0.0
        d["mean_latency_s"] = round(self.latency_s_sum / self.completed, 4) if self.completed else 0.0
        d.pop("latency_s_sum")
        return d


class Engine:
    """The batching worker over one causal LM (a plain model or a peft model with LoRA adapters)."""

    def __init__(self, model, eos_ids: set[int], *, max_batch_size: int = 8, max_queue: int = 64,
                 max_positions: int | None = None, lock: threading.RLock | None = None, prefill_batch: int = 1):
        import torch

        self.model = model
        self.eos_ids = set(eos_ids)
        self.max_batch_size = max_batch_size
        # requests prefilled in one left-padded forward. 1 (each alone) is the default: on 2 CPU cores, 8 clients
        # on SmolLM2 got 0.87x the tokens/s with all of them together (bench/serve_batching.py --compare-prefill):
        # a CPU is compute-bound already at batch 1 of a prompt, and the padding is extra work.
        self.max_prefill_batch = prefill_batch
        self.max_queue = max_queue
        self.max_positions = max_positions
        self.lock = lock or threading.RLock()
        self.device = next(model.parameters()).device
        self.logits_to_keep = _takes_logits_to_keep(model)
        self.stats = Stats()
        self._torch = torch
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._cv = threading.Condition()
        self._rows: list[_Row] = []
        self._admitting: list[GenRequest] = []  # taken off the queue, not yet rows: they count as busy
        self._retired: set[str] = set()  # adapters being or already unloaded: new requests for them are refused
        self._cache = None  # transformers DynamicCache shared by the rows
        self._mask = None  # [rows, cache length] 1 = real token, 0 = left padding
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="tunelab-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, req: GenRequest) -> None:
        """Queue a request, or raise Overloaded when ``max_queue`` requests already wait, or AdapterGone
        when its adapter is unloaded."""
        with self._cv:
            if req.adapter in self._retired:
                raise AdapterGone(req.adapter)
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise Overloaded(self.retry_after())
            self.stats.requests += 1
            self._waiting.append(req)
            self._cv.notify()

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: about one mean request latency."""
        mean = self.stats.latency_s_sum / self.stats.completed if self.stats.completed else 1.0
        return max(1, math.ceil(mean))

    def load(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._rows)}

    def busy_adapters(self) -> set[str]:
        """Adapters with requests queued, taken off the queue for admission, or decoding."""
        with self._cv:
            return ({r.req.adapter for r in self._rows} | {q.adapter for q in self._waiting}
                    | {q.adapter for q in self._admitting})

    def retire(self, adapter: str) -> None:
        """Refuse new requests for ``adapter`` from now on, or raise AdapterBusy if any request for it is
        queued, being admitted or decoding (checked and marked atomically with ``submit``)."""
        with self._cv:
            if adapter in self.busy_adapters():
                raise AdapterBusy(adapter)
            self._retired.add(adapter)

    def unretire(self, adapter: str) -> None:
        with self._cv:
            self._retired.discard(adapter)

    # ------------------------------------------------------------------ worker

    def run(self, reqs: list[GenRequest]) -> None:
        """Decode ``reqs`` to the end in the calling thread, with no worker thread: in-process batch work such as
        evaluation, where every request is known up front. Continuous batching still applies: at most
        ``max_batch_size`` rows decode together and a row that finishes is replaced at once by the next request."""
        if self._thread is not None:
            raise RuntimeError("Engine.run is for an engine without a worker thread (do not call start())")
        for req in reqs:
            self.stats.requests += 1
            self._waiting.append(req)
        with self._torch.inference_mode():
            while self._waiting or self._rows:
                new = []
                while self._waiting and len(self._rows) + len(new) < self.max_batch_size:
                    new.append(self._waiting.popleft())
                self._tick(new)

    def _loop(self) -> None:
        with self._torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not self._rows:
                        self._cv.wait()
                    if self._stop:
                        break
                    new = []
                    while self._waiting and len(self._rows) + len(new) < self.max_batch_size:
                        new.append(self._waiting.popleft())
                    self._admitting = new
                self._tick(new)
        for req in list(self._waiting) + [r.req for r in self._rows]:
            self._fail(req, "server shutting down")

    def _tick(self, new: list[GenRequest]) -> None:
        """Admit ``new`` (prefill, ``max_prefill_batch`` at a time), then one decoding step for every row."""
        try:
            with self.lock:
                step = max(1, self.max_prefill_batch)
                for i in range(0, len(new), step):
                    self._admit(new[i:i + step])
                with self._cv:
                    self._admitting = []
                if self._rows:
                    self._step()
        except Exception as e:  # a bug outside any one row's work: the last resort, fail what is in hand
            log.exception("generation step failed")
            for r in self._rows:
                self._fail(r.req, f"generation failed: {type(e).__name__}: {e}")
            for req in new:
                if req.finished is None:
                    self._fail(req, f"generation failed: {type(e).__name__}: {e}")
            self._rows, self._cache, self._mask = [], None, None
        finally:
            with self._cv:
                self._admitting = []

    def _forward(self, ids, positions, mask, cache, adapters: list[str]):
        """One forward pass; each row through its own adapter.

        peft's mixed-batch path hooks every LoRA layer and runs it once per distinct adapter on
        that adapter's rows: at batch 1 on SmolLM2 with r=16 on all linear layers it costs ~35%
        more a step than the active-adapter path. So a batch of one adapter runs it as the active
        adapter (switching costs ~20 ms, paid only on a change); mixed batches and base-only
        batches take the mixed path (``__base__`` rows), which is cheaper than entering peft's
        ``disable_adapter()`` (~75 ms a step on the same model)."""
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        if self.logits_to_keep:  # only the last position's logits are sampled: skip the LM head on the prompt
            kw["logits_to_keep"] = 1
        model = self.model
        if not hasattr(model, "peft_config") or all(a is None for a in adapters):
            return model(**kw)
        names = set(adapters)
        if len(names) > 1:  # rows for different adapters (or some for the base) in one step
            return model(adapter_names=adapters, **kw)
        (name,) = names
        if name == BASE:
            return model(adapter_names=adapters, **kw)
        if model.active_adapter != name:
            model.set_adapter(name)
        return model(**kw)

    def _admit(self, reqs: list[GenRequest]) -> None:
        """Prefill new requests in one forward (left-padded to the longest prompt, each row with its own
        positions and adapter), sample each first token, and merge the rows that go on into the batch."""
        torch = self._torch
        rows = []
        for req in reqs:
            req.started = time.perf_counter()
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            row = _Row(req, 0, len(req.prompt_ids))
            try:
                if req.seed is not None or req.temperature > 0:
                    row.generator = torch.Generator(device=self.device)
                    row.generator.manual_seed(req.seed if req.seed is not None
                                              else int.from_bytes(_urandom(8), "little"))
            except Exception as e:  # e.g. a seed outside the generator's 64 bits: this request alone
                self._fail(req, f"cannot seed the sampler with seed={req.seed}: {e}")
                continue
            rows.append(row)
        if not rows:
            return
        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.tensor([[0] * (width - len(r.req.prompt_ids)) + list(r.req.prompt_ids) for r in rows],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(r.req.prompt_ids)) + [1] * len(r.req.prompt_ids) for r in rows],
                            device=self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts from 0 at its first real token
        ok, logits, cache = self._guarded_forward(ids, positions, mask, None, rows)
        self.stats.prefills += 1
        self.stats.rows_prefilled += len(rows)
        if not ok:
            return
        rows, mask = [rows[i] for i in ok], mask[torch.tensor(ok, device=self.device)]
        tokens = self._sample(logits, rows)
        keep = [i for i, (row, t) in enumerate(zip(rows, tokens)) if t is not None and self._accept_safely(row, t)]
        if not keep:
            return
        idx = torch.tensor(keep, device=self.device)
        mask = mask[idx]
        first = int(mask.any(dim=0).int().argmax())  # drop columns that are padding in every row kept
        mask = mask[:, first:]
        pad = ~mask.bool()[:, None, :, None]
        for layer in self._layers(cache):  # the batch's invariant: padding columns hold zeros
            layer.keys = layer.keys[idx, :, first:].masked_fill(pad, 0)
            layer.values = layer.values[idx, :, first:].masked_fill(pad, 0)
        self._merge(cache, mask)
        self._rows.extend(rows[i] for i in keep)

    def _step(self) -> None:
        """One decoding step for every running row."""
        torch = self._torch
        rows = self._rows
        ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.pos] for r in rows], device=self.device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype, device=self.device)], dim=1)
        ok, logits, cache = self._guarded_forward(ids, positions, mask, self._cache, rows)
        self.stats.steps += 1
        self.stats.rows_stepped += len(rows)
        if len(ok) < len(rows):  # rows that failed alone are gone; the cache returned holds the others only
            rows = self._rows = [rows[i] for i in ok]
            mask = mask[torch.tensor(ok, device=self.device)] if ok else None
        self._cache, self._mask = (cache, mask) if rows else (None, None)
        if not rows:
            return
        tokens = self._sample(logits, rows)
        keep = []
        for i, (r, t) in enumerate(zip(rows, tokens)):
            r.pos += 1
            if t is None:  # its sampling failed: already failed alone
                continue
            if not r.req.cancelled and self._accept_safely(r, t):
                keep.append(i)
            elif r.req.cancelled and r.req.finished is None:
                self._finish(r.req, "cancelled")
        if len(keep) < len(rows):
            self._select(keep)

    def _guarded_forward(self, ids, positions, mask, cache, rows: list[_Row]):
        """The batch's forward; if it raises, each row alone on its slice of the cache, so that a row
        that fails fails alone. Returns (indices of the rows that went through, their last logits,
        the cache of those rows only)."""
        torch = self._torch
        adapters = [r.req.adapter for r in rows]
        saved = [(layer.keys, layer.values) for layer in self._layers(cache)] if cache is not None else None
        try:
            out = self._forward(ids, positions, mask, cache, adapters)
            return list(range(len(rows))), out.logits[:, -1, :], out.past_key_values
        except Exception as e:
            log.warning("a batched forward of %d rows failed (%s: %s); running each row alone", len(rows),
                        type(e).__name__, e)
        if saved is not None:  # the views saved are the cache before the step: setting them back narrows each
            # layer's window to them (SlackLayer); columns the failed step wrote in place lie outside it
            for layer, (k, v) in zip(self._layers(cache), saved):
                layer.keys, layer.values = k, v
        ok, logits, caches = [], [], []
        for i, row in enumerate(rows):
            one = self._row_cache(cache, i) if cache is not None else None
            try:
                out = self._forward(ids[i:i + 1], positions[i:i + 1], mask[i:i + 1], one, [adapters[i]])
            except Exception as e:  # this row fails alone
                log.exception("a row failed alone (adapter %s, %d prompt tokens)", adapters[i], len(row.req.prompt_ids))
                self._fail(row.req, f"generation failed: {type(e).__name__}: {e}")
                continue
            ok.append(i)
            logits.append(out.logits[:, -1, :])
            caches.append(out.past_key_values)
        if not ok:
            return [], None, None
        joined = caches[0]
        if len(caches) > 1:
            for layer, *others in zip(self._layers(joined), *(self._layers(c) for c in caches[1:])):
                layer.keys = torch.cat([layer.keys] + [o.keys for o in others], dim=0)
                layer.values = torch.cat([layer.values] + [o.values for o in others], dim=0)
        return ok, torch.cat(logits, dim=0), joined

    def _row_cache(self, cache, i: int):
        """A cache of row ``i`` alone: a shallow copy whose layers hold that row's slice (views, no copy; a
        ``SlackLayer`` copies the row into a buffer of its own when the row's forward appends to it)."""
        import copy

        from tunelab.models.kv_cache import SlackLayer

        one = copy.copy(cache)
        one.layers = []
        for layer in self._layers(cache):
            if type(layer) is SlackLayer:
                c = SlackLayer.wrap(layer.keys[i:i + 1], layer.values[i:i + 1])
            else:
                c = copy.copy(layer)
                c.keys, c.values = layer.keys[i:i + 1], layer.values[i:i + 1]
            one.layers.append(c)
        return one

    def _sample(self, logits, rows: list[_Row]) -> list[int | None]:
        """The next token of each row; None for a row whose sampling failed (that request has failed alone)."""
        torch = self._torch
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        out: list[int | None] = []
        for i, r in enumerate(rows):
            t, p = r.req.temperature, r.req.top_p
            if t <= 0:
                out.append(greedy[i])
                continue
            try:
                # shift by the max before dividing: the top logit becomes 0, so a tiny temperature gives 1 on the
                # top token and 0 elsewhere instead of inf/inf = nan
                row = logits[i] - logits[i].max()
                probs = torch.softmax(row.double() / t, dim=-1)
                if p < 1.0:  # nucleus: the smallest set of tokens whose mass reaches top_p (Holtzman et al., 2020)
                    sp, si = probs.sort(descending=True)
                    cut = (sp.cumsum(0) - sp) >= p
                    sp[cut] = 0.0
                    probs = torch.zeros_like(probs).scatter_(0, si, sp)
                if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
                    raise ValueError(f"temperature={t} and top_p={p} give no valid distribution over the logits")
                out.append(int(torch.multinomial(probs, 1, generator=r.generator)))
            except Exception as e:  # this request alone
                self._fail(r.req, f"sampling failed: {type(e).__name__}: {e}")
                out.append(None)
        return out

    def _accept_safely(self, row: _Row, token: int) -> bool:
        """``_accept``, but a failure (decoding, delivering text) fails this request alone."""
        try:
            return self._accept(row, token)
        except Exception as e:
            log.exception("a request failed alone while its text was delivered")
            if row.req.finished is None:
                self._fail(row.req, f"generation failed: {type(e).__name__}: {e}")
            return False

    def _accept(self, row: _Row, token: int) -> bool:
        """Record a sampled token; deliver new text; return False when the request is finished."""
        req = row.req
        if req.first_token is None:
            req.first_token = time.perf_counter()
        if token in self.eos_ids:
            self._flush(row, req.text)
            return self._finish(req, "stop")
        req.out_ids.append(token)
        row.next_token = token
        text = req.tokenizer.decode(req.out_ids, skip_special_tokens=True)
        hit = min((i for i in (text.find(s) for s in req.stop if s) if i >= 0), default=-1)
        if hit >= 0:
            req.text = text[:hit]
            self._flush(row, req.text)
            return self._finish(req, "stop")
        req.text = text
        at_limit = len(req.out_ids) >= req.max_tokens or (
            self.max_positions is not None and row.pos >= self.max_positions)  # next_token has no position left
        if at_limit:
            self._flush(row, text)
            return self._finish(req, "length")
        self._flush(row, text[: len(text) - _held_back(text, req.stop)])
        return True

    def _flush(self, row: _Row, upto: str) -> None:
        if len(upto) > row.sent:
            row.req.on_event("delta", upto[row.sent:])
            row.sent = len(upto)

    def _finish(self, req: GenRequest, reason: str) -> bool:
        req.finish_reason = reason
        req.finished = time.perf_counter()
        s = self.stats
        s.prompt_tokens += len(req.prompt_ids)
        s.completion_tokens += len(req.out_ids)
        if reason == "cancelled":
            s.cancelled += 1
        else:
            s.completed += 1
            s.latency_s_sum += req.latency_s
        try:
            req.on_event("done", req)
        except Exception:  # its client is gone (closed event loop)
            log.exception("could not deliver a finished request")
        return False

    def _fail(self, req: GenRequest, message: str) -> None:
        req.finished = time.perf_counter()
        req.finish_reason = "error"
        self.stats.failed += 1
        try:
            req.on_event("error", message)
        except Exception:  # its client is gone (closed event loop): nothing more to tell it
            log.exception("could not deliver an error to its request")

    # ------------------------------------------------------------------ the shared KV cache

    def _layers(self, cache):
        from transformers.cache_utils import DynamicLayer

        from tunelab.models.kv_cache import SlackLayer

        layers = cache.layers
        if any(type(layer) not in (DynamicLayer, SlackLayer) for layer in layers):  # sliding-window, quantized, ...
            raise NotImplementedError("batching needs a plain DynamicCache; serve this model with --max-batch-size 1")
        return layers

    def _own(self, cache) -> None:
        """Turn the cache's plain layers (a prefill's) into ``SlackLayer``s, whose steps write in place."""
        from tunelab.models.kv_cache import SlackLayer

        cache.layers = [layer if type(layer) is SlackLayer
                        else SlackLayer.adopt(layer.keys, layer.values, self.max_batch_size)
                        for layer in self._layers(cache)]
        for layer in cache.layers:  # a layer made for one row (a row run alone) gets room for the batch
            layer.batch_capacity = self.max_batch_size

    def _merge(self, cache, mask) -> None:
        """Join prefilled rows (cache length L) to the batch (length T), left-padding the shorter side. The new
        rows go into the buffers' spare rows; the old rows move only when a buffer is full (kv_cache.SlackLayer)."""
        torch = self._torch
        if self._cache is None:
            self._own(cache)
            self._cache, self._mask = cache, mask
            return
        self._own(self._cache)
        T, L = self._mask.shape[1], mask.shape[1]
        pad_new, pad_old = max(0, T - L), max(0, L - T)
        for old, new in zip(self._layers(self._cache), self._layers(cache)):
            old.join(new.keys, new.values)
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (pad_old, 0)),
                                torch.nn.functional.pad(mask, (pad_new, 0))], dim=0)

    def _select(self, keep: list[int]) -> None:
        """Drop finished rows: the last rows kept move into the holes (only they are copied; row order means nothing
        to the engine, each ``_Row`` carries its own state), then the window narrows past the leading columns that
        are padding in every remaining row (no copy)."""
        torch = self._torch
        n = len(keep)
        if not n:
            self._rows, self._cache, self._mask = [], None, None
            return
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))  # new row i is old row order[i]
        for h, m in zip(holes, movers):
            order[h] = m
        self._rows = [self._rows[i] for i in order]
        mask = self._mask[torch.tensor(order, device=self.device)]
        first = int(mask.any(dim=0).int().argmax())
        dst = torch.tensor(holes, device=self.device) if holes else None
        src = torch.tensor(movers, device=self.device) if holes else None
        self._own(self._cache)
        for layer in self._layers(self._cache):
            layer.keep_rows(dst, src, n, first)
        self._mask = mask[:, first:]


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not yet safe to send: a possible start of a stop string,
    or an incomplete UTF-8 sequence (decoded as U+FFFD until its last byte arrives)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    if text.endswith("\ufffd"):
        n = max(n, 1)
    return n


def _takes_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (transformers' models do; a custom one may not)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _urandom(n: int) -> bytes:
    import os

    return os.urandom(n)
