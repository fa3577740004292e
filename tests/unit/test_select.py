"""DSIR selection moves the data toward the target domain; caps per label; both through prepare."""

from __future__ import annotations

import json
import random

from tunelab import config as cfglib
from tunelab.data import select as sel
from tunelab.data.prepare import PrepareConfig, run
from tunelab.workspace import Workspace

COOK = ["simmer", "onion", "garlic", "oven", "bake", "flour", "sauce", "pepper", "butter", "stir"]
BANK = ["account", "loan", "interest", "transfer", "card", "balance", "deposit", "fee", "credit", "payment"]
COMMON = ["the", "a", "my", "please", "today", "with", "and", "for", "is", "to"]


def _doc(rng, vocab, n=20):
    return " ".join(rng.choice(vocab + COMMON) for _ in range(n))


def test_gumbel_top_k_prefers_heavy_weights():
    picks = sel.gumbel_top_k([0.0] * 50 + [5.0] * 50, 50, seed=1)
    assert len(picks) == 50 and sum(i >= 50 for i in picks) >= 45
    assert sel.gumbel_top_k([0.0, float("-inf")], 5, seed=0) == [0]


def test_dsir_selects_target_domain_and_caps(tmp_path):
    rng = random.Random(0)
    raw = tmp_path / "raw.jsonl"
    with open(raw, "w") as f:
        for i in range(400):
            dom = "bank" if i % 4 == 0 else "cook"  # 25% banking
            f.write(json.dumps({"text": _doc(rng, BANK if dom == "bank" else COOK) + f" {i}", "label": dom}) + "\n")
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": _doc(rng, BANK)}) + "\n" for _ in range(50)))
    ws = Workspace.resolve(tmp_path / "ws")
    m = run(cfglib.load(PrepareConfig, data={
        "recipe": "data", "name": "dsir", "inputs": [{"path": str(raw), "format": "classification"}],
        "select": {"target": [str(target)], "size": 100}, "split": {"validation": 0, "test": 0}}), ws)
    d = m["selection"]["dsir"]
    assert d["kept"] == 100 and d["kl_target_selected"] < 0.5 * d["kl_target_raw"]
    assert m["labels"]["train"].get("bank", 0) >= 90  # the selection is the banking domain
    assert m["counts"]["selected"] == 100 and m["splits"]["train"] == 100
    card = open(f"{m['path']}/datacard.md").read()
    assert "DSIR" in card
    m2 = run(cfglib.load(PrepareConfig, data={
        "recipe": "data", "name": "cap", "inputs": [{"path": str(raw), "format": "classification"}],
        "select": {"max_per_label": 30}, "split": {"validation": 0, "test": 0}}), ws)
    assert m2["labels"]["train"] == {"bank": 30, "cook": 30}
