"""Chat records for instruction tuning.

``to_messages`` maps any chat-kind record (Alpaca, prompt/completion, messages, ShareGPT,
Bedrock conversation; see tunelab.data.records) to a list of chat messages, optionally
prefixed with a system prompt. Extra keys (ids, labels, meta) are ignored.

Imports flow one way: this module builds on ``tunelab.data.records`` (which defines
``BadRecord`` and the record-level checks; they are re-exported here for existing callers).
"""

from __future__ import annotations

from tunelab.data.records import ROLES, BadRecord, check_messages, kind, required_text, to_canonical

__all__ = ["ROLES", "BadRecord", "check_messages", "required_text", "to_messages"]


def to_messages(rec: dict, fmt: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """Map one record to chat messages; raise BadRecord with the reason when it cannot be used."""
    canon = to_canonical(rec, fmt)
    if "messages" not in canon:
        raise BadRecord(f"instruction tuning needs chat or instruction records, got a {kind(canon)} record")
    msgs = canon["messages"]
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return msgs
