"""Uploaded files: stored under ids, never under a client's name; validated by tunelab's data readers.

A file lands in ``<workspace>/platform/files/<project>/<id><suffix>``: the client's filename is
kept only as a label (its last path part, control characters dropped), so ``../../x`` or
``C:\\x`` cannot name a place on the server. The suffix picks the reader (JSONL, JSON, CSV,
Parquet); the content is read with tunelab.data.readers and every record is mapped with the
same record checks training uses, so a broken record is refused at upload with its line number.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunelab.data.formats import BadRecord
from tunelab.data.readers import read
from tunelab.data.records import kind, to_canonical
from tunelab.platform.jobs import dpo_pair

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
MAX_SHOWN = 20  # problems listed in an error


class BadUpload(Exception):
    def __init__(self, message: str, problems: list[str] | None = None, status: int = 400):
        super().__init__(message)
        self.problems = problems or []
        self.status = status


def label(filename: str | None) -> str:
    """A safe display name: the last path part of what the client sent, printable, at most 200 characters."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(c for c in name if c.isprintable()).strip().lstrip(".")
    return name[:200] or "upload.jsonl"


def suffix(name: str) -> str:
    low = name.lower()
    for s in SUFFIXES:
        if low.endswith(s):
            return s
    raise BadUpload(f"file type of '{name}' is not supported; upload {', '.join(SUFFIXES)} "
                    "(JSON Lines for fine-tuning)", status=415)


def validate(path: Path, purpose: str) -> tuple[int, str]:
    """Check every record; returns (records, kind) or raises BadUpload listing the problems with line numbers.

    Kinds: ``chat`` (messages, alpaca, prompt/completion, ShareGPT, Bedrock conversation), ``preference``
    (prompt/chosen/rejected or OpenAI's DPO records), ``text``, ``classification``.
    """
    problems: list[str] = []
    kinds: dict[str, int] = {}
    n = 0
    try:
        items = read(path)
        for _, line, rec in items:
            n += 1
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                if isinstance(rec, dict) and "preferred_output" in rec:
                    dpo_pair(rec)
                    k = "openai_dpo"
                else:
                    k = kind(to_canonical(rec))
                kinds[k] = kinds.get(k, 0) + 1
            except BadRecord as e:
                problems.append(f"line {line}: {e}")
    except BadUpload:
        raise
    except Exception as e:  # a reader that cannot parse the file at all (e.g. not Parquet)
        raise BadUpload(f"cannot read the file: {e}") from None
    if problems:
        shown = problems[:MAX_SHOWN]
        more = f" (and {len(problems) - MAX_SHOWN} more)" if len(problems) > MAX_SHOWN else ""
        raise BadUpload(f"{len(problems)} of {n} records are invalid{more}: " + "; ".join(shown), problems)
    if n == 0:
        raise BadUpload("the file has no records")
    if len(kinds) > 1:
        raise BadUpload(f"the file mixes record kinds ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))}); "
                        "use one kind per file")
    (k,) = kinds
    if purpose == "fine-tune" and k not in ("chat", "openai_dpo", "preference"):
        raise BadUpload(f"purpose fine-tune needs chat records (messages) or preference pairs; these are {k} "
                        "records (upload them with purpose 'tunelab-data' for native recipes)")
    return n, k
