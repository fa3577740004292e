"""Records for training and evaluation: a file read into chats (or, for pre-training, into text
documents), with every unusable record kept as a reject (file, line, reason); a validation or
held-out share split off by content hash."""

from __future__ import annotations

import re

from tunelab.data.formats import BadRecord, to_messages
from tunelab.data.readers import read
from tunelab.data.records import export, to_canonical
from tunelab.data.split import content_fraction

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def load_records(path: str, convert, rejects: list[dict], limit: int | None = None) -> list:
    """``convert(record)`` for each record of a file, in order, at most ``limit`` results; a record the
    reader could not parse, or that ``convert`` refuses with ``BadRecord``, goes to ``rejects`` with file,
    line and reason. The one loop behind chats, preference pairs and prompts."""
    out = []
    for _, line, rec in read(path):
        if limit is not None and len(out) >= limit:
            break
        try:
            if isinstance(rec, BadRecord):
                raise rec
            out.append(convert(rec))
        except BadRecord as e:
            rejects.append({"file": str(path), "line": line, "reason": str(e)})
    return out


def load_chats(path: str, data, rejects: list[dict], limit: int | None = None) -> list[list[dict]]:
    """Read a file into chat message lists (``data.format``, ``data.system_prompt``); unusable records go
    to ``rejects`` with file, line and reason."""
    return load_records(path, lambda rec: to_messages(rec, data.format, data.system_prompt), rejects, limit)


def split_validation(items: list, share: float, seed: int, key=None) -> tuple[list, list]:
    """(train, validation): each item goes to validation when its content hash falls under ``share``, so
    the split is the same on every run and on every machine, whatever the order of the file."""
    return split_by_content(items, share, salt=f"val{seed}", key=key)


def split_heldout(texts: list[str], share: float) -> tuple[list[str], list[str]]:
    """(train, held-out) documents for perplexity, by content hash: the same on every run, seed and machine;
    duplicates stay together."""
    return split_by_content(texts, share, salt="heldout")


def split_by_content(items: list, share: float, salt: str, key=None) -> tuple[list, list]:
    """(kept, split off): an item is split off when the hash of its content (of ``key(item)`` when given) and
    ``salt`` falls under ``share``."""
    kept, off = [], []
    for x in items:
        (off if content_fraction(key(x) if key else x, salt=salt) < share else kept).append(x)
    return kept, off


def load_texts(files: list[str], text_unit: str, limit: int | None, rejects: list[dict]) -> list[str]:
    """Documents from plain text (a file, a folder) or records (chat records become their text), one per
    file/record or, with ``text_unit: paragraph``, one per paragraph; unusable records go to ``rejects``."""
    texts: list[str] = []
    for f in files:
        for src, line, rec in read(f):
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                text = export(to_canonical(rec), "text")["text"]
            except BadRecord as e:
                rejects.append({"file": src, "line": line, "reason": str(e)})
                continue
            parts = _BLANK_LINE.split(text) if text_unit == "paragraph" else [text]
            for part in parts:
                if part.strip():
                    texts.append(part.strip() if text_unit == "paragraph" else part)
                    if limit is not None and len(texts) >= limit:
                        return texts
    return texts


def train_validation_chats(data, seed: int, rejects: list[dict]) -> tuple[list[list[dict]], list[list[dict]]]:
    """A chat data section's training chats (the first ``data.limit``) and validation chats:
    ``data.validation``, else a ``data.validation_split`` share of train held out by content hash, else none."""
    chats = load_chats(data.train, data, rejects, data.limit)
    if data.validation:
        return chats, load_chats(data.validation, data, rejects)
    if data.validation_split > 0:
        chats, val_chats = split_validation(chats, data.validation_split, seed)
        if not val_chats:
            print("warning: validation_split left no validation examples (too few distinct records); "
                  "training without validation or early stopping")
        return chats, val_chats
    return chats, []
