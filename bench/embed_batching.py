"""MiniLM sentence embeddings (tunelab/data/retrieval.py's Embedder, which the data profile and retrieval share):
batches by token length against the data profile's former copy (batches of 32 in file order), on the same texts.

    .venv/bin/python bench/embed_batching.py ../shared/data/bitext-customer-support/Bitext_Sample_Customer_Support_Training_Dataset.csv [--n 512]

Prints, per repeat: the real tokens, the positions the model computes (padding included) for each way, the time
of each (model load included, one torch thread) and the largest difference between their vectors.
"""

from __future__ import annotations

import argparse
import csv
import random
import time


def former(texts: list[str], path: str, batch_size: int = 32):
    """tunelab/data/profile.py's embed_texts before it used Embedder: batches of 32 in the order given."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out, positions = [], 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok([t or " " for t in texts[i:i + batch_size]], padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
            positions += enc["input_ids"].numel()
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy())
    return np.concatenate(out), positions


def main() -> None:
    import numpy as np
    import torch

    from tunelab.data.retrieval import EMBED_MAX_TOKENS, Embedder, packaged_embedder_path

    ap = argparse.ArgumentParser()
    ap.add_argument("csv", help="a CSV with instruction and response columns (the bitext support set)")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rows = list(csv.DictReader(open(a.csv, encoding="utf-8")))
    random.Random(0).shuffle(rows)
    texts = [r["instruction"] + "\n" + r["response"] for r in rows[:a.n]]
    torch.set_num_threads(1)
    e = Embedder()
    lens = sorted((len(x) for x in e.tokenizer(texts, truncation=True, max_length=EMBED_MAX_TOKENS)["input_ids"]),
                  reverse=True)
    ours = sum(max(lens[i:i + e.batch_size]) * len(lens[i:i + e.batch_size]) for i in range(0, len(lens), e.batch_size))
    for _ in range(a.repeats):
        t = time.perf_counter()
        old, old_positions = former(texts, packaged_embedder_path())
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        new = Embedder().encode(texts)
        t_new = time.perf_counter() - t
        print(f"{len(texts)} texts, {sum(lens)} real tokens; positions computed: former {old_positions}, "
              f"Embedder {ours}; time (model load included): former {t_old:.2f} s, Embedder {t_new:.2f} s; "
              f"max |difference| {np.abs(old - new).max():.2e}")


if __name__ == "__main__":
    main()
