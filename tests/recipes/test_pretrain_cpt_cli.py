"""Pre-training from scratch and continued pre-training through the real CLI on tiny generated text:
held-out perplexity falls, and the saved model (or adapter) reloads and reproduces the trained logits."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from tests.conftest import ANIMALS, COLORS, run_cli

FOODS = ["apples", "bread", "seeds", "fish", "honey", "grass", "nuts", "rice"]
PLACES = ["in the barn", "by the river", "under the tree", "on the hill"]


def write_stories(path: Path, n_paragraphs: int, seed: int) -> Path:
    """Paragraphs from a small grammar with learnable rules (each animal has one color and one food)."""
    rng = random.Random(seed)
    paras = []
    for _ in range(n_paragraphs):
        sents = []
        for _ in range(rng.randint(2, 4)):
            i = rng.randrange(len(ANIMALS))
            sents.append(rng.choice([f"The {ANIMALS[i]} is {COLORS[i]}.", f"The {ANIMALS[i]} eats {FOODS[i]}.",
                                     f"The {COLORS[i]} {ANIMALS[i]} sleeps {rng.choice(PLACES)}."]))
        paras.append(" ".join(sents))
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


def _only_run(ws: Path) -> Path:
    (run,) = list((ws / "runs").iterdir())
    return run


def _check_probe(model, run_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None]).logits[0, -4:]
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)


def test_pretrain_from_scratch_cli(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = write_stories(tmp_path / "corpus.txt", 300, seed=0)
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": "pretrain", "name": "tiny",
        "model": {"hidden_size": 32, "layers": 2, "heads": 2, "kv_heads": 1, "context_length": 32},
        "tokenizer": {"vocab_size": 320},
        "data": {"files": [str(corpus)], "text_unit": "paragraph", "heldout_share": 0.1},
        "train": {"learning_rate": 3e-3, "max_steps": 40, "batch_size": 8, "eval_every": 10, "warmup_ratio": 0.1,
                  "seed": 3},
    }))
    ws = tmp_path / "ws"
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = _only_run(ws)
    s = json.loads((run_dir / "summary.json").read_text())

    # held-out perplexity: near the vocabulary size at random init, far lower after training
    assert s["heldout_perplexity_before"] > 150
    assert s["heldout_perplexity_after"] < 0.25 * s["heldout_perplexity_before"]
    after = s["perplexity"]["after"]
    assert after["perplexity"] == pytest.approx(math.exp(after["mean_nll"]))
    assert after["tokens"] == after["blocks"] * 31  # 32-token blocks, 31 predictions each
    # tokens trained: whole 32-token blocks, 8 per step except the last step of an epoch
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert s["steps"] == 40 and s["tokens_trained"] == [x for x in rows if "loss" in x][-1]["tokens_seen"]
    assert s["tokens_trained"] % 32 == 0 and 39 * 8 * 32 <= s["tokens_trained"] <= 40 * 8 * 32
    d = s["data"]
    assert d["train"]["blocks"] * 32 + d["train"]["dropped_tokens"] == d["train"]["tokens"]
    assert d["heldout"]["documents"] > 0 and d["train"]["documents"] + d["heldout"]["documents"] == 300
    assert "held-out perplexity" in r.stdout
    for f in ("config.yaml", "environment.json", "lineage.json", "metrics.jsonl", "rejects.jsonl"):
        assert (run_dir / f).exists(), f
    assert json.loads((run_dir / "lineage.json").read_text())["files"][0]["sha256"]

    # a plain HF folder: the trained tokenizer and model load with the Auto classes and reproduce the run
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    assert len(tok) == 320 and tok.eos_token == "</s>"
    assert tok.decode(tok("The cat eats apples.")["input_ids"]) == "The cat eats apples."
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    assert model.config.num_key_value_heads == 1 and model.config.max_position_embeddings == 32
    _check_probe(model, run_dir)

    r = run_cli("runs", "show", run_dir.name, "-w", str(ws))
    cat = json.loads(r.stdout)["catalog"]
    assert cat["kind"] == "pretrain" and cat["status"] == "completed"
    assert cat["metrics"]["heldout_perplexity_after"] == s["heldout_perplexity_after"]


def test_cpt_lora_with_replay_cli(tmp_path, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    domain = write_stories(tmp_path / "domain.txt", 240, seed=1)  # new facts (foods, places) for the model
    general = tmp_path / "general"
    general.mkdir()
    for i in range(30):  # a folder of .txt documents: the color sentences the tiny model's tokenizer knows
        rng = random.Random(i)
        (general / f"{i:02d}.txt").write_text(" ".join(
            f"The {rng.choice(['small', 'big'])} {a} is {COLORS[ANIMALS.index(a)]}."
            for a in rng.choices(ANIMALS, k=8)))
    recipe = tmp_path / "cpt.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": "cpt", "name": "tiny",
        "model": {"name": str(tiny_model)},
        "data": {"files": [str(domain)], "text_unit": "paragraph", "heldout_share": 0.1, "block_size": 48},
        "replay": {"files": [str(general)], "ratio": 0.25, "heldout_share": 0.2},
        "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"learning_rate": 2e-2, "max_steps": 30, "batch_size": 8, "eval_every": 10, "seed": 5},
    }))
    ws = tmp_path / "ws"
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = _only_run(ws)
    s = json.loads((run_dir / "summary.json").read_text())

    assert s["domain_perplexity_after"] < 0.5 * s["domain_perplexity_before"]
    # general perplexity is measured on the same held-out blocks before and after
    pb, pa = s["perplexity"]["before"]["general"], s["perplexity"]["after"]["general"]
    assert pb["tokens"] == pa["tokens"] > 0 and pb["blocks"] == pa["blocks"]
    assert s["forgetting_ratio"] == pytest.approx(pa["perplexity"] / pb["perplexity"], abs=1e-4)
    rep = s["replay"]
    assert rep["blocks"] > 0 and abs(rep["actual_share"] - 0.25) < 0.02
    assert rep["blocks"] == round(s["data"]["domain"]["train"]["blocks"] * 0.25 / 0.75)
    assert 0 < s["trainable_params"] < s["total_params"]
    assert "domain perplexity" in r.stdout and "general" in r.stdout

    # the adapter loads with plain transformers + peft and reproduces the trained model; it is not a no-op
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    _check_probe(tuned, run_dir)
    from safetensors.torch import load_file

    probe = load_file(str(run_dir / "probe.safetensors"))
    with torch.no_grad(), tuned.disable_adapter():
        assert not torch.allclose(tuned(input_ids=probe["input_ids"][None]).logits[0, -4:], probe["logits"], atol=1e-3)
    assert (run_dir / "adapter" / "tokenizer.json").exists()


def test_cpt_too_little_heldout_text_is_one_line(tmp_path, tiny_model):
    one = tmp_path / "one.txt"
    one.write_text("The cat is red.")
    recipe = tmp_path / "cpt.yaml"
    recipe.write_text(yaml.safe_dump({"recipe": "cpt", "model": {"name": str(tiny_model)},
                                      "data": {"files": [str(one)]}}))
    r = run_cli("train", str(recipe), "-w", str(tmp_path / "ws"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "held out" in r.stderr and "text_unit: paragraph" in r.stderr


def test_pretrain_cancel_then_resume(tmp_path, monkeypatch):
    """The run lifecycle under a block recipe: a CANCEL file stops the run at a step (checkpoint saved,
    status cancelled); --resume continues it from there, with the run's own tokenizer, to the end."""
    from transformers import TrainerCallback

    from tunelab.train import _run
    from tunelab.train.pretrain import PretrainConfig, run
    from tunelab.workspace import CANCEL_FILE, Workspace

    corpus = write_stories(tmp_path / "corpus.txt", 120, seed=0)
    cfg = PretrainConfig(model={"hidden_size": 32, "layers": 1, "heads": 2, "context_length": 32},
                         tokenizer={"vocab_size": 300},
                         data={"files": [str(corpus)], "text_unit": "paragraph", "heldout_share": 0.1},
                         train={"max_steps": 8, "batch_size": 4, "eval_every": 4, "seed": 1})

    class CancelAfterThree(TrainerCallback):  # what `Workspace.request_cancel` does, at a known step
        def __init__(self, r):
            self.r = r

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 3:
                (self.r.dir / CANCEL_FILE).write_text("now")

    real = _run.Run.callbacks
    monkeypatch.setattr(_run.Run, "callbacks", lambda self, *a, **k: [CancelAfterThree(self), *real(self, *a, **k)])
    ws = Workspace.resolve(tmp_path / "ws")
    s = run(cfg, ws)
    assert s["status"] == "cancelled" and s["stopped_step"] == 4
    assert ws.catalog().get_run(s["run_id"])["status"] == "cancelled"
    run_dir = ws.runs_dir / s["run_id"]
    assert (run_dir / "checkpoints" / "checkpoint-4").is_dir() and not (run_dir / "model").exists()

    monkeypatch.undo()
    done = run(None, ws, resume=s["run_id"])
    assert done["status"] == "completed" and done["steps"] == 8 and (run_dir / "model" / "config.json").is_file()
    assert ws.catalog().get_run(s["run_id"])["status"] == "completed"
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 9))  # one row per step: the rows after the checkpoint were not doubled
