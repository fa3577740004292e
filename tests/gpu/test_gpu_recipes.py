"""GPU paths through the real CLI: LoRA SFT on CUDA (QLoRA, on CUDA or CPU: tests/recipes/test_qlora_sft.py).

Skipped on a machine without CUDA (every CI run of this project so far); run them where a GPU is:
    pytest tests/gpu -v
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, write_color_data

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _recipe(tmp_path: Path, model: Path, method: str, **extra) -> Path:
    train = write_color_data(tmp_path / "train.jsonl", 240, seed=1)
    test = write_color_data(tmp_path / "test.jsonl", 16, seed=2)
    cfg = {
        "recipe": "sft", "name": f"gpu-{method}",
        "model": {"name": str(model)},
        "data": {"train": str(train), "validation_split": 0.1, "test": str(test), "max_length": 64},
        "method": method,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"learning_rate": 2e-2, "epochs": 3, "batch_size": 8, "eval_every": 10, "seed": 7,
                  "warmup_ratio": 0.1},
        "eval": {"max_new_tokens": 12, "batch_size": 8},
        **extra,
    }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train(tmp_path: Path, recipe: Path) -> tuple[Path, dict, list[float]]:
    ws = tmp_path / "ws"
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout[-2000:])
    (run_dir,) = list((ws / "runs").iterdir())
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    return run_dir, json.loads((run_dir / "summary.json").read_text()), losses


def test_lora_sft_runs_on_cuda(tmp_path, tiny_model):
    run_dir, summary, losses = _train(tmp_path, _recipe(tmp_path, tiny_model, "lora"))
    assert summary["device"]["device"] == "cuda"
    assert summary["device"]["precision"] in ("bf16", "fp16")
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, "training loss did not fall"
    # the adapter reloads on the CPU and reproduces the trained model's logits (mixed precision: loose)
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run_dir / "adapter").eval()
    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad():
        logits = tuned(input_ids=probe["input_ids"][None]).logits[0, -4:]
    torch.testing.assert_close(logits, probe["logits"].cpu(), atol=1e-3, rtol=1e-3)
