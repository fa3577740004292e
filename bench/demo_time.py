"""Time `tunelab demo` end to end in a fresh workspace (model conversion included).

    .venv/bin/python bench/demo_time.py [--keep DIR] [--set train.max_steps=20]

Prints the machine, a matmul calibration (fp32 GFLOP/s, so numbers from other machines can
be compared), the time of each phase and the total against the 10-minute target, and the
base-vs-tuned ROUGE-L with its 95% interval. It starts on the allocator `tunelab demo` starts on
(jemalloc preloaded where installed; TUNELAB_ALLOCATOR=system for the C library's). Run it alone: a
second job on 2 cores slows both 5-6x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = 10 * 60


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="workspace folder to use and keep (default: a temporary one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    from tunelab import allocator

    pre = allocator.preload_env()  # start over on the allocator `tunelab demo` runs on (tunelab/allocator.py)
    if pre is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], pre)

    from tunelab.demo import run_demo
    from tunelab.environment import capture
    from tunelab.workspace import Workspace

    env = capture()
    print(f"machine: {env['cpu']}, {env['cpu_count']} cores, {env['memory_gb']} GB, torch threads "
          f"{env['torch_threads']}, AMX-bf16: {env['amx_bf16']}, GPUs: {env['gpus'] or 'none'}, allocator: "
          f"{env['allocator']}")
    cal = matmul_gflops()
    print(f"calibration: fp32 1024x1024 matmul {cal:.1f} GFLOP/s (median of 20)")
    root = args.keep or tempfile.mkdtemp(prefix="tunelab-demo-bench-")
    t0 = time.perf_counter()
    res = run_demo(Workspace.resolve(root), args.overrides)
    total = time.perf_counter() - t0
    s = res["seconds"]
    ev = res["eval"]["models"]
    out = {
        "total_s": round(total, 1), "target_s": TARGET_S, "ratio_to_target": round(total / TARGET_S, 3),
        "phases_s": {k: round(v, 1) for k, v in s.items()},
        "train_tokens_per_s": res["summary"]["tokens_per_s"], "steps": res["summary"]["steps"],
        "rougeL_base": round(ev["base"]["rougeL"], 4), "rougeL_tuned": round(ev["tuned"]["rougeL"], 4),
        "rougeL_tuned_ci": [round(x, 4) for x in ev["tuned"]["ci"]["rougeL"]],
        "calibration_gflops": round(cal, 1), "workspace": root,
    }
    print(json.dumps(out, indent=2))
    print(f"demo total {total / 60:.1f} min = {total / TARGET_S:.2f}x the 10-minute target")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
