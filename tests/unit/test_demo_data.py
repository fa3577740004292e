"""The synthetic customer-support dataset of the demo (tunelab.demo_data)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tunelab.demo_data import FIELDS, INTENTS, build_support_dataset, write_support_dataset

COMMITTED = Path(__file__).resolve().parents[2] / "examples/data/support"
ORDER_RE = re.compile(r"NW-\d{6}")


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return build_support_dataset()


def _all(data: dict[str, list[dict]]) -> list[dict]:
    return [rec for split in ("train", "validation", "test") for rec in data[split]]


def test_split_sizes(data):
    assert list(data) == ["train", "validation", "test"]
    assert {k: len(v) for k, v in data.items()} == {"train": 1040, "validation": 60, "test": 100}


def test_records_have_fixed_schema_and_unique_ids(data):
    records = _all(data)
    for rec in records:
        assert tuple(rec) == FIELDS
        assert rec["input"] == ""
        assert re.fullmatch(r"support-\d{5}", rec["id"])
    assert len({rec["id"] for rec in records}) == 1200


def test_intents_stratified_over_splits(data):
    assert len(INTENTS) >= 12
    assert len({i.category for i in INTENTS}) >= 5
    test_intents = {rec["intent"] for rec in data["test"]}
    assert len(test_intents) >= 10
    for split, records in data.items():
        counts = Counter(rec["intent"] for rec in records)
        assert set(counts) == {i.name for i in INTENTS}, split
        assert max(counts.values()) - min(counts.values()) <= 1, split


def test_deterministic(data, tmp_path):
    assert build_support_dataset(0) == data
    a = write_support_dataset(tmp_path / "a")
    b = write_support_dataset(tmp_path / "b")
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()


def test_other_seed_gives_other_data(data):
    other = build_support_dataset(seed=1)
    assert other != data
    assert [r["instruction"] for r in other["test"]] != [r["instruction"] for r in data["test"]]


def test_no_duplicate_instructions(data):
    instructions = [rec["instruction"] for rec in _all(data)]
    assert len(set(instructions)) == len(instructions)
    train = {rec["instruction"] for rec in data["train"]}
    assert not train & {rec["instruction"] for rec in data["validation"] + data["test"]}


def test_lengths(data):
    for rec in _all(data):
        assert 25 <= len(rec["output"].split()) <= 60, rec
        assert 8 <= len(rec["instruction"].split()) <= 40, rec


def test_answers_copy_the_order_number(data):
    with_order = 0
    for rec in _all(data):
        asked = ORDER_RE.findall(rec["instruction"])
        answered = ORDER_RE.findall(rec["output"])
        for order in asked:
            assert order in rec["output"], rec
        assert set(answered) <= set(asked), rec  # never invents an order number
        with_order += bool(asked)
    assert with_order >= 400


def test_written_files_are_jsonl(tmp_path):
    paths = write_support_dataset(tmp_path)
    assert sorted(paths) == ["test", "train", "validation"]
    for split, path in paths.items():
        assert path.name == f"{split}.jsonl"
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n")
        rows = [json.loads(line) for line in text.splitlines()]
        assert rows == build_support_dataset()[split]


def test_committed_files_match_generator(tmp_path):
    paths = write_support_dataset(tmp_path)
    for split, path in paths.items():
        committed = COMMITTED / f"{split}.jsonl"
        assert committed.is_file(), f"missing {committed}; run python -m tunelab.demo_data examples/data/support"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} drifted from tunelab.demo_data; regenerate with "
            "python -m tunelab.demo_data examples/data/support")
