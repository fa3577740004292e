"""Uncertainty for every score: percentile bootstrap confidence intervals and the paired bootstrap test.

Resampling is over examples (the unit that was sampled). A mean metric resamples its per-example
values; a corpus metric (BLEU, chrF, F1, ROC-AUC, perplexity) recomputes the corpus score on each
resample of examples (Koehn 2004, "Statistical Significance Tests for Machine Translation
Evaluation"). The paired test resamples the *same* examples for both systems, so it measures the
difference and not the spread of the test set (Berg-Kirkpatrick et al. 2012). Its p-value follows
sacrebleu's paired bootstrap: the resampled differences are shifted to mean zero (the null
hypothesis) and compared with the observed difference, two-sided, with the +1 correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tunelab._optional import require
from tunelab.errors import TunelabError


@dataclass(frozen=True)
class Statistic:
    """A score as a function of example indices: ``fn(idx)`` with ``idx`` of shape (B, n) → (B,)
    when ``vectorized``, else ``fn(idx_row)`` of shape (n,) → float, called per resample."""

    fn: Callable
    n: int
    vectorized: bool = False

    def __call__(self, idx):
        import numpy as np

        if self.vectorized:
            return np.asarray(self.fn(idx), dtype=float)
        out = np.empty(len(idx))
        for i, row in enumerate(idx):
            try:
                out[i] = float(self.fn(row))
            except ValueError:  # e.g. ROC-AUC on a resample that holds one class only
                out[i] = math.nan
        return out


def mean_statistic(values) -> Statistic:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return Statistic(lambda idx: v[idx].mean(axis=-1), len(v), vectorized=True)


def _indices(n: int, n_resamples: int, seed: int):
    import numpy as np

    if n_resamples < 1:
        raise TunelabError(f"n_resamples must be at least 1 (got {n_resamples})")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _check_conf(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise TunelabError(f"confidence must lie strictly between 0 and 1 (got {confidence})")


def bootstrap_ci(stat: Statistic, *, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of ``stat`` over its examples; (None, None) for a single example.

    Resamples where the score is undefined (NaN) are left out of the percentiles.
    """
    import numpy as np

    _check_conf(confidence)
    if stat.n < 2:
        return None, None
    dist = stat(_indices(stat.n, n_resamples, seed))
    dist = dist[np.isfinite(dist)]
    if not len(dist):
        return None, None
    a = (1 - confidence) / 2
    lo, hi = np.percentile(dist, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def paired_bootstrap(stat_a: Statistic, stat_b: Statistic, *, n_resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Paired bootstrap test of ``b − a`` on the same examples: the difference, its percentile
    interval and a two-sided p-value (H0: no difference)."""
    import numpy as np

    _check_conf(confidence)
    if stat_a.n != stat_b.n:
        raise TunelabError(f"a paired test needs the same examples: {stat_a.n} vs {stat_b.n}")
    n = stat_a.n
    full = np.arange(n)[None, :]
    observed = float(stat_b(full)[0] - stat_a(full)[0])
    if n < 2:
        return {"difference": observed, "ci_low": None, "ci_high": None, "p_value": None, "n": n}
    idx = _indices(n, n_resamples, seed)
    deltas = stat_b(idx) - stat_a(idx)
    deltas = deltas[np.isfinite(deltas)]
    if not len(deltas):
        return {"difference": observed, "ci_low": None, "ci_high": None, "p_value": None, "n": n}
    a = (1 - confidence) / 2
    lo, hi = np.percentile(deltas, [100 * a, 100 * (1 - a)])
    centered = deltas - deltas.mean()
    p = (1 + int(np.sum(np.abs(centered) >= abs(observed) - 1e-12))) / (1 + len(deltas))
    return {"difference": observed, "ci_low": float(lo), "ci_high": float(hi), "p_value": min(1.0, p), "n": n}


def restrict(stat: Statistic, idx) -> Statistic:
    """The same score over a subset of the examples (``idx``: their positions), e.g. one category."""
    import numpy as np

    sub = np.asarray(idx, dtype=int)
    if stat.vectorized:
        return Statistic(lambda i: stat.fn(sub[i]), len(sub), vectorized=True)
    return Statistic(lambda row: stat.fn(sub[row]), len(sub))


def value(stat: Statistic) -> float:
    """The score on all of its examples."""
    import numpy as np

    return float(stat(np.arange(stat.n)[None, :])[0])


def holm(p_values: list[float | None], alpha: float = 0.05) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values of a family of tests (statsmodels ``multipletests``,
    method ``holm``), in the given order; a missing p-value (None) stays None and is not counted.

    Rejecting where the adjusted p is below ``alpha`` keeps the chance of any false positive in
    the family at most ``alpha`` (Holm 1979).
    """
    require("statsmodels", "eval")
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(p_values) if p is not None]
    out: list[float | None] = list(p_values)
    if idx:
        _, adj, _, _ = multipletests([p_values[i] for i in idx], alpha=alpha, method="holm")
        for i, a in zip(idx, adj):
            out[i] = float(a)
    return out
