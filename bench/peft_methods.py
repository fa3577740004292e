"""Every SFT method on the same model, data and steps: loss reached, speed and size, against full fine-tuning.

    python bench/peft_methods.py --model ../shared/models/stories260K \
        --data ../shared/data/gsm8k-train-alpaca/gsm_8k_train.json [--steps 60] [--batch-size 16] [--methods lora,ia3]

Runs ``tunelab.train.sft.run`` (the recipe itself) once per method in a temporary workspace,
with each method's usual learning rate (printed; prompt-family methods need ~10-100x LoRA's),
and prints one row per method: trainable parameters, adapter bytes, validation loss of the best
checkpoint, tokens/s and the ratio of tokens/s to full fine-tuning measured in the same run.
Run it alone: a second job on 2 cores slows both. QLoRA needs a CUDA GPU and is skipped on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LR = {"full": 1e-3, "lora": 3e-3, "dora": 3e-3, "rslora": 3e-3, "qlora": 3e-3,
      "prompt_tuning": 1e-1, "prefix_tuning": 3e-2, "p_tuning": 1e-2, "ia3": 3e-2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="alpaca-style instruction file")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--limit", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--methods", default="full,lora,dora,rslora,prompt_tuning,prefix_tuning,p_tuning,ia3")
    a = ap.parse_args()

    import contextlib
    import io

    import torch

    from tunelab import config as cfglib
    from tunelab.train.sft import SFTConfig, run
    from tunelab.workspace import Workspace

    methods = a.methods.split(",")
    if "qlora" in methods and not torch.cuda.is_available():
        methods.remove("qlora")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; model {Path(a.model).name}; "
          f"{a.steps} steps of batch {a.batch_size} x <=256 tokens; first {a.limit} records, 5% validation")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            raw = {"recipe": "sft", "name": m, "model": {"name": a.model},
                   "data": {"train": a.data, "validation_split": 0.05, "max_length": 256, "limit": a.limit},
                   "method": m, "train": {"learning_rate": LR[m], "max_steps": a.steps, "batch_size": a.batch_size,
                                          "eval_every": max(a.steps // 3, 1), "early_stopping_patience": None,
                                          "seed": 0}}
            cfg = cfglib.validate(SFTConfig, raw)
            with contextlib.redirect_stdout(io.StringIO()):
                s = run(cfg, Workspace.resolve(Path(tmp) / m))
            run_dir = Path(s["output"]).parent
            losses = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
            first = next(r["loss"] for r in losses if "loss" in r)
            rows.append((m, s, first))
    full_tps = next((s["tokens_per_s"] for m, s, _ in rows if m == "full"), None)
    print("| method | lr | trainable params | saved weights | first train loss | best validation loss "
          "| tokens/s | speed vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, s, first in rows:
        ratio = f"{s['tokens_per_s'] / full_tps:.2f}x" if full_tps else "-"
        print(f"| {m} | {LR[m]:g} | {s['trainable_params']:,} ({s['trainable_percent']:.3g}%) | "
              f"{s['adapter_bytes']:,} B | {first:.3f} | {s['best_eval_loss']:.3f} | {s['tokens_per_s']:,.0f} "
              f"| {ratio} |")


if __name__ == "__main__":
    main()
