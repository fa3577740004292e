"""The frozen LM head's chunked NLL and input gradient (numerics.frozen_head_nll) against the previous formulation
(logsumexp, then exp of logits - lse), on a real model's hidden states, in the same run.

    python bench/frozen_head_nll.py --model WS/models/smollm2-135m-instruct [--tokens 512] [--reps 7]

The hidden states are the model's own at ``--tokens`` positions of the support data; ``--sharpen`` multiplies
them (a more confident model: logits further apart, where exp of far-below-max logits turns subnormal).
Prints the median time of each and the ratio; checks both give the same NLL and gradient.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def previous(hidden, weight, targets):
    """The formulation before the subnormal clamp (one chunk): logsumexp, then exp(logits - lse)."""
    import torch

    logits = hidden @ weight.t()
    lse = torch.logsumexp(logits, dim=-1)
    nll = (lse - logits.gather(1, targets[:, None])[:, 0]).sum()
    probs = torch.exp(logits.sub_(lse[:, None]))
    probs[torch.arange(len(targets)), targets] -= 1.0
    return nll, probs @ weight


def current(hidden, weight, targets):
    import torch

    from tunelab.train.numerics import frozen_head_nll

    h = hidden.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        nll = frozen_head_nll(h, weight, targets, chunk=len(targets))  # the forward computes the gradient
    return nll.detach(), None


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=str(ROOT / "examples" / "data" / "support" / "train.jsonl"))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sharpen", type=float, default=1.0)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    rows = [json.loads(x) for x in Path(a.data).read_text(encoding="utf-8").splitlines()[:40]]
    ids = tok(" ".join(r["instruction"] + " " + r["output"] for r in rows), return_tensors="pt").input_ids
    ids = ids[:, : a.tokens + 1]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, : a.tokens] * a.sharpen
    weight = model.get_output_embeddings().weight.detach()
    targets = ids[0, 1 : a.tokens + 1]
    ref_nll, ref_grad = previous(hidden, weight, targets)
    h = hidden.clone().requires_grad_(True)
    from tunelab.train.numerics import frozen_head_nll

    got = frozen_head_nll(h, weight, targets, chunk=len(targets))
    got.backward()
    print(f"NLL previous {float(ref_nll):.4f}, current {float(got.detach()):.4f}; gradient max abs difference "
          f"{float((h.grad - ref_grad).abs().max()):.2e}")
    times: dict[str, list[float]] = {"previous": [], "current": []}
    with torch.no_grad():
        for _ in range(a.reps):  # alternating
            for name, fn in (("previous", previous), ("current", current)):
                t0 = time.perf_counter()
                fn(hidden, weight, targets)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.tokens} tokens x vocab {weight.shape[0]} (sharpen {a.sharpen}), torch threads {torch.get_num_threads()}, "
          f"median of {a.reps}: previous {med['previous'] * 1000:.1f} ms, current {med['current'] * 1000:.1f} ms, "
          f"ratio {med['previous'] / med['current']:.2f}x")


if __name__ == "__main__":
    main()
