"""Loss masking, tokenization of chats, batching and token accounting — shared by every recipe.

Kept in one tested module so recipes cannot drift apart (torchtune#2307). Labels are -100
everywhere except on assistant tokens, which include the end-of-turn/EOS token so the model
learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100


def fallback_chat_template(tokenizer) -> str:
    """A plain template for models without one; the EOS closes every assistant turn."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    return (
        "{{ '" + _jinja_escape(bos) + "' }}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### User:\\n' + m['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Assistant:\\n' + m['content'] + '" + _jinja_escape(eos) + "' + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
    )


def _jinja_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer a chat template and a pad token if it lacks them. Returns True if the template was added."""
    added = False
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = fallback_chat_template(tokenizer)
        added = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return added


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


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
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(ids, labels, truncated, sum(1 for x in labels if x != IGNORE_INDEX))


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


def tokenize_all_chats(tokenizer, chats: list[list[dict]], max_length: int | None):
    """Tokenize many chats; returns features ({input_ids, labels}) and the TokenStats."""
    stats, feats = TokenStats(), []
    for msgs in chats:
        t = tokenize_chat(tokenizer, msgs, max_length)
        if stats.add(t):
            feats.append({"input_ids": t.input_ids, "labels": t.labels})
    return feats, stats


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


def response_only_loss(model, inputs: dict, num_items_in_batch=None):
    """Causal-LM loss computing logits only where labels are set.

    The LM head of a small model is a large share of its compute (SmolLM2-135M: 28M of
    135M parameters, and a 49k-wide softmax per token); prompt tokens never need logits.
    Measured on 2 CPU cores with LoRA: ~1.3-1.5x tokens/s. Returns the same value as the
    model's own loss: mean over label tokens, or sum / num_items_in_batch under gradient
    accumulation (token-weighted across micro-batches, transformers#34191).
    """
    import torch.nn.functional as F

    parts = _causal_parts(model)
    labels = inputs["labels"]
    if parts is None:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
        nll, n = masked_nll(logits, labels)
    else:
        dec, head = parts
        hidden = dec(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).last_hidden_state
        shift = labels[:, 1:]
        sel = shift != IGNORE_INDEX
        logits = head(hidden[:, :-1][sel]).float()
        nll = F.cross_entropy(logits, shift[sel], reduction="sum")
        n = int(sel.sum())
    if num_items_in_batch is not None:
        denom = num_items_in_batch.to(nll.device) if hasattr(num_items_in_batch, "to") else num_items_in_batch
        return nll / denom
    return nll / max(n, 1)
