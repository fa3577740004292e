"""Chat records for instruction tuning, and the record-level checks every format shares.

``to_messages`` maps any chat-kind record (Alpaca, prompt/completion, messages, ShareGPT,
Bedrock conversation; see tunelab.data.records) to a list of chat messages, optionally
prefixed with a system prompt. Extra keys (ids, labels, meta) are ignored.
"""

from __future__ import annotations

ROLES = {"system", "user", "assistant"}


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason."""


def check_messages(msgs: object) -> list[dict]:
    """Validate a chat: roles known, a system message only first, user/assistant alternating, ending with the assistant."""
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRecord(f"message {i} must be {{'role': system|user|assistant, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    body = [m for m in out if m["role"] != "system"]
    if any(m["role"] == "system" for m in out[1:]):
        raise BadRecord("a system message may only come first")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRecord(f"chat roles must alternate user/assistant starting with user (turn {i} is {m['role']})")
    if not body or body[-1]["role"] != "assistant":
        raise BadRecord("the conversation must end with an assistant message")
    if any(not m["content"].strip() for m in body if m["role"] == "assistant"):
        raise BadRecord("an assistant message is empty")
    return out


def required_text(rec: dict, key: str, required: bool = True) -> str:
    """``rec[key]`` as a non-empty string, or BadRecord saying what is wrong."""
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise BadRecord(f"field '{key}' is missing or empty")
        return ""
    if not isinstance(v, str):
        raise BadRecord(f"field '{key}' must be a string, got {type(v).__name__}")
    return v


def to_messages(rec: dict, fmt: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """Map one record to chat messages; raise BadRecord with the reason when it cannot be used."""
    from tunelab.data.records import kind, to_canonical

    canon = to_canonical(rec, fmt)
    if "messages" not in canon:
        raise BadRecord(f"instruction tuning needs chat or instruction records, got a {kind(canon)} record")
    msgs = canon["messages"]
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return msgs
