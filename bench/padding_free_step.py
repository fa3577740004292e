"""One SFT forward+backward on a padded batch vs the same examples padding-free, alternating in one process.

    python bench/padding_free_step.py --model WS/models/smollm2-135m-instruct [--layers 6] [--reps 6]

Takes 8 length-grouped examples of examples/data/support/train.jsonl (as train.group_by_length
batches them), LoRA r=16 on all linear layers, bf16 autocast on CPU (as tunelab picks with AMX),
and times ``response_only_loss(...).backward()`` for the padded batch (PadCollator) and the one-row
padding-free batch (PaddingFreeCollator), alternating, after one warm-up each. ``--layers`` keeps
the first N decoder layers (a faster run; the attention/linear cost ratio per layer is the same).
Prints the median step time of each and their ratio. Decides train.padding_free: auto (device.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--reps", type=int, default=6)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab import config as cfglib
    from tunelab.train.numerics import (PadCollator, PaddingFreeCollator, ensure_chat_template,
                                         response_only_loss, tokenize_all_chats)
    from tunelab.data.loaders import load_chats
    from tunelab.train.sft import SFTConfig

    cfg = cfglib.load(SFTConfig, ROOT / "examples" / "sft_lora_support.yaml")
    tok = AutoTokenizer.from_pretrained(a.model)
    ensure_chat_template(tok)
    chats = load_chats(str(ROOT / cfg.data.train), cfg.data, [], 64)
    feats, _ = tokenize_all_chats(tok, chats, cfg.data.max_length)
    feats = sorted(feats, key=lambda f: len(f["input_ids"]))[24:32]  # one length-grouped batch of 8
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, num_hidden_layers=a.layers)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    model.train()
    batches = {"padded": PadCollator(tok.pad_token_id)(feats), "padding-free": PaddingFreeCollator()(feats)}
    dtype = torch.bfloat16

    def step(b) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype):
            loss = response_only_loss(model, b)
        loss.backward()
        return time.perf_counter() - t

    for b in batches.values():
        step(b)
    times: dict[str, list[float]] = {k: [] for k in batches}
    for r in range(a.reps):
        for k in (list(batches) if r % 2 == 0 else list(batches)[::-1]):
            times[k].append(step(batches[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.layers} layers; "
          f"example lengths {[len(f['input_ids']) for f in feats]}; padded {tuple(batches['padded']['input_ids'].shape)}, "
          f"padding-free {tuple(batches['padding-free']['input_ids'].shape)}")
    for k, v in med.items():
        print(f"{k}: median {v:.3f} s per forward+backward over {a.reps} reps")
    print(f"padding-free / padded time: {med['padding-free'] / med['padded']:.2f}x")


if __name__ == "__main__":
    main()
