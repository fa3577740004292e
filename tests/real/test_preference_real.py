"""Real preference data: a short reward-model run on hh-rlhf-harmless-base with stories260K (skips without ../shared)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_cli


@pytest.mark.slow  # ~13 s: reward model on hh-rlhf; make test-slow (CI runs it)
def test_reward_model_on_hh_rlhf_with_stories260k(tmp_path, shared):
    model = shared / "models" / "stories260K"
    data = shared / "data" / "hh-rlhf-harmless-base" / "test.jsonl"
    if not model.is_dir() or not data.is_file():
        pytest.skip("stories260K or hh-rlhf-harmless-base missing from ../shared")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": "reward", "name": "hh", "model": {"name": str(model)},
        "data": {"train": str(data), "validation_split": 0.2, "max_length": 128, "limit": 200},
        "method": "full",
        "train": {"learning_rate": 1e-4, "max_steps": 6, "batch_size": 8, "eval_every": 3, "seed": 1},
    }))
    r = run_cli("train", str(recipe), "-w", str(tmp_path / "ws"))
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = list((tmp_path / "ws" / "runs").iterdir())
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 6
    # hh-rlhf transcripts became pairs (a few malformed ones are rejected with a reason), long prompts were cut
    d = s["data"]
    assert d["train_pairs"] + d["validation_pairs"] + d["rejected"] >= 190 and d["truncated_pairs"] > 0
    assert s["heldout"]["set"] == "validation" and s["heldout"]["after"]["pairs"] == d["validation_pairs"] > 20
    # held-out accuracy and margin are reported before and after (a 260K-parameter model is not asked to be good)
    for k in ("pairwise_accuracy_before", "pairwise_accuracy_after"):
        assert 0.0 <= s[k] <= 1.0
    assert isinstance(s["mean_margin_after"], float)
    assert (run_dir / "model" / "config.json").exists()
