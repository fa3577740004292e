"""Splits decided by content hash: the same record lands in the same split on every run and machine."""

from __future__ import annotations

import hashlib
import json


def content_fraction(obj: object, salt: str = "") -> float:
    """A number in [0, 1) fixed by the record's content."""
    # surrogatepass: a lone surrogate (invalid Unicode from a JSON escape) still hashes, never raises
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    h = hashlib.sha256(salt.encode() + blob).digest()
    return int.from_bytes(h[:8], "big") / 2**64
