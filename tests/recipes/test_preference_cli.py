"""Reward model, DPO/IPO and RLHF through the real CLI on a tiny random-init model.

The preference is learnable: every animal has one color, the chosen answer names it and the
rejected one names another color. The runs chain as a user would: a reward model, a DPO run
judged by it, then RLHF against it starting from the DPO run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from tests.conftest import ADJECTIVES, ANIMALS, COLORS, run_cli


def write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rule = {a: COLORS[i] for i, a in enumerate(ANIMALS)}
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, j = rng.choice(ANIMALS), rng.choice(ADJECTIVES)
            wrong = rng.choice([c for c in COLORS if c != rule[a]])
            f.write(json.dumps({"prompt": f"What color is the {j} {a}?\nAnswer:",
                                "chosen": f" The {j} {a} is {rule[a]}.",
                                "rejected": f" The {j} {a} is {wrong}."}) + "\n")
    return path


def _recipe(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(recipe: Path, ws: Path) -> Path:
    before = set((ws / "runs").iterdir()) if (ws / "runs").is_dir() else set()
    r = run_cli("train", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    new = set((ws / "runs").iterdir()) - before
    assert len(new) == 1
    return new.pop()


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pref(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("pref")
    return {"dir": d, "ws": d / "ws", "train": write_pairs(d / "train.jsonl", 320, 1),
            "test": write_pairs(d / "test.jsonl", 64, 2), "model": tiny_model}


@pytest.fixture(scope="module")
def reward_run(pref) -> Path:
    cfg = {"recipe": "reward", "name": "tiny", "model": {"name": str(pref["model"])},
           "data": {"train": str(pref["train"]), "test": str(pref["test"]), "validation_split": 0.1,
                    "max_length": 64},
           "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"learning_rate": 3e-3, "epochs": 2, "batch_size": 16, "eval_every": 10, "seed": 7,
                     "warmup_ratio": 0.1}}
    return _train(_recipe(pref["dir"] / "reward.yaml", cfg), pref["ws"])


def test_reward_model_learns_the_preference(reward_run, pref):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    s = _summary(reward_run)
    assert s["status"] == "completed" and s["heldout"]["set"] == "test" and s["heldout"]["after"]["pairs"] == 64
    # held-out pairwise accuracy: chance before, clearly above it after
    assert 0.3 <= s["pairwise_accuracy_before"] <= 0.7
    assert s["pairwise_accuracy_after"] >= 0.8
    assert s["mean_margin_after"] > s["mean_margin_before"] + 1.0
    lo, hi = s["pairwise_accuracy_ci95"]
    assert lo <= s["pairwise_accuracy_after"] <= hi and lo > 0.6  # the interval is printed and stored
    gain = s["heldout"]["accuracy_gain"]  # paired over the untrained head, on the same held-out pairs
    assert gain["n"] == 64 and gain["ci_low"] > 0 and "wins" not in s["heldout"]["after"]
    rows = _rows(reward_run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert any("eval_accuracy" in r for r in rows) and any("accuracy" in r for r in rows if "loss" in r)

    # the adapter (with its trained score head) loads with plain transformers + peft and ranks a held-out pair
    lineage = json.loads((reward_run / "lineage.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(lineage["base_model_path"], num_labels=1)
    model = PeftModel.from_pretrained(base, reward_run / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(reward_run / "adapter")
    model.config.pad_token_id = tok.pad_token_id
    pairs = [json.loads(line) for line in pref["test"].read_text().splitlines()][:16]
    wins = 0
    with torch.no_grad():
        for p in pairs:
            c = model(**tok(p["prompt"] + p["chosen"], return_tensors="pt")).logits[0, 0]
            r = model(**tok(p["prompt"] + p["rejected"], return_tensors="pt")).logits[0, 0]
            wins += int(c > r)
    assert wins >= 12


@pytest.fixture(scope="module")
def dpo_run(pref, reward_run) -> Path:
    cfg = {"recipe": "dpo", "name": "tiny", "model": {"name": str(pref["model"])},
           "data": {"train": str(pref["train"]), "test": str(pref["test"]), "validation_split": 0.1,
                    "max_length": 64},
           "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "beta": 0.1, "loss": "sigmoid",
           "train": {"learning_rate": 5e-3, "epochs": 1, "batch_size": 16, "eval_every": 10, "seed": 7,
                     "warmup_ratio": 0.1},
           "eval": {"reward_model": reward_run.name, "prompts": 8, "samples": 1, "max_new_tokens": 8}}
    return _train(_recipe(pref["dir"] / "dpo.yaml", cfg), pref["ws"])


def test_dpo_raises_heldout_preference(dpo_run, reward_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = _summary(dpo_run)
    before, after = s["heldout"]["before"], s["heldout"]["after"]
    assert after["pairs"] == 64
    # the policy now prefers the chosen answers it did not prefer before
    assert after["logp_accuracy"] >= before["logp_accuracy"] + 0.2 and after["logp_accuracy"] >= 0.75
    # implicit reward: chosen log-ratio up relative to rejected, on held-out pairs
    assert after["implicit_reward_accuracy"] >= 0.8 and after["implicit_reward_margin"] > 0.2
    # over the start (the reference: a tie on every pair), with intervals that exclude no change
    assert after["implicit_reward_accuracy_gain_ci95"][0] > 0 and after["implicit_reward_margin_ci95"][0] > 0
    assert after["chosen_logratio"] > after["rejected_logratio"]
    rows = _rows(dpo_run)
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3
    # judged by the reward model: the fields are there and sane
    j = s["judge"]
    assert j["reward_run_id"] == reward_run.name and 0.0 <= j["win_rate"] <= 1.0
    assert isinstance(j["kl_to_reference"], float) and (dpo_run / "eval" / "generations.jsonl").exists()
    # the adapter loads back
    base = AutoModelForCausalLM.from_pretrained(json.loads((dpo_run / "lineage.json").read_text())["base_model_path"])
    PeftModel.from_pretrained(base, dpo_run / "adapter")


def test_ipo_loss_runs(pref, tmp_path):
    cfg = {"recipe": "dpo", "name": "ipo", "model": {"name": str(pref["model"])},
           "data": {"train": str(pref["train"]), "test": str(pref["test"]), "validation_split": 0.0,
                    "max_length": 64, "limit": 96, "test_limit": 32},
           "loss": "ipo", "beta": 0.5, "lora": {"dropout": 0.0},
           "train": {"learning_rate": 5e-3, "max_steps": 8, "batch_size": 12, "seed": 7, "warmup_ratio": 0.0}}
    run = _train(_recipe(tmp_path / "ipo.yaml", cfg), tmp_path / "ws")
    s = _summary(run)
    assert s["loss"] == "ipo" and s["steps"] == 8
    assert s["heldout"]["after"]["chosen_logratio"] > s["heldout"]["after"]["rejected_logratio"]


def test_rlhf_grpo_raises_reward(pref, tmp_path):
    """A programmatic reward with signal even on a random model: share of lowercase letters and spaces."""
    (tmp_path / "rewards.py").write_text(
        "def readable(prompts, completions, **kw):\n"
        "    return [sum((ch.isascii() and ch.islower()) or ch == ' ' for ch in c) / max(len(c), 1)"
        " for c in completions]\n")
    cfg = {"recipe": "rlhf", "name": "fn", "model": {"name": str(pref["model"])},
           "data": {"train": str(pref["train"]), "test": str(pref["test"]), "max_length": 48},
           "reward_function": f"{tmp_path / 'rewards.py'}:readable", "algorithm": "grpo", "beta": 0.04,
           "num_generations": 8, "max_new_tokens": 8, "lora": {"dropout": 0.0},
           "train": {"learning_rate": 2e-2, "max_steps": 20, "batch_size": 16, "seed": 7, "warmup_ratio": 0.0,
                     "scheduler": "constant"},
           "eval": {"prompts": 16, "samples": 2, "max_new_tokens": 8}}
    run = _train(_recipe(tmp_path / "rlhf.yaml", cfg), tmp_path / "ws")
    s = _summary(run)
    # training reward rises, and on held-out prompts the policy beats where it started
    assert s["train_reward_last"] > s["train_reward_first"] + 0.1
    assert s["reward_after"] > s["reward_before"] + 0.1 and s["win_rate"] > 0.6
    assert s["kl_to_reference"] > 0  # it moved away from the start, and the KL says so
    rows = _rows(run)
    assert all("kl" in r and "reward" in r for r in rows if "loss" in r)


def test_rlhf_with_reward_model_from_a_run(pref, reward_run, dpo_run):
    """The reward-model path end to end: start from the DPO run (its adapter keeps training), reward = the
    reward run; artifacts and the reported fields, lineage and catalog parent."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = {"recipe": "rlhf", "name": "rm", "model": {"name": dpo_run.name},
           "data": {"train": str(pref["train"]), "test": str(pref["test"]), "max_length": 48, "limit": 64},
           "reward_model": reward_run.name, "algorithm": "rloo", "beta": 0.05, "num_generations": 4,
           "max_new_tokens": 8,
           "train": {"learning_rate": 1e-3, "max_steps": 4, "batch_size": 8, "seed": 7, "warmup_ratio": 0.0},
           "eval": {"prompts": 8, "samples": 1, "max_new_tokens": 8}}
    run = _train(_recipe(pref["dir"] / "rlhf_rm.yaml", cfg), pref["ws"])
    s = _summary(run)
    assert s["parent_id"] == dpo_run.name and s["reward"]["reward_run_id"] == reward_run.name
    for k in ("reward_before", "reward_after", "win_rate", "kl_to_reference"):
        assert isinstance(s[k], float), k
    assert 0.0 <= s["win_rate"] <= 1.0
    gens = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 8 and {"prompt", "start", "policy", "reward_start", "reward_policy"} <= set(gens[0])
    r = run_cli("runs", "show", run.name, "-w", str(pref["ws"]))
    assert json.loads(r.stdout)["catalog"]["parent_id"] == dpo_run.name
    # only the trained adapter is saved (not TRL's frozen reference copy), and it loads on the base
    assert not (run / "adapter" / "ref").exists()
    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "lineage.json").read_text())["base_model_path"])
    PeftModel.from_pretrained(base, run / "adapter")


