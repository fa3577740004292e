"""Record formats → canonical chat ``messages`` (TRL key names) for instruction tuning.

Accepted per record (auto-detected, or named with ``format:``):
- ``alpaca``: ``instruction`` (+ optional ``input``) and ``output``;
- ``prompt_completion``: ``prompt`` and ``completion`` (strings, or lists of chat messages);
- ``messages``: ``messages`` = [{"role", "content"}, ...] ending with an assistant turn.
Extra keys (ids, labels, metadata) are kept aside, never fed to the model.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterator, Literal

from tunelab.errors import TunelabError

FormatName = Literal["auto", "alpaca", "prompt_completion", "messages"]
ROLES = {"system", "user", "assistant"}


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason."""


def detect_format(rec: dict) -> str:
    if "messages" in rec:
        return "messages"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    raise BadRecord(f"unknown format: keys {sorted(rec)[:8]} match none of alpaca (instruction/output), "
                    "prompt_completion (prompt/completion) or messages")


def _text(rec: dict, key: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise BadRecord(f"field '{key}' is missing or empty")
        return ""
    if not isinstance(v, str):
        raise BadRecord(f"field '{key}' must be a string, got {type(v).__name__}")
    return v


def _check_messages(msgs: object) -> list[dict]:
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


def to_messages(rec: dict, fmt: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """Map one record to chat messages; raise BadRecord with the reason when it cannot be used."""
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(rec).__name__}")
    fmt = detect_format(rec) if fmt == "auto" else fmt
    if fmt == "alpaca":
        user = _text(rec, "instruction")
        extra = _text(rec, "input", required=False)
        if extra:
            user = f"{user}\n\n{extra}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, "output")}]
    elif fmt == "prompt_completion":
        p, c = rec.get("prompt"), rec.get("completion")
        if isinstance(p, list) and isinstance(c, list):
            msgs = _check_messages(p + c)
        else:
            msgs = [{"role": "user", "content": _text(rec, "prompt")},
                    {"role": "assistant", "content": _text(rec, "completion")}]
    elif fmt == "messages":
        msgs = _check_messages(rec.get("messages"))
    else:
        raise BadRecord(f"unknown format '{fmt}'")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return msgs


def read_records(path: str | Path) -> Iterator[tuple[int, dict | BadRecord]]:
    """Yield (line number, record or BadRecord) from .jsonl(.gz), .json (array) or .csv/.tsv."""
    p = Path(path)
    if not p.is_file():
        raise TunelabError(f"data file not found: {p}")
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8", errors="strict") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, BadRecord(f"invalid JSON: {e.msg}")
    elif name.endswith(".json"):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TunelabError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(data, dict):  # {"id": record, ...}
            data = list(data.values())
        if not isinstance(data, list):
            raise TunelabError(f"{p}: expected a JSON array of records")
        for i, rec in enumerate(data, 1):
            yield i, rec
    elif name.endswith((".csv", ".tsv")):
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if name.endswith(".tsv") else ",")
            for i, row in enumerate(reader, 2):
                yield i, dict(row)
    else:
        raise TunelabError(f"{p}: unsupported file type; use .jsonl, .jsonl.gz, .json, .csv or .tsv")
