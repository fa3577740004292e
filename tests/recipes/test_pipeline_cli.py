"""A pipeline recipe through the real CLI: cpt (LoRA) → sft (LoRA), each stage a catalog run linked to
the one before, the first stage's adapter merged and handed on, the second stage trained from it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from tests.conftest import ANIMALS, COLORS, run_cli, write_color_data


def test_pipeline_cpt_then_sft(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    text = tmp_path / "domain.txt"
    rng = random.Random(3)
    text.write_text("\n\n".join(" ".join(f"The {rng.choice(['small', 'big'])} {a} is {COLORS[ANIMALS.index(a)]}."
                                         for a in rng.choices(ANIMALS, k=6)) for _ in range(120)))
    train = write_color_data(tmp_path / "train.jsonl", 160, seed=1)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "sft.yaml").write_text(yaml.safe_dump({
        "recipe": "sft", "name": "p-sft", "model": {"name": "replaced-by-the-pipeline"},
        "data": {"train": str(train), "validation_split": 0.1, "max_length": 64},
        "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"learning_rate": 2e-2, "max_steps": 20, "batch_size": 8, "eval_every": 10, "seed": 3}}))
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": "pipeline", "name": "cpt-sft",
        "stages": [
            {"name": "domain", "config": {
                "recipe": "cpt", "name": "p-cpt", "model": {"name": str(tiny_model)},
                "data": {"files": [str(text)], "text_unit": "paragraph", "heldout_share": 0.1, "block_size": 48},
                "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "train": {"learning_rate": 2e-2, "max_steps": 12, "batch_size": 8, "eval_every": 6, "seed": 5}}},
            {"name": "instructions", "file": "stages/sft.yaml", "set": ["train.max_steps=24"]},
        ]}))
    ws = tmp_path / "ws"
    r = run_cli("train", str(recipe), "-w", str(ws), cwd=tmp_path.parent)  # stage file found next to the pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 1/2: domain (cpt)" in r.stdout and "stage 2/2: instructions (sft)" in r.stdout

    summary = json.loads(next((ws / "pipelines").glob("cpt-sft-*.json")).read_text())
    first, second = summary["stages"]
    assert [first["recipe"], second["recipe"]] == ["cpt", "sft"]
    from tunelab.workspace import Workspace

    cat = Workspace.resolve(ws).catalog()
    assert cat.get_run(second["run_id"])["parent_id"] == first["run_id"]
    assert [r["id"] for r in cat.list_runs(parent_id=first["run_id"])] == [second["run_id"]]

    # stage 1's adapter was merged into its base and the merge reproduces the trained model's logits
    first_dir = Path(cat.get_run(first["run_id"])["dir"])
    assert first["hands_on"] == str(first_dir / "merged")
    merged = AutoModelForCausalLM.from_pretrained(first_dir / "merged").eval()
    probe = load_file(str(first_dir / "probe.safetensors"))
    with torch.no_grad():
        logits = merged(input_ids=probe["input_ids"][None]).logits[0, -probe["logits"].shape[0]:]
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)

    # stage 2 trained from that merged model (its lineage says so) and its loss fell
    second_dir = Path(cat.get_run(second["run_id"])["dir"])
    lineage = json.loads((second_dir / "lineage.json").read_text())
    assert lineage["base_model"] == str(first_dir / "merged") and lineage["parent_id"] == first["run_id"]
    rows = [json.loads(l) for l in (second_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x and "eval_loss" not in x]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert summary["final_run_id"] == second["run_id"]
