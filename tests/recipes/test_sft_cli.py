"""The real CLI end to end on a tiny random-init model: loss falls, artifacts load back and reproduce logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, write_color_data


def _recipe(tmp_path: Path, model: Path, **over) -> Path:
    train = write_color_data(tmp_path / "train.jsonl", 240, seed=1)
    test = write_color_data(tmp_path / "test.jsonl", 16, seed=2)
    cfg = {
        "recipe": "sft", "name": "tiny",
        "model": {"name": str(model)},
        "data": {"train": str(train), "validation_split": 0.1, "test": str(test), "max_length": 64},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"learning_rate": 2e-2, "epochs": 3, "batch_size": 8, "eval_every": 10, "seed": 7, "warmup_ratio": 0.1},
        "eval": {"max_new_tokens": 12, "batch_size": 8},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _only_run(ws: Path) -> Path:
    runs = list((ws / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_probe(model, run_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None]).logits[0, -4:]
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)


def test_lora_sft_cli_end_to_end(tmp_path, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws = tmp_path / "ws"
    r = run_cli("train", str(_recipe(tmp_path, tiny_model)), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = _only_run(ws)

    rows = _rows(run_dir)
    train = [x["loss"] for x in rows if "loss" in x]
    val = [x["eval_loss"] for x in rows if "eval_loss" in x]
    assert len(train) >= 20 and len(val) >= 2
    assert sum(train[-5:]) / 5 < 0.6 * sum(train[:5]) / 5, "training loss did not fall"
    assert min(val) < val[0]
    assert all("tokens_per_s" in x and "learning_rate" in x for x in rows if "loss" in x)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["best_eval_loss"] == pytest.approx(min(val))
    for f in ("config.yaml", "environment.json", "lineage.json", "rejects.jsonl"):
        assert (run_dir / f).exists(), f
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["torch"] and env["cpu_count"]

    # The adapter loads with plain transformers + peft and gives the trained model's logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    _check_probe(tuned, run_dir)
    # ...which differ from the base model's: the adapter is not a no-op.
    from safetensors.torch import load_file

    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad(), tuned.disable_adapter():
        base_logits = tuned(input_ids=probe["input_ids"][None]).logits[0, -4:]
    assert not torch.allclose(base_logits, probe["logits"], atol=1e-3)
    # the tokenizer saved with the adapter carries the chat template used in training
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert tok.chat_template and "### Assistant" in tok.chat_template

    # catalog
    r = run_cli("runs", "list", "-w", str(ws))
    assert r.returncode == 0 and run_dir.name[:20] in r.stdout
    r = run_cli("runs", "show", run_dir.name, "-w", str(ws))
    assert json.loads(r.stdout)["catalog"]["status"] == "completed"

    # evaluation: base vs tuned on the same held-out set
    r = run_cli("eval", run_dir.name, "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert ev["n_examples"] == 16
    assert ev["models"]["tuned"]["rougeL"] > ev["models"]["base"]["rougeL"]
    assert ev["models"]["tuned"]["perplexity"] < ev["models"]["base"]["perplexity"]
    per = [json.loads(l) for l in (run_dir / "eval" / "tuned.jsonl").read_text().splitlines()]
    assert len(per) == 16 and {"prompt", "reference", "prediction", "rougeL"} <= set(per[0])
    html = (run_dir / "report.html").read_text()
    assert "rougeL" in html and "data:image/png;base64," in html
    children = run_cli("runs", "show", run_dir.name, "-w", str(ws))
    assert any(c.startswith("eval-") for c in json.loads(children.stdout)["children"])


def test_full_finetune_cli(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    ws = tmp_path / "ws"
    recipe = _recipe(tmp_path, tiny_model, method="full", train={"learning_rate": 1e-3, "epochs": 1, "batch_size": 8,
                                                                  "eval_every": 10, "seed": 7})
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = _only_run(ws)
    train = [x["loss"] for x in _rows(run_dir) if "loss" in x]
    assert sum(train[-5:]) / 5 < 0.8 * sum(train[:5]) / 5
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    _check_probe(model, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]


def test_bad_recipe_one_line_error(tmp_path, tiny_model):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"recipe": "sft", "model": {"name": str(tiny_model)},
                                      "data": {"train": "x.jsonl", "max_lenght": 5},
                                      "train": {"learning_rate": -1, "epochs": "many"}}))
    r = run_cli("train", str(recipe), "-w", str(tmp_path / "ws"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = r.stderr
    # all problems at once, each with its field path
    assert "data.max_lenght" in err and "did you mean 'max_length'" in err
    assert "train.learning_rate" in err and "train.epochs" in err


def test_missing_data_file_is_one_line(tmp_path, tiny_model):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"recipe": "sft", "model": {"name": str(tiny_model)},
                                      "data": {"train": str(tmp_path / "nope.jsonl")}}))
    r = run_cli("train", str(recipe), "-w", str(tmp_path / "ws"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope.jsonl" in r.stderr
