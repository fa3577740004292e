"""The continuous-batching engine's own cost: decode steps at a full batch, and a run where rows finish and join.

    python bench/engine_step.py --model DIR [--batch-size 50] [--steps 40] [--requests 150] [--repeats 3] [--profile]

DIR is a causal LM directory (e.g. the packaged SmolLM2-135M-Instruct from ``tunelab models pull``). Prompts are
random token ids (seeded), 60-120 tokens, so the cache holds ~60-160 columns, as ``tunelab eval`` on the demo does.

steady: ``--batch-size`` rows prefilled together, then ``--steps`` decoding steps in which no row finishes: the
milliseconds a step takes (median over repeats of the mean step).
churn: ``--requests`` requests with answer lengths drawn from 8-64 tokens decode ``--batch-size`` at a time; a
finished row leaves at once and the next request joins (what an evaluation does): generated tokens per second.
Greedy, no EOS (each request runs to its length), base model, no adapter. ``--profile``: instead, the torch
profiler's table (self CPU time by op) over 5 steady steps.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a causal LM directory")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print where 5 steady steps spend their time")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.engine import Engine, GenRequest

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    vocab = model.config.vocab_size
    rng = random.Random(0)

    def request(n_prompt: int, max_tokens: int) -> GenRequest:
        ids = [rng.randrange(100, vocab) for _ in range(n_prompt)]
        return GenRequest(ids, tok, lambda kind, x: None, adapter=None, max_tokens=max_tokens)

    if a.profile:
        eng = Engine(model, set(), max_batch_size=a.batch_size, max_queue=10 ** 6, prefill_batch=a.batch_size)
        reqs = [request(rng.randint(60, 120), 20) for _ in range(a.batch_size)]
        with torch.inference_mode():
            eng._tick(reqs)
            for _ in range(3):
                eng._tick([])
            with torch.profiler.profile() as prof:
                for _ in range(5):
                    eng._tick([])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return
    steady, churn = [], []
    for r in range(a.repeats):
        eng = Engine(model, set(), max_batch_size=a.batch_size, max_queue=10 ** 6, prefill_batch=a.batch_size)
        reqs = [request(rng.randint(60, 120), a.steps + 10) for _ in range(a.batch_size)]
        with torch.inference_mode():
            eng._tick(reqs)  # prefill and the first step
            t0 = time.perf_counter()
            for _ in range(a.steps):
                eng._tick([])
            dt = time.perf_counter() - t0
        steady.append(1000 * dt / a.steps)
        print(f"repeat {r + 1} steady: {steady[-1]:.1f} ms a step at batch {a.batch_size} "
              f"({a.steps} steps, cache {eng._mask.shape[1]} columns at the end)", flush=True)

        eng = Engine(model, set(), max_batch_size=a.batch_size, max_queue=10 ** 6, prefill_batch=a.batch_size)
        reqs = [request(rng.randint(60, 120), rng.randint(8, 64)) for _ in range(a.requests)]
        t0 = time.perf_counter()
        eng.run(reqs)
        dt = time.perf_counter() - t0
        n = sum(len(q.out_ids) for q in reqs)
        churn.append(n / dt)
        print(f"repeat {r + 1} churn: {n} tokens in {dt:.2f} s = {churn[-1]:.1f} tokens/s, {eng.stats.steps} steps, "
              f"mean batch {eng.stats.as_dict()['mean_batch_size']}", flush=True)
    print(f"steady: median {statistics.median(steady):.1f} ms a step; churn: median {statistics.median(churn):.1f} "
          f"tokens/s; torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
