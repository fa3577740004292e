"""Non-LoRA PEFT through the real CLI, QLoRA's clear error, gradient checkpointing, and merge/export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, write_color_data
from tests.recipes.test_sft_cli import _check_probe, _only_run, _recipe, _rows


@pytest.mark.slow  # ~23 s: prompt tuning, export and reload; make test-slow (CI runs it)
def test_prompt_tuning_cli_end_to_end(tmp_path, tiny_model):
    """prompt_tuning trains through `tunelab train`, reloads, evaluates, exports, and refuses to merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.eval.run import evaluate_run
    from tunelab.train.export import export_run
    from tunelab.workspace import Workspace

    ws = tmp_path / "ws"
    # prompt tuning wants a large learning rate (Lester et al. 2021 used 0.3)
    recipe = _recipe(tmp_path, tiny_model, method="prompt_tuning", prompt={"num_virtual_tokens": 16},
                     train={"learning_rate": 3e-1, "epochs": 2, "eval_every": 14})
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = _only_run(ws)
    train = [x["loss"] for x in _rows(run_dir) if "loss" in x]
    assert sum(train[-5:]) / 5 < 0.8 * sum(train[:5]) / 5, train

    s = json.loads((run_dir / "summary.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert s["method"] == "prompt_tuning" and s["trainable_params"] == 16 * base.config.hidden_size
    assert 4 * s["trainable_params"] < s["adapter_bytes"] < 4 * s["trainable_params"] + 16384
    assert "adapter_bytes" in r.stdout

    # the saved adapter reloads with plain peft and reproduces the trained model's logits
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    _check_probe(tuned, run_dir)

    # eval loads it back (virtual tokens prepended: the perplexity path must stay aligned) and generates
    ev = evaluate_run(run_dir.name, Workspace.resolve(ws), limit=8)
    assert ev["models"]["tuned"]["perplexity"] < ev["models"]["base"]["perplexity"]

    r = run_cli("export", run_dir.name, "--merge", "-w", str(ws))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot be merged" in r.stderr
    out = Path(export_run(run_dir.name, Workspace.resolve(ws))["path"])
    assert out == run_dir / "export" / "adapter"
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    _check_probe(again, run_dir)
    assert json.loads((out / "export.json").read_text())["kind"] == "adapter"


def test_dora_merge_export_gives_base_plus_adapter_logits(tmp_path, tiny_model):
    """`tunelab export RUN --merge`: one plain HF model whose logits equal base + adapter (fp32, ~1e-5)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab import config as cfglib
    from tunelab.train.sft import SFTConfig, run
    from tunelab.workspace import Workspace

    ws = tmp_path / "ws"
    recipe = _recipe(tmp_path, tiny_model, method="dora", data={"validation_split": 0.0, "limit": 32},
                     train={"max_steps": 4, "eval_every": 4, "early_stopping_patience": None})
    run(cfglib.load(SFTConfig, recipe), Workspace.resolve(ws))
    run_dir = _only_run(ws)
    r = run_cli("export", run_dir.name, "--merge", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    out = run_dir / "export" / "merged"
    assert str(out) in r.stdout
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    info = json.loads((out / "export.json").read_text())
    assert info["merged"] and 0 <= info["probe_max_abs_diff"] < 1e-3
    # exported weights and the probe are readable by the group, as the umask (022 here) asks (not 0600)
    import os

    mask = os.umask(0)
    os.umask(mask)
    for f in (out / "model.safetensors", run_dir / "probe.safetensors", run_dir / "adapter" / "adapter_model.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, (f, oct(f.stat().st_mode))

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run_dir / "adapter").eval()
    ids = torch.randint(4, merged.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, ref(input_ids=ids).logits
        with ref.disable_adapter():
            base = ref(input_ids=ids).logits
    # (W + BA)x and Wx + B(Ax) round differently: fp32 agreement to 1e-5 of the largest logit
    torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)
    assert not torch.allclose(a, base, atol=1e-3), "the merge changed nothing: the adapter was a no-op"

    runs = Workspace.resolve(ws).catalog().list_runs(kind="export")
    assert len(runs) == 1 and runs[0]["parent_id"] == run_dir.name and runs[0]["dir"] == str(out)


def test_qlora_without_bitsandbytes_fails_before_loading_anything(tmp_path):
    import subprocess
    import sys

    train = write_color_data(tmp_path / "train.jsonl", 10)
    recipe = tmp_path / "q.yaml"
    # the model does not exist: the error must be about QLoRA's needs, found before any model is read
    recipe.write_text(yaml.safe_dump({"recipe": "sft", "model": {"name": str(tmp_path / "no-model")},
                                      "data": {"train": str(train)}, "method": "qlora",
                                      "qlora": {"quant_type": "nf4"}}))
    ws = tmp_path / "ws"
    # the CLI in a process where bitsandbytes cannot be found (sys.modules entry None: find_spec gives None)
    code = "import sys; sys.modules['bitsandbytes'] = None; from tunelab.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "train", str(recipe), "-w", str(ws)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "qlora needs the bitsandbytes package" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_takes_effect_and_keeps_losses(method, tmp_path, tiny_model):
    """train.gradient_checkpointing really turns checkpointing on (read off the model) and changes no loss."""
    from tunelab import config as cfglib
    from tunelab.train.sft import SFTConfig, run
    from tunelab.workspace import Workspace

    recipe = _recipe(tmp_path, tiny_model, method=method, data={"validation_split": 0.0, "limit": 48},
                     train={"max_steps": 4, "eval_every": 4, "early_stopping_patience": None,
                            "learning_rate": 1e-3 if method == "full" else 2e-2,
                            # fp32 on every machine: under bf16 (the auto choice on AMX and fast AVX512-bf16 CPUs)
                            # the two runs take different speed-ups (the shared prompt prefix is off with
                            # checkpointing) whose bf16 rounding differs beyond this bound
                            "precision": "fp32"})
    out = {}
    for gc in (False, True):
        cfg = cfglib.load(SFTConfig, recipe, [f"train.gradient_checkpointing={gc}"])
        s = run(cfg, Workspace.resolve(tmp_path / f"ws-{gc}"))
        out[gc] = (s, [x["loss"] for x in _rows(Path(s["output"]).parent) if "loss" in x])
    assert out[True][0]["gradient_checkpointing"] is True
    assert out[False][0]["gradient_checkpointing"] is False
    assert len(out[True][1]) == 4
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-5, abs=1e-6)
    if method == "full":  # reuse the run: a full fine-tune exports as is and has nothing to merge
        from tunelab.errors import TunelabError
        from tunelab.train.export import export_run

        ws, run_id = Workspace.resolve(tmp_path / "ws-True"), out[True][0]["run_id"]
        with pytest.raises(TunelabError, match="no adapter to merge"):
            export_run(run_id, ws, merge=True)
        exported = Path(export_run(run_id, ws)["path"])
        assert (exported / "model.safetensors").is_file() and (exported / "export.json").is_file()
