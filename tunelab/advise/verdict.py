"""What the measured ladder decides, from its numbers alone (no models here, so it is tested on synthetic
results): which rung meets the target at the lowest total cost, the learning curve of the LoRA pilot, and
the hallucination proxy.

- A rung *meets* the target when its whole bootstrap interval is on the right side of it (lower bound
  ≥ target for a higher-is-better metric), and it keeps the task's limits (cost per 1k requests, p95
  latency). Of those, the verdict is the one with the lowest total cost: one-time cost + cost per request ×
  the requests the task expects. None meets → the best rung by its point value, with its shortfall.
- The learning curve is a power law in the number of training examples, ``error(n) = a · n^(−b)`` with
  error = the metric's best value − the score, fitted by least squares in log–log space; its interval
  is a percentile bootstrap over the held-out examples (the same resample for every pilot size), so it
  shows the held-out noise of the points, not the spread between training seeds.
"""

from __future__ import annotations

import math
import re

from tunelab.scoring.metrics import PERCENT_SCALE, direction
from tunelab.scoring.stats import Statistic
from tunelab.scoring.stats import value as stat_value


def meets(value: float | None, ci_low: float | None, ci_high: float | None, target: float, way: str) -> bool:
    """The whole interval is on the good side of ``target`` (no interval: not shown to meet it)."""
    if ci_low is None or ci_high is None:
        return False
    return ci_low >= target if way == "higher" else ci_high <= target


def total_cost(row: dict, requests: int) -> float:
    return (row.get("one_time_cost") or 0.0) + (row.get("cost_per_1k") or 0.0) * requests / 1000.0


def decide(rows: list[dict], metric: str, target: float, *, requests: int, max_cost_per_1k: float | None = None,
           max_latency_p95_s: float | None = None) -> dict:
    """The verdict over ``rows`` (each: ``label``, ``scores[metric]`` = {value, ci_low, ci_high},
    ``one_time_cost``, ``cost_per_1k``, ``latency_p95_s``). Returns the chosen row's index (or None), which
    rows meet, which were ruled out by a limit, and a sentence."""
    way = direction(metric)
    met, limited = [], []
    for i, r in enumerate(rows):
        s = r["scores"].get(metric) or {}
        if not meets(s.get("value"), s.get("ci_low"), s.get("ci_high"), target, way):
            continue
        why = []
        if max_cost_per_1k is not None and (r.get("cost_per_1k") or 0.0) > max_cost_per_1k:
            why.append(f"cost {r['cost_per_1k']:.4g} per 1k requests is over the limit {max_cost_per_1k:g}")
        if max_latency_p95_s is not None and (r.get("latency_p95_s") or 0.0) > max_latency_p95_s:
            why.append(f"p95 latency {r['latency_p95_s']:.3g} s is over the limit {max_latency_p95_s:g} s")
        (limited.append({"index": i, "label": r["label"], "why": "; ".join(why)}) if why else met.append(i))
    out = {"metric": metric, "target": target, "direction": way, "requests": requests, "meets": met,
           "ruled_out_by_limits": limited}
    if met:
        best = min(met, key=lambda i: (total_cost(rows[i], requests), i))
        r = rows[best]
        s = r["scores"][metric]
        out.update(choice=best, met=True, shortfall=None,
                   sentence=f"{r['label']} meets {metric} {'≥' if way == 'higher' else '≤'} {target:g} "
                            f"(interval [{s['ci_low']:.4g}, {s['ci_high']:.4g}]) at the lowest total cost: "
                            f"{total_cost(r, requests):.4g} for {requests:,} requests"
                            + (" (a projection from the pilot's learning curve, not a measurement)"
                               if r.get("projected") else ""))
        return out
    scored = [i for i, r in enumerate(rows) if (r["scores"].get(metric) or {}).get("value") is not None]
    if not scored:
        out.update(choice=None, met=False, best=None, shortfall=None, sentence="no rung was scored")
        return out
    sign = 1 if way == "higher" else -1
    best = max(scored, key=lambda i: (sign * rows[i]["scores"][metric]["value"], -i))
    s = rows[best]["scores"][metric]
    bound = s.get("ci_low") if way == "higher" else s.get("ci_high")
    short = {"point": sign * (target - s["value"]), "interval": None if bound is None else sign * (target - bound)}
    lim = f"; {len(limited)} rung(s) met it but broke a limit" if limited else ""
    interval = f" (interval [{s['ci_low']:.4g}, {s['ci_high']:.4g}])" if s.get("ci_low") is not None else ""
    head = f"no rung meets {metric} {'≥' if way == 'higher' else '≤'} {target:g}{lim}; the best is " \
           f"{rows[best]['label']} at {s['value']:.4g}{interval}"
    # the point reaches the target, the interval does not: more held-out examples decide, not another rung
    out["interval_too_wide"] = short["point"] <= 0
    if out["interval_too_wide"]:
        tail = (f": its value reaches the target but its interval's bound falls short by {short['interval']:.4g}; "
                f"more held-out examples would narrow the interval")
    else:
        tail = f": short by {short['point']:.4g}" + (f" ({short['interval']:.4g} for the interval's bound)"
                                                     if short["interval"] is not None else "")
    out.update(choice=None, met=False, best=best, shortfall=short, sentence=head + tail)
    return out