def test_rlhf_config_errors_are_one_line(pref, tmp_path):
    cfg = {"recipe": "rlhf", "model": {"name": str(pref["model"])}, "data": {"train": str(pref["train"])},
           "num_generations": 3, "train": {"batch_size": 8}}
    r = run_cli("train", str(_recipe(tmp_path / "bad.yaml", cfg)), "-w", str(tmp_path / "ws"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "exactly one of reward_model" in r.stderr and "multiple of num_generations" in r.stderr


@pytest.mark.parametrize("recipe, extra", [("reward", {}), ("dpo", {}),
                                           ("rlhf", {"reward_function": "m:f", "num_generations": 2})])
def test_a_bad_model_name_leaves_no_run_folder(pref, tmp_path, recipe, extra):
    """The model is resolved before the run folder and catalog row are made: a typo leaves nothing behind."""
    from tunelab import recipes
    from tunelab.errors import TunelabError
    from tunelab.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    cfg, run = recipes.load_recipe(_recipe(tmp_path / f"{recipe}.yaml", {
        "recipe": recipe, "model": {"name": "no-such-model"}, "data": {"train": str(pref["train"])}, **extra}))
    with pytest.raises(TunelabError, match="unknown model 'no-such-model'"):
        run(cfg, ws)
    assert not ws.runs_dir.exists() or not list(ws.runs_dir.iterdir())
    assert ws.catalog().list_runs() == []


def test_rlhf_with_a_wrong_reward_id_leaves_no_run_folder(pref, tmp_path):
    from tunelab import recipes
    from tunelab.errors import TunelabError
    from tunelab.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    cfg, run = recipes.load_recipe(_recipe(tmp_path / "rlhf.yaml", {
        "recipe": "rlhf", "model": {"name": str(pref["model"])}, "data": {"train": str(pref["train"])},
        "reward_model": "reward-nope", "num_generations": 2}))
    with pytest.raises(TunelabError, match="'reward-nope' is neither a run id"):
        run(cfg, ws)
    assert not ws.runs_dir.exists() or not list(ws.runs_dir.iterdir())


def test_rlhf_cancel_then_resume(pref, tmp_path):
    """The run lifecycle under a TRL trainer: a CANCEL file (written here by the reward function at the first
    step) stops GRPO at a step boundary with a checkpoint and the run ends 'cancelled'; --resume continues
    from that checkpoint to the end, and metrics.jsonl holds each step once."""
    from tunelab import recipes
    from tunelab.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    (tmp_path / "cancel_once.py").write_text(
        "from pathlib import Path\n"
        f"RUNS = Path({str(ws.runs_dir)!r})\n"
        "def reward(prompts, completions, **kw):\n"
        "    for d in RUNS.iterdir():\n"
        "        if not (d / 'cancelled-once').exists():\n"
        "            (d / 'cancelled-once').write_text('1')\n"
        "            (d / 'CANCEL').write_text('now')\n"
        "    return [float(len(c)) for c in completions]\n")
    cfg, run = recipes.load_recipe(_recipe(tmp_path / "rlhf.yaml", {
        "recipe": "rlhf", "name": "cancel", "model": {"name": str(pref["model"])},
        "data": {"train": str(pref["train"]), "max_length": 48, "limit": 32, "validation_split": 0.0},
        "reward_function": f"{tmp_path / 'cancel_once.py'}:reward", "num_generations": 2, "max_new_tokens": 4,
        "lora": {"dropout": 0.0}, "train": {"max_steps": 3, "batch_size": 4, "seed": 7, "eval_every": 50}}))
    first = run(cfg, ws)
    assert first["status"] == "cancelled" and first["stopped_step"] == 1
    run_dir = ws.run_dir(first["run_id"])
    assert ws.catalog().get_run(run_dir.name)["status"] == "cancelled"
    assert (run_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
    s = run(None, ws, resume=run_dir.name)
    assert s["status"] == "completed" and s["steps"] == 3
    assert ws.catalog().get_run(run_dir.name)["status"] == "completed"
    assert [r["step"] for r in _rows(run_dir) if "loss" in r] == [1, 2, 3]
