"""Every dataset in ../shared loads through the readers; real format mappings and splits (skips when absent)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tunelab import config as cfglib
from tunelab.data.formats import BadRecord
from tunelab.data.prepare import PrepareConfig, run
from tunelab.data.readers import TEXT_SUFFIXES, read
from tunelab.data.records import to_canonical
from tunelab.workspace import Workspace

READABLE = (".jsonl", ".jsonl.gz", ".json", ".csv", ".tsv", ".parquet", ".conll", ".annotated", *TEXT_SUFFIXES)


def test_every_shared_dataset_file_reads(shared):
    files = [f for f in sorted((shared / "data").rglob("*")) if f.is_file() and f.name.lower().endswith(READABLE)
             and f.name not in ("SOURCES.jsonl",) and not f.name.upper().startswith(("README", "LICENSE"))]
    assert len(files) >= 15
    # every dataset folder contributes at least one readable file
    assert {f.relative_to(shared / "data").parts[0] for f in files} == {d.name for d in (shared / "data").iterdir() if d.is_dir()}
    for f in files:
        items = list(itertools.islice(read(f), 50))
        assert items, f
        good = [r for _, _, r in items if not isinstance(r, BadRecord)]
        assert good, f"{f}: every record unreadable"


def _prepare(ws, name, inputs, **kw):
    return run(cfglib.load(PrepareConfig, data={"recipe": "data", "name": name, "inputs": inputs, **kw}), ws)


def test_hh_rlhf_pairs_split_into_prompt_chosen_rejected(shared, tmp_path):
    f = shared / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
    m = _prepare(Workspace.resolve(tmp_path), "hh", [{"path": str(f), "format": "preference"}],
                 split={"validation": 0.1, "test": 0.1})
    assert m["kinds"] == {"preference": m["counts"]["kept"]} and m["counts"]["kept"] > 2000
    rec = json.loads((Path(m["path"]) / "train.jsonl").read_text().splitlines()[0])
    assert rec["prompt"].startswith("Human:") and rec["prompt"].endswith("Assistant:")
    assert rec["chosen"] != rec["rejected"] and "Human:" not in rec["chosen"][:20]


def test_banking77_stratified_split(shared, tmp_path):
    f = shared / "data" / "banking77" / "train.csv"
    m = _prepare(Workspace.resolve(tmp_path), "b77", [{"path": str(f), "format": "classification",
                                                       "mapping": {"label": "category"}}],
                 steps=[{"kind": "exact_dedup"}], split={"validation": 0.1, "test": 0.1})
    labels = m["labels"]
    assert len(labels["train"]) == 77 and len(labels["test"]) == 77
    for lab, n_train in labels["train"].items():
        total = n_train + labels["validation"].get(lab, 0) + labels["test"][lab]
        assert abs(labels["test"][lab] - 0.1 * total) <= 1  # every intent split 80/10/10
    again = _prepare(Workspace.resolve(tmp_path / "other"), "b77", [{"path": str(f), "format": "classification",
                                                                     "mapping": {"label": "category"}}],
                     steps=[{"kind": "exact_dedup"}], split={"validation": 0.1, "test": 0.1})
    assert again["dataset_id"] == m["dataset_id"]
    assert (Path(again["path"]) / "test.jsonl").read_bytes() == (Path(m["path"]) / "test.jsonl").read_bytes()


def test_bitext_to_instruction_records(shared, tmp_path):
    f = shared / "data" / "bitext-customer-support" / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
    m = _prepare(Workspace.resolve(tmp_path), "bitext",
                 [{"path": str(f), "format": "prompt_completion", "mapping": {"prompt": "instruction",
                                                                                "completion": "response"}}],
                 steps=[{"kind": "normalize"}, {"kind": "pii"}], export=["bedrock_conversation"])
    assert m["kinds"] == {"chat": m["counts"]["kept"]} and m["counts"]["kept"] > 4000
    rec = json.loads((Path(m["path"]) / "train.jsonl").read_text().splitlines()[0])
    assert [x["role"] for x in rec["messages"]] == ["user", "assistant"]
    assert (Path(m["path"]) / "train.bedrock_conversation.jsonl").exists()


def test_bitext_row_maps_with_placeholders(shared):
    f = shared / "data" / "bitext-customer-support" / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
    _, _, row = next(iter(read(f)))
    rec = to_canonical(row, "prompt_completion", {"prompt": "instruction", "completion": "response"})
    assert rec["messages"][1]["content"]


@pytest.mark.parametrize("unit", ["document", "paragraph"])
def test_cuad_text_folder(shared, tmp_path, unit):
    folder = shared / "data" / "cuad-contracts" / "full_contract_txt"
    n = sum(1 for _ in itertools.islice(read(folder, unit), 300))
    assert n == 300


def test_wnut17_conll_sentences(shared):
    f = shared / "data" / "wnut17" / "wnut17train.conll"
    _, line, rec = next(iter(read(f)))
    assert line == 1 and rec["tokens"][0] == "@paulwalk" and len(rec["tokens"]) == len(rec["ner_tags"])
    assert any(t != "O" for _, _, r in itertools.islice(read(f), 200) for t in r["ner_tags"])
