"""Records for training and evaluation: a file read into chats, with every unusable record kept as a
reject (file, line, reason); a validation share split off by content hash."""

from __future__ import annotations

from tunelab.data.formats import BadRecord, to_messages
from tunelab.data.readers import read
from tunelab.data.split import content_fraction


def load_chats(path: str, data, rejects: list[dict], limit: int | None = None) -> list[list[dict]]:
    """Read a file into chat message lists (``data.format``, ``data.system_prompt``); unusable records go
    to ``rejects`` with file, line and reason."""
    chats = []
    for _, line, rec in read(path):
        if limit is not None and len(chats) >= limit:
            break
        try:
            if isinstance(rec, BadRecord):
                raise rec
            chats.append(to_messages(rec, data.format, data.system_prompt))
        except BadRecord as e:
            rejects.append({"file": str(path), "line": line, "reason": str(e)})
    return chats


def split_validation(items: list, share: float, seed: int) -> tuple[list, list]:
    """(train, validation): each item goes to validation when its content hash falls under ``share``, so
    the split is the same on every run and on every machine, whatever the order of the file."""
    train, val = [], []
    for x in items:
        (val if content_fraction(x, salt=f"val{seed}") < share else train).append(x)
    return train, val
