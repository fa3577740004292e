"""The measured ladder on two tasks that should get different verdicts (docs/methods/ladder.md):

1. support: the project's customer-support tickets (examples/data/support), where the facts an answer
   needs (sizes, order numbers, e-mail addresses) are in the customer's message;
2. catalog: a knowledge-heavy task this script generates (seeded, fictional, so no model has seen it): a
   catalog of products, one document each (price, weight, warranty, maker's city, model number); the
   questions ask for one fact; the reference is the value alone ("520 grams", "Oslo", "C989") and an answer
   is right when it contains it (contains_reference). Training questions ask about prices and warranties, held-out questions about weights, cities
   and model numbers of the same products: the answer is in the documents only.

    .venv/bin/python bench/ladder_tasks.py --workspace WS [--task support|catalog|both] [--heldout 40]

Needs the pulled model (``tunelab models pull smollm2-135m-instruct -w WS``). Prints each ladder's table
and verdict, its wall time, and one JSON line per task. Targets are set here before any run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYL = ["ka", "lo", "mi", "ran", "tor", "vel", "shi", "no", "qua", "ber", "dun", "fal", "gri", "hol", "zen", "pax"]
KINDS = ["kettle", "lantern", "backpack", "drill", "tent", "blender", "compass", "heater", "kayak", "scanner"]
CITIES = ["Oslo", "Porto", "Leeds", "Graz", "Tampere", "Brno", "Ghent", "Cork", "Lyon", "Turku", "Malmo", "Bergen"]


def catalog(out: Path, n_products: int = 120, seed: int = 0) -> dict:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n_products:
        names.add("".join(rng.choice(SYL) for _ in range(3)).capitalize())
    docs, train, held = [], [], []
    for i, name in enumerate(sorted(names)):
        kind = rng.choice(KINDS)
        f = {"price": rng.randint(12, 480), "weight": rng.randint(150, 9000), "warranty": rng.randint(1, 7),
             "city": rng.choice(CITIES), "code": f"{rng.choice('ABCDEFGHJK')}{rng.randint(100, 999)}"}
        pid = f"product-{i:03d}"
        docs.append({"id": pid, "text": f"The {name} {kind} is made in {f['city']}. It weighs {f['weight']} grams "
                                        f"and costs {f['price']} dollars. It carries a {f['warranty']}-year warranty. "
                                        f"Its model number is {f['code']}."})
        train += [{"instruction": f"How much does the {name} {kind} cost?", "output": f"{f['price']} dollars"},
                  {"instruction": f"How long is the warranty of the {name} {kind}?",
                   "output": f"{f['warranty']} years"}]
        q = rng.choice(["weight", "city", "code"])
        held.append({"instruction": {"weight": f"How much does the {name} {kind} weigh?",
                                     "city": f"Where is the {name} {kind} made?",
                                     "code": f"What is the model number of the {name} {kind}?"}[q],
                     "output": {"weight": f"{f['weight']} grams", "city": f['city'], "code": f['code']}[q],
                     "gold": pid})
    out.mkdir(parents=True, exist_ok=True)
    for fname, rows in (("documents.jsonl", docs), ("train.jsonl", train), ("heldout.jsonl", held)):
        (out / fname).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"train": str(out / "train.jsonl"), "heldout": str(out / "heldout.jsonl"),
            "documents": str(out / "documents.jsonl")}


def task(name: str, model: str, files: dict, heldout: int, threads: int) -> dict:
    common = {"recipe": "ladder", "name": name, "models": [model],
              "budget": {"minutes": 25, "price_per_hour": 0.5, "requests": 100_000},
              "few_shot": {"k": 3}, "rag": {"k": 3}, "n_resamples": 1000,
              "pilot": {"sizes": [16, 32], "lora": {"r": 16, "alpha": 32},
                        "train": {"learning_rate": 4.0e-4, "epochs": 2, "batch_size": 8,
                                  "early_stopping_patience": None, "threads": threads}}}
    if name == "support":
        return {**common, "data": {"train": files["train"], "heldout": files["heldout"], "format": "alpaca",
                                   "system_prompt": "You are the customer support assistant of Northwind Outfitters.",
                                   "heldout_limit": heldout, "max_length": 256},
                "metrics": ["rougeL"], "generation": {"max_new_tokens": 48, "batch_size": 8},
                "target": {"metric": "rougeL", "value": 0.35}}
    return {**common, "data": {"train": files["train"], "heldout": files["heldout"], "format": "alpaca",
                               "instruction": "Answer with the value only.", "documents": files["documents"],
                               "gold_field": "gold", "heldout_limit": heldout, "max_length": 128},
            "metrics": ["contains_reference", "exact_match"], "generation": {"max_new_tokens": 16, "batch_size": 8},
            "target": {"metric": "contains_reference", "value": 0.5}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--task", default="both", choices=["support", "catalog", "both"])
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from tunelab import config as cfglib
    from tunelab.advise import ladder
    from tunelab.environment import cpu_model
    from tunelab.workspace import Workspace

    torch.set_num_threads(a.threads)
    ws = Workspace.resolve(a.workspace)
    model = str(ws.models_dir / "smollm2-135m-instruct")
    names = ["support", "catalog"] if a.task == "both" else [a.task]
    for name in names:
        files = ({"train": str(ROOT / "examples/data/support/train.jsonl"),
                  "heldout": str(ROOT / "examples/data/support/test.jsonl")} if name == "support"
                 else catalog(ws.root / "ladder-catalog-data"))
        cfg = cfglib.validate(ladder.LadderConfig, task(name, model, files, a.heldout, a.threads))
        t0 = time.perf_counter()
        rep = ladder.run(cfg, ws)
        wall = time.perf_counter() - t0
        ladder.print_report(rep)
        print(f"{name}: {wall / 60:.1f} min on {cpu_model()} ({a.threads} threads, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS')})")
        print(json.dumps({"task": name, "minutes": round(wall / 60, 2), "verdict": rep["verdict"]["sentence"],
                          "next": rep["next"]["command"],
                          "rungs": [{"label": r["label"], **r["scores"][cfg.target.metric], "p95_s": r["latency_p95_s"],
                                     "one_time_cost": r["one_time_cost"], "cost_per_1k": r["cost_per_1k"],
                                     "prompt_tokens": r["prompt_tokens_per_request"],
                                     "unsupported": (r.get("hallucination_proxy") or {}).get(
                                         "unsupported_entity_rate", {}).get("value")}
                                    for r in rep["rungs"]],
                          "retrieval": rep["retrieval"], "curve": rep["learning_curve"]}, default=str))


if __name__ == "__main__":
    main()
