"""GPU paths through the real CLI: LoRA SFT on CUDA, and QLoRA (a 4-bit NF4 base via bitsandbytes).

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


def test_qlora_sft_trains_on_a_4bit_base(tmp_path, tiny_model):
    pytest.importorskip("bitsandbytes")
    recipe = _recipe(tmp_path, tiny_model, "qlora",
                     qlora={"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"})
    run_dir, summary, losses = _train(tmp_path, recipe)
    assert summary["method"] == "qlora" and summary["device"]["device"] == "cuda"
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, "training loss did not fall"
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["adapter_bytes"] > 0

    # The adapter reloads on a freshly quantized base and reproduces the trained model's logits.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunelab.train.peft import PeftSection, QuantSection, load_kwargs

    # Reload the base exactly as the recipe quantized it: NF4 from bf16 weights (QLoRA's usual load).
    # Quantizing from the fp32 weights instead moves some weights to another 4-bit bin; measured on an
    # H100: max |logit diff| 1.30 against the probe (11.5 with the adapter off), for logits up to 10.7.
    kw = load_kwargs(PeftSection(method="qlora", qlora=QuantSection(quant_type="nf4", double_quant=True,
                                                                    compute_dtype="bf16")))
    assert isinstance(kw["quantization_config"], BitsAndBytesConfig)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, **kw)
    n4 = sum(type(m).__name__ == "Linear4bit" for m in base.modules())
    assert n4 > 0, "the base was not quantized to 4 bits"
    from peft import prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)  # as in training: fp32 norms
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad():
        logits = tuned(input_ids=probe["input_ids"][None].cuda()).logits[0, -4:].float().cpu()
        with tuned.disable_adapter():
            base_logits = tuned(input_ids=probe["input_ids"][None].cuda()).logits[0, -4:].float().cpu()
    scale = float(probe["logits"].abs().max())
    diff = float((logits - probe["logits"].float()).abs().max())
    base_diff = float((base_logits - probe["logits"].float()).abs().max())
    print(f"qlora reload: max |logit diff| {diff:.4f} (adapter off: {base_diff:.4f}) for logits up to {scale:.2f}")
    assert diff < 0.05 * max(scale, 1.0) and diff < base_diff

    # export --merge folds it into the unquantized base and records the quantization gap
    r = run_cli("export", run_dir.name, "--merge", "-w", str(tmp_path / "ws"))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((run_dir / "export" / "merged" / "export.json").read_text())
    assert info["merged"] and info["probe_max_abs_diff"] is not None and "quantization" in info["note"]
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "merged")
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
