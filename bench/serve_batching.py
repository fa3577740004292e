"""Serving throughput: 8 concurrent clients vs one request at a time, on the same server in one run.

    python bench/serve_batching.py --model WS/models/smollm2-135m-instruct [--requests 16] [--mix] [--max-tokens 64]

Starts the tunelab server in-process (uvicorn on a free localhost port) on the model with two
LoRA adapters (r=16 on all linear layers, as the demo trains; B randomized so they differ from
the base) and sends the first ``--requests`` questions of the support test split through the
official ``openai`` client as chat requests, greedy, the same ``--max-tokens``, all to adapter 1
(as a tuned adapter is served), or with ``--mix`` cycling the model name over base, adapter 1,
adapter 2 (so batches mix adapters).

1. baseline: one request at a time (each request is a lone request);
2. concurrent: ``--clients`` threads, each sending its next request as soon as its last one is answered.

Prints completion tokens/s of each and their ratio, p50/p95 latency of each and the ratio of
p95s, whether every answer was identical in both phases (greedy batched == alone), the mean
batch size the server saw, and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_adapter(base: str, out: Path, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)  # lora_A's init: the same adapters in every run
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.002)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def p(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-prefill", action="store_true",
                    help="also run the concurrent phase with new requests prefilled together, and compare")
    ap.add_argument("--mix", action="store_true",
                    help="cycle the requests over base, lora1, lora2 (mixed-adapter batches); default: all to lora1")
    a = ap.parse_args()

    import httpx2 as httpx
    import openai
    import torch
    import uvicorn

    from tunelab.environment import cpu_model
    from tunelab.serve.server import ServeConfig, build
    from tunelab.workspace import Workspace

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    adapters = [f"lora{i}={make_adapter(a.model, tmp / f'lora{i}', i)}" for i in (1, 2)]
    app, registry, engine = build(ServeConfig(model=a.model, name="base", adapters=adapters,
                                              max_batch_size=a.clients, max_tokens=a.max_tokens),
                                  Workspace.resolve(tmp / "ws"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    names = list(registry.models) if a.mix else ["lora1"]
    rows = [json.loads(l) for l in (ROOT / "examples/data/support/test.jsonl").read_text().splitlines()]
    system = "You are the customer support assistant of Northwind Outfitters."
    jobs = [(names[i % len(names)], [{"role": "system", "content": system},
                                     {"role": "user", "content": rows[i]["instruction"]}]) for i in range(a.requests)]

    def one(job):
        t = time.perf_counter()
        r = client.chat.completions.create(model=job[0], messages=job[1], max_tokens=a.max_tokens, temperature=0)
        return time.perf_counter() - t, r.usage.completion_tokens, r.choices[0].message.content

    one(jobs[0])  # warm-up
    t0 = time.perf_counter()
    alone = [one(j) for j in jobs]
    t_alone = time.perf_counter() - t0

    def concurrent():
        steps0, rows0 = engine.stats.steps, engine.stats.rows_stepped
        pre0, prow0 = engine.stats.prefills, engine.stats.rows_prefilled
        todo: queue.Queue = queue.Queue()
        for i, j in enumerate(jobs):
            todo.put((i, j))
        out: list = [None] * len(jobs)

        def worker():
            while True:
                try:
                    i, j = todo.get_nowait()
                except queue.Empty:
                    return
                out[i] = one(j)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (out, time.perf_counter() - t0,
                (engine.stats.rows_stepped - rows0) / max(1, engine.stats.steps - steps0),
                (engine.stats.rows_prefilled - prow0) / max(1, engine.stats.prefills - pre0))

    together, t_together, mean_batch, mean_prefill = concurrent()
    if a.compare_prefill:
        engine.max_prefill_batch = a.clients
        joint, t_joint, _, mean_joint = concurrent()
        engine.max_prefill_batch = 1
    srv.should_exit = True
    engine.close()

    tok_alone, tok_together = sum(x[1] for x in alone), sum(x[1] for x in together)
    lat_alone, lat_together = [x[0] for x in alone], [x[0] for x in together]
    same = sum(x[2] == y[2] for x, y in zip(alone, together))
    print(f"machine: {cpu_model()}, {platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    print(f"model: {a.model}, requests to {', '.join(names)}; {a.requests} chat requests, max_tokens {a.max_tokens}, "
          f"greedy")
    print(f"one at a time : {tok_alone} tokens in {t_alone:.1f} s = {tok_alone / t_alone:.1f} tokens/s; "
          f"latency p50 {p(lat_alone, 50):.2f} s, p95 {p(lat_alone, 95):.2f} s")
    print(f"{a.clients} concurrent  : {tok_together} tokens in {t_together:.1f} s = "
          f"{tok_together / t_together:.1f} tokens/s; latency p50 {p(lat_together, 50):.2f} s, "
          f"p95 {p(lat_together, 95):.2f} s; mean batch size {mean_batch:.2f}, mean prefill batch {mean_prefill:.2f}")
    print(f"throughput ratio: {(tok_together / t_together) / (tok_alone / t_alone):.2f}x (target >= 3x)")
    print(f"p95 latency ratio: {p(lat_together, 95) / p(lat_alone, 95):.2f}x (target <= 2.5x)")
    print(f"identical answers batched vs alone: {same}/{len(jobs)}")
    if a.compare_prefill:
        tok_joint, lat_joint = sum(x[1] for x in joint), [x[0] for x in joint]
        print(f"{a.clients} concurrent, prefilled together (mean {mean_joint:.2f} a forward): {tok_joint} tokens in "
              f"{t_joint:.1f} s = {tok_joint / t_joint:.1f} tokens/s; latency p50 {p(lat_joint, 50):.2f} s, "
              f"p95 {p(lat_joint, 95):.2f} s")
        print(f"prefill together vs alone: throughput {(tok_joint / t_joint) / (tok_together / t_together):.2f}x, "
              f"p95 latency {p(lat_joint, 95) / p(lat_together, 95):.2f}x; identical answers "
              f"{sum(x[2] == y[2] for x, y in zip(joint, together))}/{len(jobs)}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
