"""The retrieval index behind the ladder's few-shot/RAG rungs and `tunelab serve --rag`: faiss exact
(IndexFlatIP) and HNSW (IndexHNSWFlat, M=32, efSearch=64) against a plain numpy exact search on the same
vectors (the baseline): build time, search time per query, recall@10 against the exact neighbours.

    .venv/bin/python bench/retrieval_index.py [--n 100000] [--queries 1000]

Two vector sets: (1) real MiniLM vectors (tunelab/data/retrieval.py's Embedder, the packaged
all-MiniLM-L6-v2) of the support dataset's training answers, queried with its test questions; (2) ``--n``
synthetic unit vectors of the same dimension (384) drawn around 1,000 random centres, for the scale a
document collection reaches (embedding that many real passages takes hours on a laptop CPU).
Prints one line per index and set, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def exact(base, queries, k):
    import numpy as np

    s = queries @ base.T
    part = np.argpartition(-s, k, axis=1)[:, :k]
    order = np.take_along_axis(s, part, 1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(part, order, 1)


def measure(name, base, queries, k=10):
    import numpy as np

    from tunelab.data.retrieval import _faiss_index

    out = {"set": name, "n": len(base), "queries": len(queries), "k": k}
    t0 = time.perf_counter()
    truth = exact(base, queries, k)
    out["numpy_exact_search_ms_per_query"] = (time.perf_counter() - t0) * 1000 / len(queries)
    for kind in ("flat", "hnsw"):
        t0 = time.perf_counter()
        index = _faiss_index(base, kind)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, got = index.search(queries, k)
        search = (time.perf_counter() - t0) * 1000 / len(queries)
        recall = float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)]))
        out[kind] = {"build_s": round(build, 3), "search_ms_per_query": round(search, 4), "recall@10": round(recall, 4)}
        print(f"{name}: faiss {kind}: n={len(base)} build {build:.3f} s, search {search:.4f} ms/query, "
              f"recall@{k} vs exact {recall:.4f} (numpy exact: {out['numpy_exact_search_ms_per_query']:.4f} ms/query)")
    return out


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    a = ap.parse_args()
    from tunelab.data.retrieval import Embedder

    rows = [json.loads(line) for line in (ROOT / "examples/data/support/train.jsonl").read_text().splitlines()]
    tests = [json.loads(line) for line in (ROOT / "examples/data/support/test.jsonl").read_text().splitlines()]
    emb = Embedder()
    t0 = time.perf_counter()
    base = emb.encode([r["output"] for r in rows])
    embed_s = time.perf_counter() - t0
    print(f"MiniLM: {len(rows)} passages embedded in {embed_s:.2f} s ({len(rows) / embed_s:.1f}/s)")
    res = [measure("support answers (MiniLM)", base, emb.encode([r["instruction"] for r in tests]))]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, 384)).astype(np.float32)
    pick = rng.integers(0, 1000, size=a.n + a.queries)
    v = centres[pick] + 0.6 * rng.normal(size=(a.n + a.queries, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    res.append(measure(f"synthetic clustered {a.n:,}", np.ascontiguousarray(v[:a.n]), np.ascontiguousarray(v[a.n:])))
    import faiss

    print(json.dumps({"faiss": faiss.__version__, "threads": os.environ.get("OMP_NUM_THREADS"),
                      "embed_per_s": round(len(rows) / embed_s, 1), "results": res}))


if __name__ == "__main__":
    main()
