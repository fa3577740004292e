"""`tunelab train --nproc 2` beyond SFT: for each recipe, two gloo processes with half the batch each give
the per-step losses of one process with the whole batch (relative 1e-4), and rank 0 alone writes the run's
files, its evaluations and one catalog row. docs/distributed.md lists what each test covers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, write_color_data, write_topic_data
from tests.recipes.test_pretrain_cpt_cli import write_stories

# fp32, no dropout, a constant learning rate and no length grouping: the two runs see the same batches
# (docs/distributed.md) and differ only by float rounding. Evaluation once, at the end (eval_every > steps).
TRAIN = {"learning_rate": 1e-2, "max_steps": 4, "batch_size": 8, "seed": 11, "warmup_ratio": 0.0,
         "scheduler": "constant", "precision": "fp32", "group_by_length": False, "eval_every": 100}


def _run_both(tmp_path: Path, cfg: dict) -> tuple[Path, Path, list[dict], list[dict]]:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    one, two = tmp_path / "ws1", tmp_path / "ws2"
    # the one-process reference runs in this (already warm) interpreter: a CLI start costs ~7 s of imports
    from tunelab import recipes
    from tunelab.workspace import Workspace

    c, fn = recipes.load_recipe(p)
    fn(c, Workspace.resolve(one))
    r2 = run_cli("train", str(p), "--nproc", "2", "-w", str(two), env={"OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    (run1,) = list((one / "runs").iterdir())
    (run2,) = list((two / "runs").iterdir())
    rows = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    train1, train2 = ([r for r in rows(run) if "loss" in r] for run in (run1, run2))
    print(f"\n{cfg['recipe']} 1 process: {[r['loss'] for r in train1]}\n"
          f"{cfg['recipe']} 2 processes: {[r['loss'] for r in train2]}")
    assert len(train1) == len(train2) == TRAIN["max_steps"]  # one row per step: rank 0 alone writes
    assert [r["loss"] for r in train2] == pytest.approx([r["loss"] for r in train1], rel=1e-4, abs=1e-5)
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (run1, run2))
    assert s2["status"] == "completed" and s2["world_size"] == 2 and s2["global_batch_size"] == 8
    assert s1["world_size"] == 1 and s1["global_batch_size"] == 8
    rows_ws = run_cli("runs", "list", "-w", str(two)).stdout
    assert rows_ws.count(run2.name[:20]) == 1  # one catalog row
    return run1, run2, train1, train2


@pytest.mark.slow  # torchrun with 2 processes: make test-slow (CI runs it)
def test_cpt_two_processes_match_one(tmp_path, tiny_model):
    stories = write_stories(tmp_path / "stories.txt", 120, seed=4)
    cfg = {"recipe": "cpt", "name": "ddp", "model": {"name": str(tiny_model)},
           "data": {"files": [str(stories)], "text_unit": "paragraph", "heldout_share": 0.1, "block_size": 32,
                    "max_eval_blocks": 8},
           "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": TRAIN}
    run1, run2, t1, _ = _run_both(tmp_path, cfg)
    assert t1[-1]["loss"] < t1[0]["loss"]  # it trains
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (run1, run2))
    # the perplexities (rank 0 alone, after training) are those of the same trained adapter
    assert s2["domain_perplexity_before"] == pytest.approx(s1["domain_perplexity_before"], rel=1e-6)
    assert s2["domain_perplexity_after"] == pytest.approx(s1["domain_perplexity_after"], rel=1e-3)
    assert s2["tokens_trained"] == s1["tokens_trained"]  # counted over both ranks
    assert (run2 / "adapter" / "adapter_model.safetensors").is_file() and (run2 / "probe.safetensors").is_file()


@pytest.mark.slow  # torchrun with 2 processes: make test-slow (CI runs it)
def test_classify_two_processes_match_one(tmp_path, tiny_bert):
    train = write_topic_data(tmp_path / "train.jsonl", 96, seed=1, topics=None)
    test = write_topic_data(tmp_path / "test.jsonl", 21, seed=2)  # odd: the last batch is padded across ranks
    cfg = {"recipe": "classify", "name": "ddp", "model": {"name": str(tiny_bert)},
           "data": {"train": str(train), "test": str(test), "validation_split": 0.0, "max_length": 24},
           "method": "full", "train": {**TRAIN, "learning_rate": 1e-3}}
    run1, run2, _, _ = _run_both(tmp_path, cfg)
    # test predictions: gathered from both ranks in order, each example once, written once
    p1, p2 = ([json.loads(x) for x in (run / "eval" / "test_predictions.jsonl").read_text().splitlines()]
              for run in (run1, run2))
    assert len(p2) == 21 and [r["text"] for r in p2] == [r["text"] for r in p1]
    assert [r["prediction"] for r in p2] == [r["prediction"] for r in p1]
    assert [r["confidence"] for r in p2] == pytest.approx([r["confidence"] for r in p1], abs=1e-3)
    m1, m2 = (json.loads((run / "eval" / "metrics.json").read_text()) for run in (run1, run2))
    assert m2["test"]["n"] == 21 and m2["test"]["accuracy"] == m1["test"]["accuracy"]


@pytest.mark.slow  # torchrun with 2 processes: make test-slow (CI runs it)
@pytest.mark.parametrize("mode", ["logits", "sequence"])
def test_distill_two_processes_match_one(tmp_path, tiny_model, mode):
    from tests.recipes.test_distill_cli import _small_student

    student = _small_student(tmp_path / "student", tiny_model, init=0.25)
    train = write_color_data(tmp_path / "train.jsonl", 32, seed=5)  # 4 steps of 8: one epoch
    test = write_color_data(tmp_path / "test.jsonl", 4, seed=6)
    cfg = {"recipe": "distill", "name": "ddp", "mode": mode, "teacher": {"name": str(tiny_model)},
           "student": {"name": str(student)},
           "data": {"train": str(train), "test": str(test), "validation_split": 0.0, "max_length": 48},
           "method": "full", "train": TRAIN,
           "eval": {"max_new_tokens": 4, "batch_size": 4, "latency_prompts": 1}}
    if mode == "logits":
        cfg.update(alpha=0.5, temperature=2.0)  # both terms of the loss
    else:
        cfg["sequence"] = {"max_new_tokens": 16, "batch_size": 32}
    run1, run2, t1, t2 = _run_both(tmp_path, cfg)
    # the logged distillation loss is summed over both ranks' tokens, not rank 0's half
    assert [r["distill_loss"] for r in t2] == pytest.approx([r["distill_loss"] for r in t1], rel=1e-4)
    if mode == "logits":
        assert [r["ce_loss"] for r in t2] == pytest.approx([r["ce_loss"] for r in t1], rel=1e-4)
    else:  # the teacher answered once (rank 0), and both runs trained on the same answers
        assert (run2 / "teacher_responses.jsonl").read_text() == (run1 / "teacher_responses.jsonl").read_text()
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (run1, run2))
    c1, c2 = s1["comparison"]["models"], s2["comparison"]["models"]
    assert c2["student_start"]["perplexity"] == pytest.approx(c1["student_start"]["perplexity"], rel=1e-6)
    assert c2["student"]["perplexity"] == pytest.approx(c1["student"]["perplexity"], rel=1e-3)
    assert len((run2 / "eval" / "tuned.jsonl").read_text().splitlines()) == 4  # generated once, by rank 0


_MAIN_FIRST = """
import os, sys, time
from pathlib import Path
from tunelab.train.distributed import main_first, rank
out = Path(sys.argv[1])
with main_first():
    if rank() == 0:
        time.sleep(2)  # the other rank must not enter before this block ends
        out.joinpath("rank0.done").write_text("x")
    else:
        out.joinpath("rank1.saw").write_text(str(out.joinpath("rank0.done").exists()))
