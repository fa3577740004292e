"""Decontamination: drop training records that share word n-grams with evaluation/test texts.

GPT-3 style (Brown et al. 2020, App. C): words are casefolded with punctuation removed, an
evaluation text contributes all its ``n``-grams (n=13 by default), and one that is shorter than
``n`` words contributes itself as a single gram, which is then looked for anywhere in the
training text. Evaluation texts shorter than ``min_gram_words`` (8, GPT-3's smallest n) are
ignored: a gram of "yes" or "Paris" would flag half the data. Grams are kept as stable 64-bit
BLAKE2b hashes (no text is retained, and the index survives pickling to worker processes).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from .base import Drop, Step
from .clean import _check_field, normalize_for_match, select_texts


def _hash(words: list[str] | tuple[str, ...]) -> int:
    data = "\x00".join(words).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def read_eval_texts(paths: str | Path | Iterable[str | Path]) -> list[str]:
    """Every string field (nested ones too) of the records in JSONL / JSON files (``.gz`` allowed).

    A ``.json`` file is one document (a list of records or an object); anything else is read as
    JSON Lines, blank lines skipped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[str] = []
    for p in map(Path, paths):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8") as f:
            if p.name.removesuffix(".gz").endswith(".json"):
                out.extend(_strings(json.load(f)))
            else:
                for line in f:
                    if line.strip():
                        out.extend(_strings(json.loads(line)))
    return out


class Decontaminate(Step):
    """Drops a record sharing at least ``min_overlap`` n-grams with the evaluation texts: reason
    "contaminated"; ``self.leaked`` gets ``{"index": i, "overlap": k}`` (i = 0-based index among
    records this step has seen, k = distinct shared grams). ``field`` selects the training text
    ("all": every model-visible text, joined, so grams may span prompt and answer)."""

    name = "decontaminate"

    def __init__(self, eval_texts: Iterable[str], n: int = 13, min_overlap: int = 1, field: str = "all",
                 min_gram_words: int = 8):
        if n < 1 or min_overlap < 1 or min_gram_words < 1:
            raise ValueError("n, min_overlap and min_gram_words must be >= 1")
        self.n, self.min_overlap, self.field = n, min_overlap, _check_field(field)
        self.min_gram_words = min(min_gram_words, n)
        self.grams: set[int] = set()
        self.short_lengths: set[int] = set()  # lengths of evaluation texts kept whole (< n words)
        self.sources: list[str] = []
        digest = hashlib.sha1()
        n_texts = 0
        for t in eval_texts:
            n_texts += 1
            digest.update(t.encode("utf-8", "surrogatepass") + b"\x1e")
            words = normalize_for_match(t)
            if len(words) >= n:
                self.grams.update(_hash(words[i:i + n]) for i in range(len(words) - n + 1))
            elif len(words) >= self.min_gram_words:
                self.grams.add(_hash(words))
                self.short_lengths.add(len(words))
        self.n_eval_texts, self.eval_sha1 = n_texts, digest.hexdigest()
        self.leaked: list[dict[str, int]] = []
        self.count = 0

    @classmethod
    def from_files(cls, paths: str | Path | Iterable[str | Path], **kwargs: Any) -> "Decontaminate":
        """Index every string field of the records in JSONL/JSON evaluation files."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        step = cls(read_eval_texts(paths), **kwargs)
        step.sources = [str(p) for p in paths]
        return step

    def config(self) -> dict[str, Any]:
        return {"n": self.n, "min_overlap": self.min_overlap, "field": self.field,
                "min_gram_words": self.min_gram_words, "eval_texts": self.n_eval_texts,
                "eval_grams": len(self.grams), "eval_sha1": self.eval_sha1, "sources": self.sources}

    def overlap(self, text: str) -> int:
        """How many distinct evaluation grams occur in ``text``."""
        words = normalize_for_match(text)
        hits: set[int] = set()
        for size in (self.n, *self.short_lengths):
            for i in range(len(words) - size + 1):
                h = _hash(words[i:i + size])
                if h in self.grams:
                    hits.add(h)
        return len(hits)

    def __call__(self, rec: dict) -> dict | Drop:
        i = self.count
        self.count += 1
        ts = select_texts(rec, self.field)
        k = self.overlap("\n".join(ts)) if ts and self.grams else 0
        if k >= self.min_overlap:
            self.leaked.append({"index": i, "overlap": k})
            return Drop("contaminated", f"overlap={k}")
        return rec
