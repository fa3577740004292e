"""Peak memory of `tunelab data prepare` on a large JSONL input (issue: 1 GB stays under 1 GB of RAM).

    .venv/bin/python bench/data_memory.py --gb 1.0 [--out DIR] [--workers N]

Builds a JSONL file of about ``--gb`` GiB: 100,000 records from bench/data_pipeline.py's generator
(~1 KB each, planted near and exact duplicates, PII), written again and again with a
copy-specific change to every 4th word, so every copy is new text to the dedup steps (no 5-gram
is shared across copies) while the duplicates planted inside each copy stay duplicates. Then runs
``tunelab.data.prepare.run`` with the default pipeline of bench/data_pipeline.py (normalize,
control_chars, length, exact_dedup, near_dedup, pii) and the default profile, while a thread
samples the resident memory (RSS) of this process and of every child process (the worker
processes) every 0.1 s.

Prints the input size, the peak RSS of this process alone and the peak PSS of the whole process
tree (what the machine had to give; PSS shares a page the forked workers have in common among them), the tree's peak as a share of the input size (the baseline this benchmark
compares against: holding the input in memory would need at least 1x), records/s, and one JSON
line. Run it alone for the records/s figure; the memory figures do not depend on other load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_pipeline as dp  # noqa: E402  (the generator and the default pipeline)


def _copy_text(text: str, c: int) -> str:
    if c == 0:
        return text
    words = text.split(" ")
    for i in range(c % 4, len(words), 4):
        words[i] = f"{words[i]}q{c}"
    return " ".join(words)


def build(path: Path, gib: float, seed: int) -> int:
    """Writes the input; returns the number of records."""
    base = path.with_suffix(".base.jsonl")
    dp.generate(base, 100_000, seed)
    lines = base.read_text(encoding="utf-8").splitlines()
    base.unlink()
    target, n, c = gib * 2**30, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            for line in lines:
                rec = json.loads(line)
                f.write(json.dumps({k: _copy_text(v, c) for k, v in rec.items()}) + "\n")
                n += 1
                if f.tell() >= target:
                    break
            c += 1
    return n


class Sampler(threading.Thread):
    """Peak memory of this process (RSS) and of this process + all its children (sum of PSS: forked
    workers share pages with their parent, and PSS counts a shared page once across them, where a
    sum of RSS would count it in every process), sampled every 0.1 s."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.peak_self = self.peak_tree = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        def pss(p) -> int:
            try:
                return p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                return p.memory_info().rss

        while not self.stop.is_set():
            try:
                own = self.me.memory_info().rss
                tree = pss(self.me)
                for ch in self.me.children(recursive=True):
                    try:
                        tree += pss(ch)
                    except psutil.Error:
                        pass
                self.peak_self = max(self.peak_self, own)
                self.peak_tree = max(self.peak_tree, tree)
            except psutil.Error:
                pass
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="input size in GiB (default 1.0)")
    ap.add_argument("--out", help="folder for the data and the workspace, kept (default: a temporary one, removed)")
    ap.add_argument("--workers", type=int, default=None, help="prepare's workers setting (default: automatic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(Path(args.out) / f"large-{args.gb}-{args.seed}.jsonl", args.gb, args.seed)
        return

    from tunelab import config as cfglib
    from tunelab.data.prepare import PrepareConfig, run
    from tunelab.environment import cpu_model, memory_gb
    from tunelab.workspace import Workspace

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gb()} GB, Python {sys.version.split()[0]}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tunelab-data-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"large-{args.gb}-{args.seed}.jsonl"
    try:
        t = time.perf_counter()
        if not data.exists():  # in a child process, so the generator's memory is not counted below
            import subprocess

            subprocess.run([sys.executable, __file__, "--build-only", "--gb", str(args.gb), "--seed", str(args.seed),
                            "--out", str(root)], check=True)
        size = data.stat().st_size
        with open(data, "rb") as f:
            n = sum(1 for _ in f)
        print(f"data: {n:,} records, {size / 2**20:,.0f} MiB, ready in {time.perf_counter() - t:.0f} s")

        ws_dir = root / "ws"
        shutil.rmtree(ws_dir, ignore_errors=True)
        cfg = cfglib.load(PrepareConfig, data={"recipe": "data", "name": "mem", "inputs": [{"path": str(data)}],
                                               "steps": dp.PIPELINE, "workers": args.workers})
        sampler = Sampler()
        sampler.start()
        t = time.perf_counter()
        m = run(cfg, Workspace.resolve(ws_dir))
        seconds = time.perf_counter() - t
        sampler.stop.set()
        sampler.join()
        mib = 2**20
        print(f"prepare: {n / seconds:,.0f} records/s ({seconds:.0f} s); kept {m['counts']['kept']:,}; "
              f"dropped " + ", ".join(f"{s['kind']} {sum(s['dropped'].values()):,}" for s in m["steps"]
                                      if s["dropped"]))
        print(f"peak memory: this process {sampler.peak_self / mib:,.0f} MiB (RSS); with its worker processes "
              f"{sampler.peak_tree / mib:,.0f} MiB (PSS) = {sampler.peak_tree / size:.2f}x the input's size "
              f"(target: under 1 GiB for a 1 GiB input: {'met' if sampler.peak_tree < 2**30 else 'NOT met'})")
        print(json.dumps({"input_bytes": size, "records": n, "seconds": round(seconds, 1),
                          "records_per_s": round(n / seconds), "kept": m["counts"]["kept"],
                          "peak_rss_self_mib": round(sampler.peak_self / mib),
                          "peak_rss_tree_mib": round(sampler.peak_tree / mib),
                          "ratio_to_input": round(sampler.peak_tree / size, 3)}))
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