"""


@pytest.mark.slow  # torchrun with 2 processes
def test_main_first_orders_the_ranks_on_cpu(tmp_path):
    """Rank 0 runs a main_first block before the others (a teacher's answers, a trained tokenizer are made once):
    on a CPU-only machine too, where accelerate's PartialState() without cpu=True is not distributed and its
    barrier does nothing."""
    import os
    import subprocess
    import sys

    script = tmp_path / "main_first.py"
    script.write_text(_MAIN_FIRST)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rank1.saw").read_text() == "True"


@pytest.mark.parametrize("recipe, why", [("rlhf", "online RL"), ("pipeline", "stages one by one")])
def test_unsupported_recipes_say_why(tmp_path, recipe, why):
    from tunelab.errors import TunelabError
    from tunelab.train import distributed

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"recipe": recipe}))
    # the reason is given before the recipe is validated any further (the file here is incomplete)
    with pytest.raises(TunelabError, match=why):
        distributed.launch(p, [], tmp_path / "ws", 2)
    assert recipe in distributed.UNSUPPORTED and recipe not in distributed.SUPPORTED


def test_classify_grad_accum_averages_like_one_batch(tmp_path, tiny_bert):
    """One process: batch 4 × grad_accum 2 takes the steps of batch 8 (the classification loss is a mean;
    before the recipe said so, the Trainer summed the two micro-batch means)."""
    from tunelab import recipes
    from tunelab.workspace import Workspace

    train = write_topic_data(tmp_path / "train.jsonl", 64, seed=3)
    losses = {}
    for bs, ga in ((8, 1), (4, 2)):
        cfg = {"recipe": "classify", "name": f"ga{ga}", "model": {"name": str(tiny_bert)},
               "data": {"train": str(train), "validation_split": 0.0, "max_length": 24},
               "method": "full", "train": {**TRAIN, "learning_rate": 1e-3, "max_steps": 3, "batch_size": bs,
                                           "grad_accum": ga}}
        p = tmp_path / f"ga{ga}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        c, fn = recipes.load_recipe(p)
        s = fn(c, Workspace.resolve(tmp_path / f"ws{ga}"))
        rows = [json.loads(x) for x in (Path(s["output"]).parent / "metrics.jsonl").read_text().splitlines()]
        losses[ga] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[1]) == 3 and losses[2] == pytest.approx(losses[1], rel=1e-4)
