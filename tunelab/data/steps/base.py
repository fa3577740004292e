"""The step contract (DESIGN principle 7, after datatrove's filters).

A step sees one canonical record at a time and returns either the (possibly rewritten)
record, or ``Drop(reason)``. The pipeline, not the step, counts kept/dropped records by
reason and writes rejects, so every step stays a few lines of logic that is easy to test.

Canonical records use TRL key names and carry provenance in ``meta``:
  {"messages": [{"role", "content"}, ...]}          chat / instruction
  {"prompt": str, "completion": str}                 prompt-completion
  {"prompt": str, "chosen": str, "rejected": str}    preference pair
  {"text": str, "label": str}                        classification
  {"text": str}                                      raw text (pre-training)
  + "meta": {"source": path, "line": int, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

TEXT_KEYS = ("text", "prompt", "completion", "chosen", "rejected")


@dataclass(frozen=True)
class Drop:
    """A step's decision to remove a record, with a short machine-countable reason (e.g. "too_short")."""

    reason: str
    detail: str = ""


Result = "dict | Drop"


def texts(rec: dict) -> list[str]:
    """Every model-visible text of a record, in a fixed order."""
    out = [rec[k] for k in TEXT_KEYS if isinstance(rec.get(k), str)]
    out += [m["content"] for m in rec.get("messages") or [] if isinstance(m.get("content"), str)]
    return out


def map_texts(rec: dict, fn: Callable[[str], str]) -> dict:
    """A copy of ``rec`` with ``fn`` applied to every model-visible text (meta and labels untouched)."""
    new = dict(rec)
    for k in TEXT_KEYS:
        if isinstance(new.get(k), str):
            new[k] = fn(new[k])
    if isinstance(new.get("messages"), list):
        new["messages"] = [{**m, "content": fn(m["content"])} if isinstance(m.get("content"), str) else m
                           for m in new["messages"]]
    return new


class Step:
    """Base of every step: ``name`` for counts, ``config()`` for lineage, ``__call__`` per record.

    Steps that need a pass over all data first (near dedup, decontamination index) may
    override ``prepare(records)``; the default does nothing.

    Parallel execution (``tunelab.data.prepare`` with workers): a ``pure`` step's result depends on
    the record and its settings only, so worker processes run it, even on records that a stateful
    step before it may still drop (its running statistics travel back with ``pop_stats`` and are
    added in the main process with ``add_stats`` only for records that reach it). A stateful step
    runs in the main process, in input order, as ``apply(rec, precompute(rec))``: ``precompute``
    is its state-free share of the work (hashing, shingling) and runs in the workers.
    """

    name: str = "step"
    pure: bool = False

    def precompute(self, rec: dict) -> Any:
        return None

    def apply(self, rec: dict, pre: Any) -> "dict | Drop":
        return self(rec)

    def pop_stats(self) -> Any:
        """Statistics the last call added (pure steps that keep any), or None."""
        return None

    def add_stats(self, stats: Any) -> None:
        return None

    def config(self) -> dict[str, Any]:
        return {}

    def prepare(self, records: Iterator[dict]) -> None:  # pragma: no cover - default no-op
        return None

    def __call__(self, rec: dict) -> dict | Drop:
        raise NotImplementedError
