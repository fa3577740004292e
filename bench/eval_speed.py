"""Evaluation generation: the shared continuous-batching engine vs the previous padded ``generate`` loop, same run.

    python bench/eval_speed.py [--workspace WS] [--repeats 3] [--limit 100] [--batch-size 20] [--max-new-tokens 96] [--no-adapter]

What ``tunelab eval`` generates on the demo: the 100 held-out support tickets of ``tunelab demo``
(tunelab/demo_data.py, its test split, with the demo recipe's system prompt and alpaca format), greedy,
``eval.max_new_tokens`` 96 and ``eval.batch_size`` 20 of the demo recipe, on the packaged
SmolLM2-135M-Instruct carrying a LoRA adapter shaped as the demo trains it (r=16 on all linear layers, B
randomized so it changes the answers), as the tuned model is scored.

A: tunelab.models.generation.generate_padded (transformers' generate on left-padded batches of prompts
sorted by length: the loop evaluation used before); B: tunelab.models.generation.generate (the engine).
Each repeat runs both on all the tickets, alternating which goes first (A B, B A, A B, ...), so load on the
machine hits both alike. Prints generated tokens/s of each repeat (per wall second, and per CPU second of this
process, which other work on a shared machine disturbs less), the medians and their ratios (B / A), whether
every answer was identical, and the machine.

Also prints the ceiling of any padded-vs-unpadded gain on this workload: the row-steps the padded loop decodes
(each batch of 20 prompts, sorted by length, runs until its longest answer ends) over the tokens actually
generated. Where decoding is compute-bound (a CPU at batch 20), a step costs about the same per row, so dropping
finished rows and padding can save at most that share.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch

    from tunelab.environment import cpu_flags, cpu_model

    amx = "amx_bf16" in cpu_flags()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_model() or platform.machine()}, {os.cpu_count()} cores, AMX-bf16 {'yes' if amx else 'no'}{gpu}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=100, help="held-out tickets (the demo has 100)")
    ap.add_argument("--batch-size", type=int, default=20, help="eval.batch_size (the demo recipe's: 20)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="eval.max_new_tokens (the demo recipe's: 96)")
    ap.add_argument("--no-adapter", action="store_true", help="the base model alone, no LoRA adapter")
    ap.add_argument("--workspace", help="a workspace whose model cache to use (default: a new temporary one, which "
                                        "builds the packaged model again)")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.loaders import load_chats
    from tunelab.demo import demo_config
    from tunelab.models import pull
    from tunelab.models.generation import generate, generate_padded
    from tunelab.train.numerics import prompt_ids
    from tunelab.workspace import Workspace

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(a.workspace or tmp))
        cfg = demo_config(ws)
        chats = load_chats(cfg.data.test, cfg.data, [], a.limit)
        path = pull("smollm2-135m-instruct", ws)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        if not a.no_adapter:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.002)
        model.eval()
        prompts = [prompt_ids(tok, c) for c in chats]
        lens = sorted(len(p) for p in prompts)
        print(f"{len(prompts)} held-out tickets, prompt tokens min/median/max {lens[0]}/{lens[len(lens) // 2]}/"
              f"{lens[-1]}; greedy, max_new_tokens {a.max_new_tokens}, batch size {a.batch_size}; "
              f"{'base only' if a.no_adapter else 'LoRA r=16 all-linear adapter'}", flush=True)

        arms = {"A padded generate": generate_padded, "B engine": generate}
        tps: dict[str, list[float]] = {k: [] for k in arms}
        cps: dict[str, list[float]] = {k: [] for k in arms}
        texts: dict[str, list[str]] = {}
        per_ex: dict[str, list[int]] = {}
        tokens: dict[str, int] = {}
        for r in range(a.repeats):
            order = list(arms) if r % 2 == 0 else list(arms)[::-1]
            for name in order:
                t0, c0 = time.perf_counter(), time.process_time()
                out, stats = arms[name](model, tok, prompts, a.max_new_tokens, a.batch_size, desc=name)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                n = sum(s["new_tokens"] for s in stats)
                tps[name].append(n / dt)
                cps[name].append(n / dc)
                texts[name], tokens[name] = out, n
                per_ex[name] = [s["new_tokens"] for s in stats]
                print(f"repeat {r + 1} {name}: {n} tokens in {dt:.2f} s = {n / dt:.2f} tokens/s "
                      f"({dc:.2f} CPU s = {n / dc:.2f} tokens per CPU s)", flush=True)
        med = {k: statistics.median(v) for k, v in tps.items()}
        cmed = {k: statistics.median(v) for k, v in cps.items()}
        same = texts["A padded generate"] == texts["B engine"]
        diff = sum(x != y for x, y in zip(texts["A padded generate"], texts["B engine"]))
        for k, v in med.items():
            print(f"{k}: median {v:.2f} tokens/s over {a.repeats} repeats ({', '.join(f'{x:.2f}' for x in tps[k])}); "
                  f"median {cmed[k]:.2f} tokens per CPU s")
        print(f"identical greedy answers: {same} ({diff} of {len(prompts)} differ); generated tokens "
              f"A {tokens['A padded generate']}, B {tokens['B engine']}")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        new = per_ex["A padded generate"]
        row_steps = sum(len(b) * max(new[i] for i in b)
                        for b in (order[j: j + a.batch_size] for j in range(0, len(order), a.batch_size)))
        print(f"padded loop: {row_steps} row-steps for {sum(new)} generated tokens: dropping finished rows saves at "
              f"most {row_steps / max(1, sum(new)):.2f}x of the decoding work on this set")
        print(f"ratio engine / padded generate: {med['B engine'] / med['A padded generate']:.2f}x tokens/s "
              f"(per CPU second: {cmed['B engine'] / cmed['A padded generate']:.2f}x)")
        print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
