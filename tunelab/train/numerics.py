"""Loss masking, tokenization of chats, batching and token accounting — shared by every recipe.

Kept in one tested module so recipes cannot drift apart (torchtune#2307). Labels are -100
everywhere except on assistant tokens, which include the end-of-turn/EOS token so the model
learns to stop.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from tunelab._console import progress
from tunelab.errors import TunelabError
from tunelab.models.chat import (Rendered, ensure_chat_template, fallback_chat_template, render,  # noqa: F401 (re-exported)
                                 render_prompt)
from tunelab.train.peft import virtual_tokens

IGNORE_INDEX = -100


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each assistant turn (content + end-of-turn)."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(before) or not full.startswith(upto):
            # A template that rewrites earlier turns: locate the content instead.
            start = full.find(m["content"], spans[-1][1] if spans else 0)
            if start < 0:
                raise ValueError("cannot locate an assistant turn in the rendered chat template")
            end = start + len(m["content"])
        else:
            start, end = len(before), len(upto.rstrip())
        spans.append((start, end))
    return full, spans


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    n_label_tokens: int
    prompt_tokens: int | None = None  # tokens before the first response token (before truncation)


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None) -> Tokenized:
    """Tokenize a chat with loss only on assistant tokens; EOS learned; right-truncate to max_length."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(e > a and s < b for a, b in spans):
            labels[t] = ids[t]
    eos = tokenizer.eos_token_id
    if eos is not None and spans:
        last = max(t for t, lab in enumerate(labels) if lab != IGNORE_INDEX) if any(
            lab != IGNORE_INDEX for lab in labels) else None
        if last is not None and ids[last] != eos:
            # The template does not close the turn with EOS: add it so generation learns to stop.
            ids.insert(last + 1, eos)
            labels.insert(last + 1, eos)
    first = next((t for t, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(ids, labels, truncated, sum(1 for x in labels if x != IGNORE_INDEX), first)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation up to (not including) the last assistant turn, with the generation prompt."""
    ctx = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return tokenizer(render(tokenizer, ctx, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


@dataclass
class TokenStats:
    """What tokenization did to a dataset — printed and stored, never silent."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    tokens: int = 0
    label_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def add(self, t: Tokenized) -> bool:
        self.examples += 1
        self.truncated += int(t.truncated)
        if t.n_label_tokens == 0:
            self.dropped_no_labels += 1
            return False
        self.kept += 1
        self.tokens += len(t.input_ids)
        self.label_tokens += t.n_label_tokens
        self.lengths.append(len(t.input_ids))
        return True

    def as_dict(self) -> dict[str, Any]:
        ls = sorted(self.lengths)
        pct = (lambda q: ls[min(len(ls) - 1, int(q * len(ls)))] if ls else 0)
        return {"examples": self.examples, "kept": self.kept, "truncated": self.truncated,
                "dropped_no_labels": self.dropped_no_labels, "tokens": self.tokens,
                "label_tokens": self.label_tokens, "length_p50": pct(0.5), "length_p95": pct(0.95),
                "length_max": ls[-1] if ls else 0}


def tokenize_all_chats(tokenizer, chats: list[list[dict]], max_length: int | None, rejects: list | None = None,
                       split: str = "train"):
    """Tokenize many chats; returns features ({input_ids, labels}) and the TokenStats. ``rejects``: a list that
    gets one row per dropped chat (its split, position and reason: e.g. the response truncated away)."""
    stats, feats = TokenStats(), []
    for i, msgs in enumerate(chats):
        t = tokenize_chat(tokenizer, msgs, max_length)
        if stats.add(t):
            feats.append({"input_ids": t.input_ids, "labels": t.labels})
        elif rejects is not None:
            rejects.append({"split": split, "example": i, "reason": no_labels_reason(t, max_length),
                            "prompt": next((m["content"] for m in msgs if m["role"] == "user"), "")[:200]})
    return feats, stats


def print_data_report(rep: dict, max_length: int) -> None:
    """One line on what tokenization kept, cut and dropped, per split (``rep``: train/validation TokenStats
    dicts, rejected)."""
    tr, va = rep["train"], rep["validation"]
    print(f"data: {tr['kept']} train / {va['kept']} validation examples, {tr['tokens']:,} train tokens "
          f"({tr['label_tokens']:,} in responses), p95 length {tr['length_p95']}; "
          f"truncated at {max_length} tokens: train {tr['truncated']}, validation {va['truncated']}; "
          f"dropped (no response tokens left): train {tr['dropped_no_labels']}, validation "
          f"{va['dropped_no_labels']} (in rejects.jsonl); rejected records: {rep['rejected']}")


def no_labels_reason(t: Tokenized, max_length: int | None) -> str:
    """Why a tokenized chat has no response tokens left."""
    if t.truncated and t.prompt_tokens is not None:
        return (f"response truncated away: the prompt takes {t.prompt_tokens} tokens, data.max_length is "
                f"{max_length} (raise it, or shorten the prompt)")
    return "no response tokens (an empty assistant turn)"


class PadCollator:
    """Right-pad a list of {input_ids, labels} into tensors; padded labels are IGNORE_INDEX."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(features), n), self.pad, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PaddingFreeCollator:
    """Concatenate a batch's examples into one row of shape ``[1, total_tokens]``: no padding at all.

    ``position_ids`` restart at 0 for each example and there is no ``attention_mask``: from that
    transformers (5.x, masking_utils.find_packed_sequence_indices) builds a block-causal mask, so no
    token attends across an example boundary, and RoPE sees each example at its own positions.
    The label at each example's first position is IGNORE_INDEX, so the previous example's last
    token is never trained to predict it. Same design as TRL's DataCollatorForLanguageModeling
    (padding_free=True). Not for prompt/prefix tuning, whose virtual tokens are prepended per row.
    """

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for f in features:
            k = len(f["input_ids"])
            ids.extend(f["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(f["labels"][1:k])
            pos.extend(range(k))
        t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
        return {"input_ids": t(ids), "labels": t(labels), "position_ids": t(pos)}


def masked_nll(logits, labels):
    """Sum of next-token negative log-likelihood over labeled positions, and their count."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((shift_labels != IGNORE_INDEX).sum())


def _causal_parts(model):
    """(decoder, lm_head) of a causal LM, seen through a PEFT wrapper; None when not applicable."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)) not in ("LORA", "IA3", "ADALORA", "LOHA", "LOKR"):
        return None  # prompt/prefix tuning change the inputs: use the model's own forward
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    get_dec = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    dec = get_dec() if get_dec else None
    return (dec, head) if dec is not None and head is not None else None


def causal_logits(model, input_ids, attention_mask=None, position_ids=None):
    """The model's logits at the positions of ``input_ids`` (shape ``[batch, len(input_ids), vocab]``).

    PEFT prompt_tuning and p_tuning prepend learned virtual tokens, so their logits are longer than
    the input by exactly ``num_virtual_tokens``; those leading positions are dropped here so labels
    stay aligned. Any other length mismatch is an error, never a silent shift of the labels.
    """
    # padding-free batches: transformers builds the block-causal mask from position_ids only when no
    # KV cache exists, and a config with use_cache=True would create one: without it examples would mix
    pos = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **pos).logits
    extra = logits.size(1) - input_ids.size(1)
    if extra:
        if extra != virtual_tokens(model):
            raise RuntimeError(f"the model returned {logits.size(1)} logit positions for {input_ids.size(1)} input "
                               f"tokens (virtual tokens: {virtual_tokens(model)}); labels would be misaligned")
        logits = logits[:, extra:]
    return logits


def response_only_loss(model, inputs: dict, num_items_in_batch=None, share_prefix: dict | None = None):
    """Causal-LM loss computing logits only where labels are set.

    The LM head of a small model is a large share of its compute (SmolLM2-135M: 28M of
    135M parameters, and a 49k-wide softmax per token); prompt tokens never need logits.
    Measured on 2 CPU cores with LoRA: ~1.3-1.5x tokens/s. Returns the same value as the
    model's own loss: mean over label tokens, or sum / num_items_in_batch under gradient
    accumulation (token-weighted across micro-batches, transformers#34191).

    ``share_prefix``: a dict (its counts accumulate there) to compute the tokens every row of a padded batch
    starts with once (``shared_prompt.shared_prefix_hidden``: a system prompt and the chat header); None: off.
    """
    import torch.nn.functional as F

    parts = _causal_parts(model)
    labels = inputs["labels"]
    if parts is None:
        logits = causal_logits(model, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids"))
        nll, n = masked_nll(logits, labels)
    else:
        dec, head = parts
        hidden = None
        if share_prefix is not None:
            from tunelab.train.shared_prompt import shared_prefix_hidden

            hidden = shared_prefix_hidden(dec, inputs, share_prefix)
        if hidden is None:
            # use_cache=False: a cache would disable the packed (block-causal) mask of padding-free batches
            hidden = dec(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                         position_ids=inputs.get("position_ids"), use_cache=False).last_hidden_state
        shift = labels[:, 1:]
        sel = shift != IGNORE_INDEX
        if _frozen_plain_head(head):
            nll = frozen_head_nll(hidden[:, :-1][sel], head.weight, shift[sel])
        else:
            logits = head(hidden[:, :-1][sel]).float()
            nll = F.cross_entropy(logits, shift[sel], reduction="sum")
        n = int(sel.sum())
    if num_items_in_batch is not None:
        denom = num_items_in_batch.to(nll.device) if hasattr(num_items_in_batch, "to") else num_items_in_batch
        return nll / denom
    return nll / max(n, 1)


def _frozen_plain_head(head) -> bool:
    import torch

    return isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad


def reuse_cast(entry, t, dtype):
    """``(entry, t cast to dtype)``: the cast ``entry`` holds while ``t`` is the same tensor with the same storage
    and version (an in-place change or a new ``.data`` makes a new cast), else a new cast and its entry
    ``(weakref to t, data_ptr, _version, dtype, cast)``. The caller keeps the entry (one per cached tensor)."""
    if entry is not None and entry[0]() is t and entry[1] == t.data_ptr() and entry[2] == t._version \
            and entry[3] == dtype:
        return entry, entry[4]
    cast = t.detach().to(dtype)
    return (weakref.ref(t), t.data_ptr(), t._version, dtype, cast), cast


class _HeadWorkspace:
    """What the frozen head's loss reuses from one training step to the next: the head weight cast to the matmul
    dtype (the head is frozen: the same values every step; :func:`reuse_cast`) and the logits buffers of one chunk;
    the fused LoRA linear's temporaries are named buffers here too (:func:`workspace_buffer`).

    Allocated afresh each step, these are new memory mappings (glibc maps blocks over 32 MiB): 150 MB of page
    faults for SmolLM2's 49,152-token vocabulary at 254 tokens, ~60 ms of a 1.3 s cpt step on 2 Zen 4 cores.
    :func:`release_head_workspace` drops it (``Speedups.restore`` after training)."""

    def __init__(self):
        self.weight = None  # (weakref to the weight, data_ptr, _version, dtype, cast)
        self.buffers: dict = {}

    def cast(self, weight, dtype):
        if weight.dtype == dtype:
            return weight
        self.weight, cast = reuse_cast(self.weight, weight, dtype)
        return cast

    def buffer(self, name: str, rows: int, cols: int, dtype, device):
        import torch

        b = self.buffers.get(name)
        if b is None or b.numel() < rows * cols or b.dtype != dtype or b.device != device:
            self.buffers[name] = b = torch.empty(rows * cols, dtype=dtype, device=device)
        return b[:rows * cols].view(rows, cols)


_HEAD_WORKSPACES = threading.local()  # one per thread: runs in threads of one process never share buffers


def _head_workspace() -> _HeadWorkspace:
    ws = getattr(_HEAD_WORKSPACES, "ws", None)
    if ws is None:
        ws = _HEAD_WORKSPACES.ws = _HeadWorkspace()
    return ws


def workspace_buffer(name: str, rows: int, cols: int, dtype, device):
    """This thread's ``[rows x cols]`` buffer ``name``, reused from call to call (grown when a call needs more)
    until :func:`release_head_workspace`."""
    return _head_workspace().buffer(name, rows, cols, dtype, device)


def release_head_workspace() -> None:
    """Free this thread's cached head cast and buffers (end of training)."""
    _HEAD_WORKSPACES.ws = None


def _frozen_head_nll_fn():
    import torch

    class FrozenHeadNLL(torch.autograd.Function):
        """Summed next-token NLL of ``hidden @ weight.T`` for a frozen LM head, chunk by chunk.

        The gradient w.r.t. ``hidden`` is computed in the forward pass, one chunk of logits at a time, so
        the [tokens x vocab] logits, their log-softmax and its gradient never exist whole (the idea of
        fused linear cross-entropy kernels, e.g. Liger-Kernel). Same arithmetic as ``head(h).float()`` +
        ``F.cross_entropy(reduction="sum")`` under autocast: the matmuls in the autocast dtype, softmax in
        fp32, d(nll)/d(logits) = softmax - onehot rounded to the matmul dtype for the input gradient.
        Under grad the weight's cast and the chunk's buffers are kept for the next step (:class:`_HeadWorkspace`).
        """

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk: int):
            dev = hidden.device.type
            mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
            need_grad = ctx.needs_input_grad[0]
            ws = _head_workspace() if need_grad else _HeadWorkspace()  # training reuses; a one-off call keeps nothing
            with torch.autocast(dev, enabled=False):
                w = ws.cast(weight, mm)
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                grad = torch.empty_like(hidden) if need_grad else None
                rows = min(chunk, hidden.shape[0])
                out = ws.buffer("logits", rows, w.shape[0], mm, hidden.device)
                f32 = out if mm == torch.float32 else ws.buffer("logits32", rows, w.shape[0], torch.float32,
                                                                hidden.device)
                for i in range(0, hidden.shape[0], chunk):
                    h = hidden[i:i + chunk].to(mm)
                    t = targets[i:i + chunk]
                    n = len(t)
                    logits = torch.mm(h, w.t(), out=out[:n])
                    if mm != torch.float32:
                        logits = f32[:n].copy_(logits)
                    target = logits.gather(1, t[:, None])[:, 0]
                    top = logits.amax(dim=-1, keepdim=True)
                    # exp(logit - max) in place, from -87 up: e^-87 ~ 1.6e-38 is float32's smallest normal range;
                    # below it exp returns subnormals, which a CPU computes 5-10x slower (measured on a Xeon) and
                    # which are below the resolution of a sum that holds e^0 = 1
                    exps = logits.sub_(top).clamp_(min=-87.0).exp_()
                    sums = exps.sum(dim=-1, keepdim=True)
                    total += (top[:, 0] + sums[:, 0].log() - target).sum()
                    if need_grad:
                        probs = exps.div_(sums)  # softmax, in place of the logits
                        probs[torch.arange(n, device=t.device), t] -= 1.0
                        pm = probs if mm == torch.float32 else out[:n].copy_(probs)
                        grad[i:i + chunk] = (pm @ w).to(hidden.dtype)
            if need_grad:
                ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g.to(grad.dtype), None, None, None

    return FrozenHeadNLL


_FROZEN_HEAD_NLL = None


def frozen_head_nll(hidden, weight, targets, chunk: int = 512):
    """Summed NLL of ``targets`` under logits ``hidden @ weight.T`` for a frozen (no-grad) head weight,
    without materializing all logits: peak memory one ``chunk x vocab`` block instead of ``tokens x vocab``."""
    global _FROZEN_HEAD_NLL
    if _FROZEN_HEAD_NLL is None:
        _FROZEN_HEAD_NLL = _frozen_head_nll_fn()
    if weight.requires_grad:
        raise ValueError("frozen_head_nll needs a frozen head weight (requires_grad=False)")
    return _FROZEN_HEAD_NLL.apply(hidden, weight, targets, chunk)


# ----------------------------------------------------------------------------- held-out scoring (teacher forcing)

def token_nll(head, hidden, targets, chunk: int = 1024):
    """Per-token NLL of ``targets`` under ``head(hidden)`` (rows of hidden states, one target each), the head
    applied a chunk of rows at a time: peak memory one chunk x vocab instead of all rows x vocab."""
    import torch
    import torch.nn.functional as F

    if not len(targets):
        return hidden.new_zeros(0)
    return torch.cat([F.cross_entropy(head(hidden[i: i + chunk]).float(), targets[i: i + chunk], reduction="none")
                      for i in range(0, len(targets), chunk)])


def response_nll_per_example(model, feats: list[dict], batch_size: int, pad_id: int,
                              desc: str | None = None) -> tuple[list[float], list[int]]:
    """Per-example summed NLL of reference responses (teacher forcing) and scored tokens, in the order of
    ``feats``: the units a perplexity bootstrap resamples. ``desc``: show a progress bar over the examples under
    that name. Batches hold examples of similar length (sorted by token count), so a batch pads little; each row
    is scored alone under its own mask, so the values do not depend on the batch it lands in."""
    import contextlib

    import torch
    import torch.nn.functional as F

    collate = PadCollator(pad_id)
    nll: list[float] = []
    count: list[int] = []
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    # a set no larger than two batches is scored in batches of ~1/10 of it, so its bar moves by about one
    # example at a time rather than jumping 0 -> 100 % (each row is scored alone under its own mask either way)
    if desc and len(feats) <= 2 * batch_size:
        batch_size = max(1, -(-len(feats) // 10))
    parts = _causal_parts(model)
    dev = next(model.parameters()).device
    bar = progress(len(feats), desc) if desc else contextlib.nullcontext()
    with torch.no_grad(), bar:
        for b in range(0, len(feats), batch_size):
            batch = collate([feats[i] for i in order[b: b + batch_size]])
            if parts is None:
                logits = causal_logits(model, batch["input_ids"], batch["attention_mask"])[:, :-1].float()
                labels = batch["labels"][:, 1:].to(logits.device)
                tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
                nll.extend(tok.sum(1).double().cpu().tolist())
            else:
                # the LM head only where a reference token is scored (prompt positions need no logits: on
                # SmolLM2 the head is ~20% of a token's compute), a chunk of rows at a time: peak memory one
                # chunk x vocab block instead of batch x length x vocab
                dec, head = parts
                hidden = dec(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                             use_cache=False).last_hidden_state[:, :-1]
                labels = batch["labels"][:, 1:].to(hidden.device)
                sel = labels != IGNORE_INDEX
                rows = sel.nonzero()[:, 0]
                tok = token_nll(head, hidden[sel], labels[sel])
                per = torch.zeros(labels.size(0), dtype=torch.float64, device=tok.device)
                per.index_add_(0, rows, tok.double())
                nll.extend(per.cpu().tolist())
            count.extend((labels != IGNORE_INDEX).sum(1).cpu().tolist())
            if desc:
                bar.update(len(labels))
    back = {i: k for k, i in enumerate(order)}  # position of example i among the sorted results
    return [nll[back[i]] for i in range(len(feats))], [count[back[i]] for i in range(len(feats))]


def response_nll(model, feats: list[dict], batch_size: int, pad_id: int) -> tuple[float, int]:
    """Summed NLL of reference responses (teacher forcing) and the number of scored tokens."""
    import torch

    collate = PadCollator(pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(feats), batch_size):
            batch = collate(feats[b: b + batch_size])
            # causal_logits: prompt_tuning/p_tuning adapters prepend virtual tokens; labels stay aligned
            logits = causal_logits(model, batch["input_ids"], batch["attention_mask"])
            nll, n = masked_nll(logits, batch["labels"])
            total += float(nll)
            count += n
    return total, count


# ----------------------------------------------------------------------------- packing (pretraining, CPT)

@dataclass
class Packed:
    """Fixed-length blocks cut from documents joined with EOS, and what the cut cost."""

    blocks: list[list[int]]
    block_size: int
    documents: int  # non-empty documents packed
    tokens: int  # tokens in the joined stream, EOS separators included
    dropped: int  # tokens of the final partial block, not used

    def as_dict(self) -> dict[str, int]:
        return {"documents": self.documents, "tokens": self.tokens, "blocks": len(self.blocks),
                "block_size": self.block_size, "dropped_tokens": self.dropped}


def pack_blocks(token_id_streams, block_size: int, eos_id: int) -> Packed:
    """Join documents into one stream, each followed by EOS, and cut it into ``block_size`` blocks.

    The standard causal-LM packing (GPT-2; HF run_clm ``group_texts``): no padding, so every
    position is trained on; the EOS after each document teaches where documents end. Attention
    is not reset at document boundaries (as in GPT-2/Llama pretraining). The final partial block
    is dropped and counted, never silently lost. Empty documents are skipped (no lone EOS).
    """
    if block_size < 2:
        raise ValueError("block_size must be at least 2 (a block predicts block_size - 1 tokens)")
    stream: list[int] = []
    docs = 0
    for ids in token_id_streams:
        if len(ids) == 0:
            continue
        stream.extend(ids)
        stream.append(eos_id)
        docs += 1
    n_full = len(stream) // block_size
    blocks = [stream[i * block_size:(i + 1) * block_size] for i in range(n_full)]
    return Packed(blocks, block_size, docs, len(stream), len(stream) - n_full * block_size)


def blocks_nll(model, blocks: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token NLL over every block and the number of predicted tokens (block length - 1 each)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[b:b + batch_size], dtype=torch.long, device=device)
            nll, k = masked_nll(causal_logits(model, ids), ids)
            total += float(nll)
            n += k
    model.train(was_training)
    return total, n


def blocks_perplexity(model, blocks: list[list[int]], batch_size: int = 8) -> dict:
    """Token-weighted perplexity, exp(sum NLL / tokens), over fixed blocks: comparable before and after training."""
    total, n = blocks_nll(model, blocks, batch_size)
    if n <= 0:
        raise TunelabError("perplexity needs at least one scored token")
    try:
        ppl = math.exp(total / n)
    except OverflowError:  # a mean NLL above ~709 nats: the perplexity is past float range
        ppl = math.inf
    return {"perplexity": ppl, "mean_nll": total / n, "tokens": n, "blocks": len(blocks)}


# ----------------------------------------------------------------------------- distillation

def distill_divergence(student_logits, teacher_logits, loss: str = "forward_kl", temperature: float = 1.0,
                       beta: float = 0.5):
    """Per-position divergence of the student's next-token distribution from the teacher's, shape ``[...]``.

    ``forward_kl``: KL(teacher ‖ student), the classic distillation loss (Hinton et al. 2015).
    ``jsd``: generalized Jensen-Shannon divergence with mixture M = beta·teacher + (1-beta)·student,
    beta·KL(teacher ‖ M) + (1-beta)·KL(student ‖ M) (GKD, Agarwal et al. 2024, eq. 1; the same
    convention as TRL's GKDTrainer.generalized_jsd_loss); symmetric at beta = 0.5.
    Both distributions are softened by ``temperature`` and the result is multiplied by T², so the
    gradients keep their size when T changes and the loss mixes with the hard-label CE (Hinton et al.).
    """
    import math

    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if loss == "forward_kl":
        d = (t.exp() * (t - s)).sum(-1)
    elif loss == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
        d = beta * (t.exp() * (t - m)).sum(-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(-1)
    else:
        raise ValueError(f"unknown distillation loss '{loss}' (forward_kl, jsd)")
    return d * temperature ** 2


def _response_logits(model, inputs: dict, sel, fused: bool = True):
    """LM-head logits at the positions ``sel`` (over shifted positions: position t predicts token t+1).
    ``fused``: the head runs on those positions only; else on every position (the plain computation)."""
    parts = _causal_parts(model) if fused else None
    if parts is None:
        return causal_logits(model, inputs["input_ids"], inputs.get("attention_mask"))[:, :-1][sel]
    dec, head = parts
    hidden = dec(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).last_hidden_state
    return head(hidden[:, :-1][sel])


def distill_loss(student, teacher, inputs: dict, loss: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, alpha: float = 0.0, num_items_in_batch=None, fused: bool = True):
    """Logit distillation on response tokens only (the same label mask as SFT).

    Returns ``(total, kd_sum, ce_sum, n)``: total = alpha·CE(references) + (1-alpha)·divergence, each a
    mean over response tokens (or sum / num_items_in_batch under gradient accumulation, as
    :func:`response_only_loss`); the detached sums and the token count are for logging. Teacher and
    student see the same token ids; only the first V logits are compared, V the smaller head (a head
    padded past the tokenizer's vocabulary has unused rows).
    """
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    shift = labels[:, 1:]
    sel = shift != IGNORE_INDEX
    s_logits = _response_logits(student, inputs, sel, fused).float()
    with torch.no_grad():
        t_logits = _response_logits(teacher, inputs, sel, fused).float()
    v = min(s_logits.size(-1), t_logits.size(-1))
    kd = distill_divergence(s_logits[:, :v], t_logits[:, :v], loss, temperature, beta).sum()
    ce = F.cross_entropy(s_logits, shift[sel], reduction="sum") if alpha > 0 else kd.new_zeros(())
    n = int(sel.sum())
    total = alpha * ce + (1.0 - alpha) * kd
    if num_items_in_batch is not None:
        denom = num_items_in_batch.to(total.device) if hasattr(num_items_in_batch, "to") else num_items_in_batch
        total = total / denom
    else:
        total = total / max(n, 1)
    return total, float(kd.detach()), float(ce.detach()), n


# ----------------------------------------------------------------------------- preference pairs

def n_special_tokens(tokenizer) -> int:
    """Tokens the tokenizer adds around any text (BOS, ...)."""
    return len(tokenizer("", add_special_tokens=True)["input_ids"])


def fit_prompt(tokenizer, prompt: str, budget: int) -> tuple[str, bool]:
    """The tail of ``prompt`` that tokenizes to at most ``budget`` tokens.

    Preference prompts are cut from the left: the last turn, which the response answers, is
    what a reward or a preference is about (hh-rlhf transcripts run to thousands of tokens).
    A prompt rendered with this tokenizer's chat template (:class:`~tunelab.models.chat.Rendered`
    with its messages) loses whole turns from the left and is rendered again, so the template's
    opening (a system prompt, say), the final user turn and the generation prompt stay: see
    :func:`fit_chat_prompt`. Any other text is cut at a token boundary.
    Returns (text, whether it was cut).
    """
    if budget <= 0:
        return "", bool(prompt)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    if n <= budget:
        return prompt, False
    if getattr(prompt, "messages", None) and prompt.template == getattr(tokenizer, "chat_template", None):
        chat = fit_chat_prompt(tokenizer, prompt, budget)
        if chat is not None:
            return chat, True
    offsets = enc["offset_mapping"]
    k = budget
    while k > 0:
        tail = prompt[offsets[n - k][0]:]
        # re-tokenizing the tail can differ by a token at the cut (a leading-space marker): shrink until it fits
        if len(tokenizer(tail, add_special_tokens=False)["input_ids"]) <= budget:
            return tail, True
        k -= 1
    return "", True


def fit_chat_prompt(tokenizer, prompt: Rendered, budget: int) -> Rendered | None:
    """A rendered chat prompt cut to ``budget`` tokens by turns: the most recent turns that fit, starting at a
    user turn (a leading system message is kept), rendered again with the generation prompt. When the final user
    turn alone is too long, the end of its text is kept. None when not even that fits (a long system prompt or
    assistant turns after the last user turn; the caller then cuts the text) or the template refuses the cut
    conversation. Binary searches: O(log turns + log tokens) renders, for transcripts of any length."""
    import jinja2

    msgs = prompt.messages
    head = msgs[:1] if msgs[0]["role"] == "system" else []
    body = msgs[len(head):]
    if not body:
        return None

    def fitted(turns: list[dict]) -> Rendered | None:
        r = render_prompt(tokenizer, head + turns, prompt.source)
        return r if len(tokenizer(r, add_special_tokens=False)["input_ids"]) <= budget else None

    starts = [i for i, m in enumerate(body) if m["role"] == "user"] or [len(body) - 1]
    try:
        lo, hi, best = 0, len(starts) - 1, None  # fewer turns, fewer tokens: the first start that fits
        while lo <= hi:
            mid = (lo + hi) // 2
            r = fitted(body[starts[mid]:])
            if r is not None:
                best, hi = r, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return best
        last = body[starts[-1]:]
        text = last[0]["content"]
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        lo, hi = 1, len(offsets)  # tokens of the final turn's text kept (at least one)
        while lo <= hi:
            mid = (lo + hi) // 2
            r = fitted([{**last[0], "content": text[offsets[-mid][0]:].lstrip()}] + last[1:])
            if r is not None:
                best, lo = r, mid + 1
            else:
                hi = mid - 1
        return best
    except jinja2.TemplateError:  # e.g. a template that insists on a system message or on strict alternation
        return None


def prompt_budget(max_length: int, response_tokens: int, special: int) -> int:
    """Prompt tokens allowed next to a response: what is left, but never under half of ``max_length``
    (a very long response is cut at its end instead of squeezing the prompt out)."""
    return max(max_length - response_tokens - special, max_length // 2)


def encode_prompt_response(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of prompt (with the tokenizer's special tokens) followed by response, at most
    ``max_length``: the prompt is cut from the left, then the response from the right. The two
    parts are tokenized separately, as generation produces them. Returns (ids, truncated)."""
    (ids,), truncated = encode_prompt_responses(tokenizer, prompt, [response], max_length)
    return ids, truncated


def encode_prompt_responses(tokenizer, prompt: str, responses: list[str],
                            max_length: int) -> tuple[list[list[int]], bool]:
    """Token ids of prompt + each response, the prompt cut from the left ONCE, to leave room for the longest
    response (as DPO's ``preference.fit_pairs``), then each sequence cut at ``max_length``.

    For a pair this means both sides see the same context: a comparison of two answers to different cuts of one
    conversation would credit the reward model for the context, not the answer; and the two rows then start with
    the same tokens, which the shared prompt forward computes once (train/shared_prompt.py).
    Returns (ids per response, whether anything was cut)."""
    rs = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    special = n_special_tokens(tokenizer)
    text, cut = fit_prompt(tokenizer, prompt, prompt_budget(max_length, max(map(len, rs), default=0), special))
    p = tokenizer(text, add_special_tokens=True)["input_ids"] if text else \
        tokenizer("", add_special_tokens=True)["input_ids"]
    seqs = [p + r for r in rs]
    return [ids[:max_length] for ids in seqs], cut or any(len(ids) > max_length for ids in seqs)
