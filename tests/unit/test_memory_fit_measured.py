"""A long-sequence SFT run stays under a small memory budget: measured peak resident memory of a fresh process
against the budget and against the plan's prediction (tunelab/train/memory.py).

The child trains a 3.7M-parameter Llama (hidden 256, 4 layers, the tiny tokenizer) on examples cut to 512 tokens,
batch 8, so activations (~0.45 GB at batch 8) dominate the weights. Its budget is set from the process's own
resident size after the imports and the training overhead plus a third of what the model and the whole batch would
add, so the plan must split the batch.
The peak is the whole process's (VmHWM): the budget is meant for the process, runtime included.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ADJECTIVES, ANIMALS, COLORS, ROOT

CHILD = r'''
import json, sys
import torch
from tunelab import recipes
import peft, transformers  # noqa: F401,E401 (what a run has imported when it reads its runtime)
from transformers import Trainer  # noqa: F401
from tunelab.train import memory, sft  # noqa: F401
from tunelab.train.memory import Job, model_shape, predicted_gb, resident_gb
from tunelab.workspace import Workspace

cfg, fn = recipes.load_recipe(sys.argv[1])
runtime = resident_gb()
job = Job(method="lora", seq_len=512, loss_share=0.9, precision="fp32", lora_r=8, lora_dropout=0.05, device="cpu")
whole = predicted_gb(job, model_shape(cfg.model.name), "cpu", runtime)
fixed = runtime + memory.CPU_TRAINING_OVERHEAD_GB
budget = fixed + (whole - fixed) / 3
cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"memory_budget_gb": budget})})
s = fn(cfg, Workspace.resolve(sys.argv[2]))
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print("RESULT " + json.dumps({"runtime": runtime, "whole": whole, "budget": budget, "memory": s["memory"],
                              "peak_gb": peak / 1024**3, "tokens": s["tokens_seen"]}))
'''


@pytest.fixture(scope="module")
def medium(tmp_path_factory, tiny_model):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("medium-fit")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.save_pretrained(d / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, tie_word_embeddings=True)).save_pretrained(d / "model")
    rng = random.Random(3)
    with open(d / "long.jsonl", "w") as f:
        for _ in range(16):
            out = " ".join(f"The {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} is {rng.choice(COLORS)}."
                           for _ in range(80))
            f.write(json.dumps({"instruction": "Tell me the colors.", "input": "", "output": out}) + "\n")
    return d


# ~3 minutes on 2 cores (a fresh process, a 512-token batch of 8): slow; docs/methods/sft.md has the real-model runs
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read the peak")
def test_long_sequences_stay_under_a_small_budget(medium, tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": "sft", "model": {"name": str(medium / "model")},
        "data": {"train": str(medium / "long.jsonl"), "max_length": 512}, "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "train": {"max_steps": 1, "batch_size": 8, "eval_every": 100, "precision": "fp32"}}))
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "HF_HUB_OFFLINE", "HF_HOME")
    env = {**{k: os.environ[k] for k in keep if k in os.environ}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(child), str(recipe), str(tmp_path / "ws")], env=env, capture_output=True,
                       text=True, timeout=1500, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.split("RESULT ", 1)[1])
    m = got["memory"]
    print(f"\nruntime {got['runtime']:.2f} GB, whole batch predicted {got['whole']:.2f} GB, budget {got['budget']:.2f} "
          f"GB; chose micro-batch {m['micro_batch']} x {m['grad_accum']}, checkpointing {m['checkpoint_every']}, "
          f"predicted {m['estimate_gb']:.2f} GB; measured peak {got['peak_gb']:.2f} GB "
          f"(measured/predicted {got['peak_gb'] / m['estimate_gb']:.2f})")
    assert got["tokens"] == 8 * 512  # every example is cut to 512 tokens: the long-sequence case
    assert m["chosen"] and m["fits"] and m["micro_batch"] * m["grad_accum"] == 8
    assert got["peak_gb"] <= got["budget"]
    # the prediction within a stated factor of the measured peak: 0.8x-1.25x
    assert 0.8 <= got["peak_gb"] / m["estimate_gb"] <= 1.25
