"""Selection: DSIR importance resampling toward a target domain, and per-label caps.

DSIR (Xie et al. 2023, "Data Selection for Language Models via Importance Resampling"):
hash unigrams and bigrams into ``buckets`` features; fit smoothed bag-of-n-gram
distributions p (target sample) and q (raw data); weight each raw record by
log p(x) - log q(x); keep k records by Gumbel top-k sampling over those log weights (a
sample without replacement proportional to the weights). We report how much closer the
selection is to the target: KL(target || raw) vs KL(target || selected) over the features.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from collections import Counter
from typing import Iterable

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


def features(text: str, buckets: int) -> Counter:
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return Counter(zlib.crc32(g.encode()) % buckets for g in grams)


class NgramModel:
    """A smoothed bag-of-hashed-n-grams distribution."""

    def __init__(self, buckets: int = 10_000, smoothing: float = 1.0):
        self.buckets = buckets
        self.counts = np.full(buckets, smoothing, dtype=np.float64)

    def add(self, text: str) -> None:
        for f, c in features(text, self.buckets).items():
            self.counts[f] += c

    @property
    def log_probs(self) -> np.ndarray:
        return np.log(self.counts / self.counts.sum())


def log_weight(text: str, log_p: np.ndarray, log_q: np.ndarray) -> float:
    fs = features(text, len(log_p))
    if not fs:
        return -math.inf
    idx = np.fromiter(fs.keys(), dtype=np.int64)
    cnt = np.fromiter(fs.values(), dtype=np.float64)
    return float((cnt * (log_p[idx] - log_q[idx])).sum())


def gumbel_top_k(log_weights: list[float], k: int, seed: int) -> list[int]:
    """Indices of a size-k sample without replacement, probability ∝ exp(log_weight)."""
    rng = np.random.default_rng(seed)
    lw = np.asarray(log_weights, dtype=np.float64)
    keys = lw + rng.gumbel(size=len(lw))
    keys[~np.isfinite(lw)] = -np.inf
    k = min(k, int(np.isfinite(keys).sum()))
    return sorted(np.argpartition(-keys, k - 1)[:k].tolist()) if k > 0 else []


def kl(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    p = p_counts / p_counts.sum()
    q = q_counts / q_counts.sum()
    return float((p * (np.log(p) - np.log(q))).sum())


def cap_per_label(labels: list[str], keep: Iterable[int], max_per_label: int, seed: int) -> list[int]:
    """Keep at most ``max_per_label`` of each label (random, seeded), preserving order."""
    by: dict[str, list[int]] = {}
    for i in keep:
        by.setdefault(labels[i], []).append(i)
    rng = random.Random(seed)
    out = []
    for idx in by.values():
        out += idx if len(idx) <= max_per_label else rng.sample(idx, max_per_label)
    return sorted(out)
