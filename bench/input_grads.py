"""LoRA SFT under gradient checkpointing with and without the input-embedding gradient hook removed.

    python bench/input_grads.py --model WS/models/smollm2-135m-instruct [--steps 8] [--rounds 2]

Turning gradient checkpointing on makes transformers hook the input embeddings so that their output requires a
gradient (``enable_input_require_grads``); the run layer removes that hook at the start of training
(``InputGradsOff``, tunelab/train/callbacks.py). This trains examples/sft_lora_support.yaml with
``train.gradient_checkpointing: true``, every layer adapted and ``lora.last_layers: 15``, with the callback as
shipped ("removed") and turned into a no-op ("kept"), in alternating order, and prints the median step time of
each (steps after the first two) and the ratio kept / removed. The final train losses are printed too: they
should agree.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(model: str, steps: int, removed: bool, last: int | None) -> tuple[float, float]:
    import yaml

    from tunelab import recipes
    from tunelab.config import validate
    from tunelab.train import callbacks as cb
    from tunelab.workspace import Workspace

    cb.InputGradsOff.on_train_begin = REAL if removed else (lambda *a, **k: None)
    raw = yaml.safe_load((ROOT / "examples" / "sft_lora_support.yaml").read_text())
    raw["model"]["name"] = model
    raw["data"]["train"] = str(ROOT / raw["data"]["train"])
    raw["data"].pop("validation", None)
    raw["data"].pop("test", None)
    raw["data"]["validation_split"] = 0.0
    raw.pop("eval", None)
    raw["train"].update(max_steps=steps, eval_every=10 ** 6, early_stopping_patience=None,
                        gradient_checkpointing=True)
    if last:
        raw["lora"]["last_layers"] = last
    cls, run = recipes.get("sft")
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            s = run(validate(cls, raw), Workspace.resolve(tmp))
        rows = [json.loads(x) for x in (Path(s["output"]).parent / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][2:]
    return statistics.median(times), s["final_train_loss"]


def main() -> None:
    global REAL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from tunelab.train import callbacks as cb

    REAL = cb.InputGradsOff.on_train_begin
    res: dict[tuple[bool, int | None], list[float]] = {}
    for rnd in range(a.rounds):
        for removed in (True, False) if rnd % 2 == 0 else (False, True):
            for last in (None, 15):
                m, loss = one(a.model, a.steps, removed, last)
                res.setdefault((removed, last), []).append(m)
                print(f"round {rnd + 1} hook {'removed' if removed else 'kept'}, lora.last_layers={last}: "
                      f"median step {m:.3f} s, final train loss {loss:.4f}", flush=True)
    for last in (None, 15):
        kept, removed = statistics.median(res[(False, last)]), statistics.median(res[(True, last)])
        print(f"lora.last_layers={last}: kept {kept:.3f} s, removed {removed:.3f} s per step: "
              f"{kept / removed:.2f}x")


REAL = None

if __name__ == "__main__":
    main()
