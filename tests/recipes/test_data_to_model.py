"""Lineage from raw file to model through the real CLI: data prepare → train → the run records the dataset id."""

from __future__ import annotations

import json

import yaml

from tests.conftest import run_cli, write_color_data


def test_prepare_then_train_links_lineage(tmp_path, tiny_model):
    raw = write_color_data(tmp_path / "raw.jsonl", 300, seed=5)
    with open(raw, "a") as f:
        f.write("{broken json\n")
        f.write(json.dumps({"instruction": "Mail jane@example.com the color", "output": "Done."}) + "\n")
    ws = tmp_path / "ws"
    data_recipe = tmp_path / "data.yaml"
    data_recipe.write_text(yaml.safe_dump({
        "recipe": "data", "name": "colors", "inputs": [{"path": str(raw), "license": "CC0-1.0"}],
        "steps": [{"kind": "normalize"}, {"kind": "exact_dedup"}, {"kind": "pii"}],
        "split": {"validation": 0.1, "test": 0.1}}))
    r = run_cli("data", "prepare", str(data_recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rejected: invalid JSON" in r.stdout and "dropped by exact_dedup: duplicate" in r.stdout
    r = run_cli("data", "prepare", str(data_recipe), "-w", str(ws))
    assert r.returncode == 0 and "reused" in r.stdout  # already prepared: same content id
    # --strict judges the reused version too: it has a rejected record (issue: strict passed here)
    r = run_cli("data", "prepare", str(data_recipe), "-w", str(ws), "--strict")
    assert r.returncode == 2 and "already exists" in r.stderr and "rejects.jsonl" in r.stderr
    (version,) = list((ws / "datasets").iterdir())
    manifest = json.loads((version / "manifest.json").read_text())
    assert "jane@example.com" not in (version / "train.jsonl").read_text() + (version / "test.jsonl").read_text() \
        + (version / "validation.jsonl").read_text()

    train_recipe = tmp_path / "train.yaml"
    train_recipe.write_text(yaml.safe_dump({
        "recipe": "sft", "name": "colors", "model": {"name": str(tiny_model)},
        "data": {"train": str(version / "train.jsonl"), "validation": str(version / "validation.jsonl"),
                 "test": str(version / "test.jsonl"), "max_length": 64},
        "train": {"learning_rate": 1e-2, "max_steps": 12, "batch_size": 8, "eval_every": 6}}))
    r = run_cli("train", str(train_recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = list((ws / "runs").iterdir())
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["dataset_id"] == manifest["dataset_id"]
    assert lineage["dataset_sources"][0]["sha256"] == manifest["sources"][0]["sha256"]
    show = json.loads(run_cli("runs", "show", run_dir.name, "-w", str(ws)).stdout)
    assert show["catalog"]["dataset_id"] == manifest["dataset_id"]
