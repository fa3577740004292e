"""NearDedup: MinHash-LSH near-duplicate removal, alone and through the prepare pipeline."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest

pytest.importorskip("datasketch")

from tunelab import config as cfglib  # noqa: E402
from tunelab.data.prepare import PrepareConfig, run  # noqa: E402
from tunelab.data.steps.base import Drop  # noqa: E402
from tunelab.data.steps.near_dedup import NearDedup, record_words, shingles  # noqa: E402
from tunelab.workspace import Workspace  # noqa: E402

PARAGRAPH = (
    "The committee met on Tuesday morning to review the quarterly budget and the hiring plan for the "
    "research group. After a long discussion about travel costs, equipment purchases and the new data "
    "center contract, the members agreed to postpone the vote until the finance office publishes its "
    "revised forecast. The chair thanked everyone for their patience and asked the secretary to circulate "
    "the minutes before the end of the week, together with a short summary of the open questions that "
    "still need an answer from the department heads."
)


def edit(text: str, positions: list[int]) -> str:
    words = text.split()
    for p in positions:
        words[p] = f"zzedit{p}"
    return " ".join(words)


def unrelated(seed: int, n: int = 80) -> str:
    rng = random.Random(seed)
    vocab = [f"w{rng.randrange(10**6)}" for _ in range(400)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def true_jaccard(a: dict, b: dict, n: int = 5) -> float:
    sa, sb = set(shingles(record_words(a), n)), set(shingles(record_words(b), n))
    return len(sa & sb) / len(sa | sb)


def test_near_duplicate_dropped_with_index_of_kept_record():
    step = NearDedup()
    recs = [{"text": unrelated(1)}, {"text": PARAGRAPH}, {"text": unrelated(2)}]
    assert [step(r) for r in recs] == recs
    # 1-3 words changed in an 88-word paragraph: true word-5-gram Jaccard 0.85-0.95
    for positions in ([40], [0, 1], [3, 4], [0, 83], [30, 31], [60, 62], [20, 21, 22], [50, 51, 52]):
        near = {"text": edit(PARAGRAPH, positions)}
        assert true_jaccard(recs[1], near) >= 0.84
        assert step(near) == Drop("near_duplicate", "1"), positions
    # three changes spread out touch 15 of 84 shingles: Jaccard ~0.70, below 0.8 → kept (and indexed)
    spread = {"text": edit(PARAGRAPH, [5, 30, 60])}
    assert true_jaccard(recs[1], spread) < 0.75
    assert step(spread) == spread
    assert step({"text": edit(PARAGRAPH, [5, 30, 61])}) == Drop("near_duplicate", "11")  # closest: the kept variant
    assert step.count == 13


def test_unrelated_texts_kept_and_exact_duplicates_dropped():
    step = NearDedup()
    docs = [{"text": unrelated(s)} for s in range(30)]
    assert all(step(d) == d for d in docs)
    assert step({"text": docs[7]["text"]}) == Drop("near_duplicate", "7")
    # case and punctuation are normalized away, and texts of a record are joined
    assert step({"text": docs[12]["text"].upper() + "!!"}) == Drop("near_duplicate", "12")
    chat = {"messages": [{"role": "user", "content": PARAGRAPH[:200]},
                         {"role": "assistant", "content": PARAGRAPH[200:]}]}
    assert step(chat) == chat
    assert step({"prompt": PARAGRAPH[:200], "completion": PARAGRAPH[200:]}) == Drop("near_duplicate", "32")
    assert step.count == 34


def test_short_and_empty_texts():
    step = NearDedup()
    assert shingles(["hello", "world"], 5) == ["hello", "ello ", "llo w", "lo wo", "o wor", " worl", "world"]
    assert shingles(["hi"], 5) == ["hi"] and shingles([], 5) == []
    a, b, c = {"text": "Hello, world!"}, {"text": "hello world"}, {"text": "goodbye moon"}
    assert step(a) == a
    assert step(b) == Drop("near_duplicate", "0")  # same normalized characters
    assert step(c) == c
    assert step({"text": "Hi"}) == {"text": "Hi"} and step({"text": "hi."}) == Drop("near_duplicate", "3")
    empty = {"text": "  ...  "}
    assert step(empty) == empty and step(dict(empty)) == empty  # no words: kept, never indexed
    assert step({"label": "x"}) == {"label": "x"}
    odd = {"text": "lone \ud800 surrogate in a text of seven words"}  # no control_chars step before
    assert step(odd) == odd and step(dict(odd)) == Drop("near_duplicate", str(step.count - 2))


def test_threshold_respected():
    words = unrelated(5, 100).split()
    half = {"text": " ".join(words[:50] + unrelated(6, 50).split())}
    full = {"text": " ".join(words)}
    assert 0.3 < true_jaccard(full, half) < 0.6  # ~50% of the words shared
    step = NearDedup(threshold=0.8)
    assert step(full) == full and step(half) == half
    # the same pair at a low threshold is a near-duplicate
    low = NearDedup(threshold=0.2)
    assert low(full) == full and low(half) == Drop("near_duplicate", "0")


def test_deterministic_and_configurable():
    rng = random.Random(0)
    base = [unrelated(s, 60) for s in range(20)]
    stream = []
    for i in range(60):
        t = rng.choice(base)
        if i % 3 == 0:
            t = edit(t, [rng.randrange(60)])
        stream.append({"text": t})

    def decisions(step):
        return [(d.reason, d.detail) if isinstance(d := step(r), Drop) else "keep" for r in stream]

    first = decisions(NearDedup(seed=1))
    assert first == decisions(NearDedup(seed=1))
    assert first.count("keep") >= 20 and first.count("keep") < 60
    step = NearDedup(threshold=0.7, num_perm=64, ngram=3, seed=7)
    cfg = step.config()
    assert {k: cfg[k] for k in ("threshold", "num_perm", "ngram", "seed")} == \
        {"threshold": 0.7, "num_perm": 64, "ngram": 3, "seed": 7}
    json.dumps(cfg)
    with pytest.raises(ValueError):
        NearDedup(threshold=0)
    # the index survives pickling (worker processes)
    step = NearDedup()
    step({"text": PARAGRAPH})
    clone = pickle.loads(pickle.dumps(step))
    assert clone({"text": PARAGRAPH}) == Drop("near_duplicate", "0")


def test_estimate_matches_minhash_jaccard():
    step = NearDedup(threshold=0.5)
    a, b = {"text": PARAGRAPH}, {"text": edit(PARAGRAPH, [5, 30, 60])}
    step(a)
    est = step.minhash(b).jaccard(step.minhash(a))
    res = step(b)
    assert (est >= 0.5) == isinstance(res, Drop)
    assert abs(est - true_jaccard(a, b)) < 0.2


def test_prepare_counts_near_duplicates(tmp_path):
    p = tmp_path / "docs.jsonl"
    rows = [{"text": unrelated(s)} for s in range(12)]
    rows += [{"text": edit(rows[3]["text"], [40])}, {"text": rows[5]["text"]}, {"text": edit(PARAGRAPH, [1])},
             {"text": PARAGRAPH}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfglib.load(PrepareConfig, data={
        "recipe": "data", "name": "nd", "inputs": [{"path": str(p)}],
        "steps": [{"kind": "normalize"}, {"kind": "near_dedup", "threshold": 0.8}],
        "split": {"validation": 0, "test": 0}})
    m = run(cfg, Workspace.resolve(tmp_path / "ws"))
    assert m["steps"][1]["kind"] == "near_dedup" and m["steps"][1]["class"] == "NearDedup"
    assert m["steps"][1]["dropped"] == {"near_duplicate": 3}
    assert m["steps"][1]["config"]["threshold"] == 0.8
    assert m["counts"]["kept"] == 13
    rejects = [json.loads(line) for line in (Path(m["path"]) / "rejects.jsonl").read_text().splitlines()]
    # detail: the 0-based index, among the records the step saw, of the kept record
    assert sorted((r["line"], r["detail"]) for r in rejects) == [(13, "3"), (14, "5"), (16, "14")]


def test_fast_update_equals_datasketch_update_batch():
    import numpy as np

    from tunelab.data.steps.near_dedup import NearDedup, _shingle_array, _update, record_words

    step = NearDedup()
    rec = {"text": "the quick brown fox jumps over the lazy dog again and again today"}
    slow = step.minhash(rec)  # the public datasketch path
    fast = step._minhash.copy()
    fast.clear()
    _update(fast, _shingle_array(record_words(rec), step.ngram))
    assert np.array_equal(fast.hashvalues, slow.hashvalues)
