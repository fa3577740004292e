"""The memory estimate against peak memory measured in real training runs of this project's SFT recipe.

Each configuration trains a 17.6M-parameter Llama (hidden 512, 6 layers, vocabulary ~300, so weights,
optimizer states and activations dominate) for 3 steps in a fresh process. The process first runs the
same recipe on the 0.1M-parameter tiny model, so imports and the Trainer's one-time allocations are
in place; then it notes its resident memory, resets the kernel's peak mark (VmHWM, via clear_refs), trains
the 17.6M model, and reports its peak resident memory minus that baseline. glibc is told to serve every allocation over 128 KiB with its
own mapping (MALLOC_MMAP_THRESHOLD_): otherwise freed activation buffers stay in the heap and the
resident size grows step after step beyond what is alive, which is allocator behaviour on CPU, not
memory the training needs. Printed with ``pytest -s``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, write_color_data

CHILD = r'''
import ctypes, gc, json, os, sys
import torch
torch.set_num_threads(2)
from tunelab import recipes
from tunelab.workspace import Workspace

from tunelab.eval.business import peak_memory, reset_peak_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

ws = Workspace.resolve(sys.argv[3])
warm, warm_fn = recipes.load_recipe(sys.argv[1])
warm_fn(warm, ws)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = rss()
# Reset the peak resident size to the current one (Linux clear_refs "5", read back as VmHWM), so the
# peak below is the 17.6M run's alone, not the warm-up's or anything earlier in the process.
reset = reset_peak_memory()
assert "rss" in reset, "could not reset the peak resident size"
cfg, fn = recipes.load_recipe(sys.argv[2])
s = fn(cfg, ws)
peak = peak_memory("cpu", reset)["peak_bytes"]
print("RESULT " + json.dumps({"measured": peak - base, "checkpoint_every": s["checkpoint_every_n_layers"],
                              "micro_batch": s["memory"]["micro_batch"],
                              "precision": s["device"]["precision"], "params": s["total_params"],
                              "trainable": s["trainable_params"], "tokens": s["tokens_seen"]}))
'''

SEQ, BATCH, STEPS = 128, 8, 3
CONFIGS = [  # (method, precision, gradient checkpointing); bf16 LoRA on CPU takes the recipe's CPU speed-ups
    ("full", "fp32", False),
    ("lora", "fp32", False),
    ("full", "bf16", False),
    ("lora", "bf16", False),
    ("lora", "bf16", True),
    ("qlora", "bf16", False),  # bitsandbytes' CPU 4-bit kernels
]


@pytest.fixture(scope="module")
def medium(tmp_path_factory, tiny_model):
    """A 17.6M-parameter Llama with the tiny model's tokenizer, and long examples cut to exactly SEQ tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("medium")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.save_pretrained(d / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, tie_word_embeddings=True)).save_pretrained(d / "model")
    short = write_color_data(d / "short.jsonl", 200, seed=4).read_text().splitlines()
    rng = random.Random(0)
    with open(d / "long.jsonl", "w") as f:
        for _ in range(32):
            out = " ".join(json.loads(x)["output"] for x in rng.sample(short, 40))
            f.write(json.dumps({"instruction": "Tell me the colors.", "input": "", "output": out}) + "\n")
    return d


def _recipe(path: Path, model: Path, data: Path, method: str, precision: str, ckpt: bool) -> Path:
    path.write_text(yaml.safe_dump({
        "recipe": "sft", "model": {"name": str(model)}, "data": {"train": str(data), "max_length": SEQ},
        "method": method, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        # the whole batch at once, as set: sized so activations dominate (the CPU bf16 default would split it)
        "train": {"max_steps": STEPS, "batch_size": BATCH, "micro_batch_size": BATCH, "eval_every": 100,
                  "precision": precision,
                  "gradient_checkpointing": ckpt, "group_by_length": False}}))
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
@pytest.mark.slow  # ~100 s of real training runs; make test-slow (CI runs it)
def test_memory_estimate_within_25_percent_of_measured(medium, tiny_model, tmp_path):
    from tunelab.advise.estimate import EstimateConfig, estimate

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    # A clean environment: in the full suite the measured child came out 2.5x larger than alone (1153 vs
    # 462 MiB), so something earlier in the session leaks into os.environ; pass only what the child needs.
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "HF_HUB_OFFLINE", "HF_HOME", "TUNELAB_SHARED")
    env = {**{k: os.environ[k] for k in keep if k in os.environ}, "MALLOC_MMAP_THRESHOLD_": "131072",
           "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    configs = [c for c in CONFIGS if c[0] != "qlora" or importlib.util.find_spec("bitsandbytes")]
    for method, precision, ckpt in configs:
        big = _recipe(tmp_path / f"{method}-{precision}.yaml", medium / "model", medium / "long.jsonl", method,
                      precision, ckpt)
        warm = _recipe(tmp_path / f"warm-{method}-{precision}.yaml", tiny_model, medium / "long.jsonl", method,
                       precision, ckpt)
        p = subprocess.run([sys.executable, str(child), str(warm), str(big), str(tmp_path / "ws")], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        got = json.loads(p.stdout.split("RESULT ", 1)[1])
        assert got["tokens"] == STEPS * BATCH * SEQ  # every sequence is exactly SEQ tokens
        # all tokens but the prompt's ~10 carry a loss; the examples computed at once are the run's micro-batch
        est = estimate(EstimateConfig(model=str(medium / "model"), method=method, precision=precision,
                                      batch_size=got["micro_batch"], seq_len=SEQ, checkpoint_every=got["checkpoint_every"],
                                      device="cpu",
                                      lora_r=8, lora_dropout=0.0, loss_share=(SEQ - 10) / SEQ))
        adapters = got["trainable"] if method != "full" else 0  # the run counts adapter weights in its total
        assert est["memory"]["params"] + adapters == got["params"]
        assert est["memory"]["trainable_params"] == got["trainable"]
        rows.append((method, precision, got["checkpoint_every"], est["memory"]["total"], got["measured"]))
    print("\nmethod precision ckpt_every estimate_MB measured_MB estimate/measured")
    for method, precision, ck, est_b, meas in rows:
        print(f"{method:6s} {precision:9s} {ck:10d} {est_b / 2**20:11.0f} {meas / 2**20:11.0f} {est_b / meas:17.2f}")
    for method, precision, ck, est_b, meas in rows:
        assert abs(est_b / meas - 1) <= 0.25, (method, precision, est_b, meas)