# ----------------------------------------------------------------------------- learning curve


def metric_ceiling(metric: str) -> float:
    """The best value a higher-is-better metric can take (sacrebleu's scores are 0–100, the rest 0–1)."""
    return 100.0 if metric in PERCENT_SCALE else 1.0


def fit_power_law(sizes: list[int], scores: list[float], metric: str) -> tuple[float, float] | None:
    """(a, b) of error(n) = a · n^(−b), least squares on log error vs log n; None below two sizes."""
    import numpy as np

    if len(sizes) < 2 or len(set(sizes)) < 2:
        return None
    err = _errors(scores, metric)
    slope, icpt = np.polyfit(np.log(np.asarray(sizes, dtype=float)), np.log(err), 1)
    return float(math.exp(icpt)), float(-slope)


def _errors(scores, metric: str):
    import numpy as np

    s = np.asarray(scores, dtype=float)
    err = (metric_ceiling(metric) - s) if direction(metric) == "higher" else s
    return np.clip(err, 1e-6, None)


def predict(a: float, b: float, n: float, metric: str) -> float:
    err = a * n ** (-b)
    return metric_ceiling(metric) - err if direction(metric) == "higher" else err


def learning_curve(sizes: list[int], stats: list, metric: str, full_size: int, *, n_resamples: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> dict:
    """Fit the power law to the pilots' scores (``stats``: each pilot's score as a function of held-out
    indices, tunelab/scoring/stats.py) and project it to ``full_size`` examples, with a percentile
    bootstrap interval over the held-out examples."""
    import numpy as np

    points = [stat_value(s) for s in stats]
    out = {"law": "error(n) = a * n^(-b), error = " + ("ceiling - score" if direction(metric) == "higher"
                                                        else "score"),
           "ceiling": metric_ceiling(metric) if direction(metric) == "higher" else None,
           "sizes": list(sizes), "scores": points, "full_size": full_size}
    fit = fit_power_law(sizes, points, metric)
    if fit is None:
        out.update(fitted=False, note="fewer than two pilot sizes ran: no curve, no projection")
        return out
    a, b = fit
    out.update(fitted=True, a=a, b=b, projection=predict(a, b, full_size, metric))
    n = stats[0].n
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    per = np.stack([s(idx) for s in stats], axis=1)  # (resamples, sizes)
    logn = np.log(np.asarray(sizes, dtype=float))
    proj = []
    for row in per:
        if not np.all(np.isfinite(row)):
            continue
        slope, icpt = np.polyfit(logn, np.log(_errors(row, metric)), 1)
        proj.append(predict(math.exp(icpt), -slope, full_size, metric))
    if proj:
        al = (1 - confidence) / 2
        lo, hi = np.percentile(proj, [100 * al, 100 * (1 - al)])
        out.update(ci_low=float(lo), ci_high=float(hi))
    else:
        out.update(ci_low=None, ci_high=None)
    notes = []
    if b <= 0:
        notes.append("the score did not improve with more examples: the projection is not a promise of gains")
    if len(sizes) == 2:
        notes.append("two sizes: the line passes through both points, so the interval shows held-out noise only")
    notes.append("the interval resamples held-out examples; training-seed variation is not in it")
    out["note"] = "; ".join(notes)
    return out


# ----------------------------------------------------------------------------- hallucination proxy

_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:/-]\d+)*(?![\w])")
_WORD = re.compile(r"[A-Za-z][\w'’-]*")
_SENTENCE_END = re.compile(r"[.!?:\n]\s*$")


def entities(text: str) -> list[str]:
    """Numbers, tokens with a digit in them (order ids, SKUs) and capitalized words that do not open a
    sentence (names): what an answer can state as a fact. Lower-cased, numbers without thousands commas."""
    out = [m.group().replace(",", "") for m in _NUMBER.finditer(text)]
    for m in re.finditer(r"\S+", text):
        tok = m.group().strip(".,;:!?()[]\"'“”‘’")
        if any(c.isdigit() for c in tok) and any(c.isalpha() for c in tok):
            out.append(tok.lower())
    for m in _WORD.finditer(text):
        w = m.group()
        if not w[0].isupper() or len(w) < 2:
            continue
        before = text[:m.start()]
        if not before.strip() or _SENTENCE_END.search(before):
            continue  # a sentence's first word is capitalized anyway
        out.append(w.lower())
    return out


def _norm(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d)", "", text.lower())


def unsupported(answer: str, sources: list[str]) -> tuple[int, int]:
    """(entities in ``answer`` found in none of ``sources``, entities in ``answer``)."""
    found = entities(answer)
    hay = " ".join(_norm(s) for s in sources)
    miss = 0
    for e in found:
        if not re.search(r"(?<![\w])" + re.escape(e) + r"(?![\w])", hay):
            miss += 1
    return miss, len(found)


def rate_statistic(miss: list[int], total: list[int]):
    """Σ unsupported / Σ entities as a resampling statistic (0 where no answer states an entity)."""
    import numpy as np

    m, t = np.asarray(miss, dtype=float), np.asarray(total, dtype=float)

    def fn(idx):
        den = t[idx].sum(axis=-1)
        return np.where(den > 0, m[idx].sum(axis=-1) / np.maximum(den, 1), 0.0)

    return Statistic(fn, len(m), vectorized=True)
