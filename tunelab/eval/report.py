"""A self-contained HTML report for one fine-tuning run.

``write_report`` writes ``<run_dir>/report.html`` plus ``<run_dir>/plots/*.png``. The plots are
also embedded in the HTML as base64 ``data:`` URIs and the CSS is inline, so the report opens
offline as a single file. Every value taken from the run is HTML-escaped; missing or NaN
numbers are shown as "—".
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tunelab._plot import new_figure as _new_figure
from tunelab._plot import png_bytes as _png
from tunelab.eval.business import describe, describe_speed
from tunelab.scoring.metrics import direction

MAX_SAMPLES = 20
DASH = "—"

_WAYS = {"higher": "↑ better", "lower": "↓ better", "neutral": "neutral"}
# Display order for known metrics; unknown ones follow alphabetically.
METRIC_ORDER = ["rougeL", "rouge1", "rouge2", "rougeLsum", "bleu", "chrf", "exact_match", "perplexity"]
# Metrics reported on a 0-100 scale, divided by 100 for the bounded bar chart.
PERCENT_SCALE = {"bleu", "chrf"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.muted{color:#666;font-size:.9rem}
table{border-collapse:collapse;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f5f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700}.up{color:#1a7f37}.down{color:#c62828}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:.6rem;overflow:auto;white-space:pre-wrap;
word-break:break-word;font-size:.85rem;margin:.2rem 0}
img{max-width:100%;height:auto;border:1px solid #eee}
.sample{border:1px solid #ddd;border-radius:6px;padding:.6rem;margin:1rem 0}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:.6rem}
.label{font-weight:600;font-size:.85rem;color:#444}
"""


def write_report(
    run_dir: Path,
    *,
    title: str,
    config: dict,
    summary: dict,
    metrics_rows: list[dict],
    eval_metrics: dict | None = None,
    samples: list[dict] | None = None,
    lineage: dict | None = None,
    environment: dict | None = None,
) -> Path:
    """Write ``report.html`` (and ``plots/*.png``) into ``run_dir``; return the HTML path."""
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)

    loss_png = _loss_plot(metrics_rows, summary)
    _atomic_write(plots_dir / "loss.png", loss_png)
    metrics_png = _metrics_plot(eval_metrics) if eval_metrics else None
    if metrics_png is not None:
        _atomic_write(plots_dir / "metrics.png", metrics_png)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="muted">Generated {_esc(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}</p>',
        "<h2>Summary</h2>",
        _summary_table(summary),
        "<h2>Training</h2>",
        _img(loss_png, "Training and validation loss by step"),
        "<h2>Evaluation</h2>",
        _eval_section(eval_metrics, metrics_png),
        "<h2>Samples</h2>",
        _samples_section(samples or []),
        "<h2>Config</h2>",
        _pre_json(config),
    ]
    if lineage is not None:
        parts += ["<h2>Lineage</h2>", _pre_json(lineage)]
    if environment is not None:
        parts += ["<h2>Environment</h2>", _pre_json(environment)]
    parts.append("</body></html>\n")

    out = run_dir / "report.html"
    _atomic_write(out, "\n".join(parts).encode("utf-8"))
    return out


# --------------------------------------------------------------------------- formatting


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is missing, not a number, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _fmt(value: Any) -> str:
    """Display text (unescaped) for one value; None and NaN become a dash."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return DASH
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return _json(value, indent=None)
    return str(value)


def _json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, ensure_ascii=False, default=str)


def _pre_json(obj: Any) -> str:
    return f"<pre>{_esc(_json(obj))}</pre>"


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys: ``{"examples": {"kept": 3}}`` -> ``[("examples.kept", 3)]``."""
    items: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{name}.")
        else:
            items.append((name, value))
    return items


def _summary_table(summary: dict) -> str:
    if not summary:
        return '<p class="muted">No summary.</p>'
    rows = "".join(
        f'<tr><th scope="row">{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>' for k, v in _flatten(summary)
    )
    return f"<table>{rows}</table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


# --------------------------------------------------------------------------- evaluation


def _model_order(names: list[str]) -> list[str]:
    """``base`` first, ``tuned`` second, the rest as given."""
    head = [n for n in ("base", "tuned") if n in names]
    return head + [n for n in names if n not in head]


def _metric_order(names: set[str]) -> list[str]:
    known = [m for m in METRIC_ORDER if m in names]
    return known + sorted(names - set(known))


def _eval_section(eval_metrics: dict | None, metrics_png: bytes | None) -> str:
    models: dict[str, dict] = (eval_metrics or {}).get("models") or {}
    if not models:
        return '<p class="muted">No evaluation was run.</p>'
    names = _model_order(list(models))
    metrics = _metric_order({m for scores in models.values() for m in (scores or {}) if m != "ci"})
    compare = "base" in models and "tuned" in models
    diffs = (eval_metrics or {}).get("differences") or {}

    def cell_text(n: str, metric: str) -> str:
        v = (models[n] or {}).get(metric)
        ci = ((models[n] or {}).get("ci") or {}).get(metric)
        if ci and ci[0] is not None and _num(v) is not None:
            return f"{_fmt(v)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
        return _fmt(v)

    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    if compare:
        head += "<th>tuned − base [interval]</th><th>verdict</th>"
    rows = []
    for metric in metrics:
        values = {n: (models[n] or {}).get(metric) for n in names}
        b, t = _num(values.get("base")), _num(values.get("tuned"))
        both = compare and b is not None and t is not None
        d = diffs.get(metric) or {}
        # a verdict only from the paired test, in the metric's direction (tunelab/scoring/metrics.py)
        word = d.get("verdict") or (("neutral" if direction(metric) == "neutral" else "not tested") if both else None)
        best = {"better": "tuned", "worse": "base"}.get(word or "")
        cells = "".join(
            f'<td class="num{" best" if n == best else ""}">{_esc(cell_text(n, metric))}</td>' for n in names
        )
        if compare:
            delta = f"{t - b:+.4g}" if both else DASH
            if both and d.get("ci_low") is not None:
                delta += f" [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
            pv, pa = d.get("p_value"), d.get("p_value_adjusted")
            if both and pv is not None:
                delta += f" (p={pv:.3g}" + (f", Holm p={pa:.3g})" if pa is not None else ")")
            css = {"better": "up", "worse": "down"}.get(word or "", "")
            cells += f'<td class="num">{_esc(delta)}</td><td class="{css}">{_esc(word or DASH)}</td>'
        rows.append(f"<tr><th scope=\"row\">{_esc(metric)}<span class=\"muted\"> ({_esc(_WAYS[direction(metric)])})</span></th>{cells}</tr>")

    note = ("Arrows: the metric's direction (neutral: neither more nor fewer is better, e.g. tokens generated). "
            "Brackets: 95% percentile-bootstrap interval over examples." +
            (" tuned − base: the paired-bootstrap interval of the difference on the same examples, its p and the "
             "Holm-adjusted p over the tested metrics; the verdict is 'better' or 'worse' only where the adjusted "
             "p < 0.05." if diffs else ""))
    n = eval_metrics.get("n_examples") if eval_metrics else None
    parts = [
        f'<p class="muted">{_esc(f"{_fmt(n)} examples. " if n is not None else "")}{_esc(note)}</p>',
        f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
    ]
    if metrics_png is not None:
        parts.append(_img(metrics_png, "Bounded metrics by model"))
    if eval_metrics.get("forgetting"):
        f = {"forgetting": {"tuned": eval_metrics["forgetting"]}, "baseline": "base",
             "forgetting_thresholds": eval_metrics["forgetting"].get("thresholds", {})}
        parts += ["<h3>Forgetting probe</h3>", _forgetting_section(f)]
    if eval_metrics.get("business"):
        b = {"models": {m: {"business": v} for m, v in eval_metrics["business"].items()}}
        parts += ["<h3>Business metrics</h3>", _business_section(b)]
        if eval_metrics.get("speed_differences"):
            parts.append(f"<pre>{_esc(chr(10).join(describe_speed(eval_metrics['speed_differences'])))}</pre>")
    skip = ("models", "n_examples", "business", "forgetting", "differences", "speed_differences")
    details = {k: v for k, v in (eval_metrics or {}).items() if k not in skip}
    if details:
        parts.append(_pre_json(details))
    return "\n".join(parts)


def _samples_section(samples: list[dict]) -> str:
    if not samples:
        return '<p class="muted">No samples.</p>'
    shown = samples[:MAX_SAMPLES]
    parts = [f'<p class="muted">Showing {len(shown)} of {len(samples)}.</p>']
    for i, s in enumerate(shown):
        outputs = s.get("outputs") or {}
        cols = [("reference", s.get("reference"))] + [(n, outputs[n]) for n in _model_order(list(outputs))]
        col_html = "".join(
            f'<div><div class="label">{_esc(name)}</div><pre>{_esc(_text(text))}</pre></div>' for name, text in cols
        )
        parts.append(
            f'<div class="sample"><div class="label">#{_esc(s.get("id", i))} · prompt</div>'
            f'<pre>{_esc(_text(s.get("prompt")))}</pre><div class="cols">{col_html}</div></div>'
        )
    return "\n".join(parts)


def _text(value: Any) -> str:
    if value is None:
        return DASH
    return value if isinstance(value, str) else _json(value)


# --------------------------------------------------------------------------- plots




def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``key`` for the rows where both are finite numbers."""
    pairs = ((_num(r.get("step")), _num(r.get(key))) for r in rows)
    points = sorted((s, v) for s, v in pairs if s is not None and v is not None)
    return [s for s, _ in points], [v for _, v in points]


def _loss_plot(rows: list[dict], summary: dict) -> bytes:
    """Training and validation loss vs step, marking the best checkpoint and the early stop."""
    fig = _new_figure(8, 4.5)
    ax = fig.add_subplot()
    train_x, train_y = _series(rows, "loss")
    val_x, val_y = _series(rows, "eval_loss")
    if train_x:
        ax.plot(train_x, train_y, color="#1f77b4", linewidth=1.2, label="training loss")
    if val_x:
        ax.plot(val_x, val_y, color="#ff7f0e", marker="o", markersize=4, label="validation loss")
    if not (train_x or val_x):
        ax.text(0.5, 0.5, "no loss values recorded", ha="center", va="center", transform=ax.transAxes)

    markers = [(summary.get("best_step"), "best checkpoint", "#2ca02c", "--")]
    if summary.get("early_stopped"):
        markers.append((summary.get("stopped_step"), "early stop", "#d62728", ":"))
    for step, label, color, style in markers:
        x = _num(step)
        if x is None:
            continue
        ax.axvline(x, color=color, linestyle=style, linewidth=1.2, label=f"{label} (step {_fmt(step)})")
        ax.text(x, 0.98, f"{label} ", color=color, rotation=90, ha="right", va="top",
                fontsize=8, transform=ax.get_xaxis_transform())

    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8, frameon=False)
    return _png(fig)


def _bounded(metric: str, value: Any) -> float | None:
    """The metric on a 0-1 scale if it belongs in the bar chart, else None."""
    v = _num(value)
    if v is None:
        return None
    if metric.lower().startswith("rouge") or metric == "exact_match":
        return v
    if metric in PERCENT_SCALE:
        return v / 100
    return None


def _metrics_plot(eval_metrics: dict) -> bytes | None:
    """Grouped bars per bounded metric (rouge*, bleu/100, chrf/100, exact_match), one bar per model."""
    models: dict[str, dict] = eval_metrics.get("models") or {}
    names = _model_order(list(models))
    metrics = [m for m in _metric_order({m for s in models.values() for m in (s or {})})
               if any(_bounded(m, (models[n] or {}).get(m)) is not None for n in names)]
    if not metrics:
        return None

    fig = _new_figure(max(6, 1.2 * len(metrics) + 2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    top = 1.0
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        ys = [_bounded(m, (models[name] or {}).get(m)) for m in metrics]
        top = max([top] + [y for y in ys if y is not None])
        cis = [((models[name] or {}).get("ci") or {}).get(m) or [None, None] for m in metrics]
        lo = [_bounded(m, c[0]) for m, c in zip(metrics, cis)]
        hi = [_bounded(m, c[1]) for m, c in zip(metrics, cis)]
        err = [[max(y - l, 0) if y is not None and l is not None else 0 for y, l in zip(ys, lo)],
               [max(h - y, 0) if y is not None and h is not None else 0 for y, h in zip(ys, hi)]]
        top = max([top] + [h for h in hi if h is not None])
        ax.bar(xs, [math.nan if y is None else y for y in ys], width=width, label=name, yerr=err, capsize=3)
    labels = [f"{m}/100" if m in PERCENT_SCALE else m for m in metrics]
    ax.set_xticks(range(len(metrics)), labels)
    ax.set_ylim(0, top * 1.05 if top > 1 else 1)
    ax.set_ylabel("score (0–1)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# --------------------------------------------------------------------------- io


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path.tmp`` and rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- comparison report

FILTER_JS = """
function tlFilter(inp, id){var q=inp.value.toLowerCase();var rows=document.getElementById(id).tBodies[0].rows;
for(var i=0;i<rows.length;i++){rows[i].style.display=rows[i].textContent.toLowerCase().indexOf(q)<0?'none':'';}}
"""


def _ci_text(v: dict) -> str:
    if v.get("ci_low") is None:
        return _fmt(v.get("value"))
    return f"{_fmt(v.get('value'))} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]"


def _task_table(res: dict, task: str) -> str:
    meta = res["tasks"][task]
    names = list(res["models"])
    base = res["baseline"]
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = []
    for k in meta["metrics"]:
        cells = []
        for m in names:
            v = res["scores"][m][task][k]
            cell = _esc(_ci_text(v))
            if m != base:
                d = res["differences"][m][task][k]
                css = "" if d["better"] is None else ("up" if d["better"] else "down")
                p = DASH if d["p_value"] is None else f"{d['p_value']:.3g}"
                pa = DASH if d.get("p_value_adjusted") is None else f"{d['p_value_adjusted']:.3g}"
                sig = " *" if d["significant"] else ""
                ci = "" if d.get("ci_low") is None else f" [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
                diff = f"{d['difference']:+.4g}{ci} vs {base}, p={p}, Holm p={pa}{sig}: {d.get('verdict', DASH)}"
                cell += f'<br><span class="{css}">{_esc(diff)}</span>'
            cells.append(f'<td class="num">{cell}</td>')
        rows.append(f"<tr><th scope=\"row\">{_esc(k)}<span class=\"muted\"> ({_esc(_WAYS[direction(k)])})</span></th>{''.join(cells)}</tr>")
    conf = res["bootstrap"]["confidence"]
    note = (f"{meta['n']} examples ({meta['rejected']} rejected) from {meta['source']}. Brackets: {conf:.0%} "
            f"percentile-bootstrap interval over examples ({res['bootstrap']['n_resamples']} resamples). Under each "
            f"model: its difference from {base} with a paired-bootstrap p-value and the Holm-Bonferroni adjusted "
            f"p over all {(res.get('multiple_comparisons') or {}).get('tests', 0)} differences of this comparison "
            f"(every model, task and metric); * marks an adjusted p < {1 - conf:.2g}, and only those differences "
            f"are called better or worse, in the metric's direction (arrows).")
    return (f'<p class="muted">{_esc(note)}</p><table><thead><tr><th>metric</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _ci_bars(res: dict, task: str) -> bytes:
    """One small panel per metric: a bar per model with its bootstrap interval as an error bar."""
    metrics = res["tasks"][task]["metrics"]
    names = list(res["models"])
    fig = _new_figure(min(2.6 * len(metrics) + 1, 16), 3.2)
    for j, k in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        vals = [res["scores"][m][task][k] for m in names]
        ys = [_num(v["value"]) or 0.0 for v in vals]
        err = [[max(y - (v["ci_low"] if v["ci_low"] is not None else y), 0) for y, v in zip(ys, vals)],
               [max((v["ci_high"] if v["ci_high"] is not None else y) - y, 0) for y, v in zip(ys, vals)]]
        ax.bar(range(len(names)), ys, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(k, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _category_section(res: dict, task: str) -> str:
    cats = res["categories"].get(task)
    if not cats:
        return ""
    names = list(res["models"])
    k = res["tasks"][task]["metrics"][0]
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th scope=\"row\">{_esc(c)}</th><td class=\"num\">{d['n']}</td>"
        + "".join(f'<td class="num">{_esc(_ci_text(d[m][k]))}</td>' for m in names) + "</tr>"
        for c, d in cats.items())
    fig = _new_figure(max(6, 0.5 * len(cats) * len(names) + 2), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for i, m in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, [_num(d[m][k]["value"]) or 0.0 for d in cats.values()], width=width, label=m)
    ax.set_xticks(range(len(cats)), list(cats), rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(k)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return (f"<h3>{_esc(task)}: {_esc(k)} by category</h3><table><thead><tr><th>category</th><th>n</th>{head}</tr>"
            f"</thead><tbody>{rows}</tbody></table>" + _img(_png(fig), f"{k} by category"))


def _latency_hist(res: dict) -> bytes | None:
    names = [m for m in res["models"] if "business" in res["models"][m]]
    if not names:
        return None
    fig = _new_figure(7, 3.4)
    ax = fig.add_subplot()
    for i, m in enumerate(names):
        xs = res["models"][m]["business"]["latency"]["samples_total_s"]
        ax.hist(xs, bins=max(5, min(20, len(xs))), alpha=0.55, label=m, color=f"C{i}")
    ax.set_xlabel("total latency per request (s, batch 1)")
    ax.set_ylabel("requests")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _business_section(res: dict) -> str:
    names = [m for m in res["models"] if "business" in res["models"][m]]
    if not names:
        return '<p class="muted">Business metrics were not measured.</p>'

    def g(b, *path):
        for p in path:
            b = (b or {}).get(p)
        return b

    fields = [("first token p50 (s)", ("latency", "first_token_s", "p50")),
              ("first token p95 (s)", ("latency", "first_token_s", "p95")),
              ("total p50 (s)", ("latency", "total_s", "p50")), ("total p95 (s)", ("latency", "total_s", "p95")),
              ("tokens/s", ("latency", "tokens_per_s")), ("peak memory (bytes)", ("memory", "peak_bytes")),
              ("parameters", ("size", "parameters")), ("model bytes", ("size", "model_bytes")),
              ("adapter bytes", ("size", "adapter_bytes")), ("training device-hours", ("training", "device_hours")),
              ("training FLOPs (6·N·D)", ("training", "flops_6nd")), ("training cost", ("cost", "training_cost")),
              ("serving cost per 1k tokens", ("cost", "serving_cost_per_1k_tokens")),
              ("acceptable answers (share)", ("cost", "acceptable_share")), ("benefit", ("cost", "benefit")),
              ("ROI", ("cost", "roi"))]
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = "".join(f"<tr><th scope=\"row\">{_esc(label)}</th>" + "".join(
        f'<td class="num">{_esc(_fmt(g(res["models"][m]["business"], *path)))}</td>' for m in names) + "</tr>"
                   for label, path in fields)
    lines = "".join(f"<h3>{_esc(m)}</h3><pre>{_esc(chr(10).join(describe(res['models'][m]['business'])))}</pre>"
                    for m in names)
    assumptions = _pre_json(res["models"][names[0]]["business"]["cost"]["assumptions"])
    hist = _latency_hist(res)
    return (f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>"
            + (_img(hist, "latency histogram") if hist else "") + lines + "<h3>Assumptions</h3>" + assumptions)


def _forgetting_section(res: dict) -> str:
    f = res.get("forgetting") or {}
    if not f:
        return '<p class="muted">The forgetting probe was not run.</p>'
    rows = []
    for m, v in f.items():
        css = "down" if v["flagged"] else "up"
        rows.append(f"<tr><th scope=\"row\">{_esc(m)}</th>"
                    f"<td class=\"num\">{_esc(_fmt(v['before']['general_perplexity']))} → "
                    f"{_esc(_fmt(v['after']['general_perplexity']))} ({v['perplexity_change']:+.1%})</td>"
                    f"<td class=\"num\">{_esc(_fmt(v['before']['probe_accuracy']))} → "
                    f"{_esc(_fmt(v['after']['probe_accuracy']))}</td>"
                    f"<td class=\"{css}\">{_esc('; '.join(v['reasons']) or 'no')}</td></tr>")
    th = res.get("forgetting_thresholds", {})
    return (f'<p class="muted">General-text perplexity and multiple-choice accuracy of each model against '
            f'{_esc(res["baseline"])}; flagged above a {_esc(th.get("max_perplexity_increase"))} relative '
            f'perplexity rise or a {_esc(th.get("max_accuracy_drop"))} accuracy drop.</p>'
            f"<table><thead><tr><th>model</th><th>general perplexity</th><th>probe accuracy</th><th>flagged</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _examples_section(res: dict, rows: dict, task: str, limit: int) -> str:
    names = list(res["models"])
    first = rows[names[0]][task]
    shown = first[:limit]
    tid = "ex-" + "".join(ch if ch.isalnum() else "-" for ch in task)
    body = []
    for i, r in enumerate(shown):
        src = _text(r.get("prompt", r.get("document")))
        cells = [f"<td>{i}</td>", f"<td><details><summary>{_esc(src[:80])}</summary><pre>{_esc(src)}</pre>"
                                  f"</details></td>", f"<td><pre>{_esc(_text(r.get('reference', '')))}</pre></td>"]
        for m in names:
            x = rows[m][task][i]
            out = x.get("prediction", x.get("perplexity"))
            mark = "" if "correct" not in x else (" ✓" if x["correct"] else " ✗")
            cells.append(f"<td><pre>{_esc(_text(out))}{mark}</pre></td>")
        if any("category" in rows[m][task][i] for m in names):
            cells.append(f"<td>{_esc(r.get('category', ''))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    cat_head = "<th>category</th>" if any("category" in r for r in shown) else ""
    head = "<th>#</th><th>input</th><th>reference</th>" + "".join(f"<th>{_esc(m)}</th>" for m in names) + cat_head
    return (f'<p class="muted">{len(shown)} of {len(first)} examples; full outputs in each model\'s '
            f'{_esc(task)}.jsonl.</p><input placeholder="filter…" oninput="tlFilter(this, \'{tid}\')">'
            f'<table id="{tid}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def write_compare_report(out_dir: Path, res: dict, rows: dict, max_examples: int = 500) -> Path:
    """One self-contained HTML page for a comparison (or a single-model evaluation)."""
    out_dir = Path(out_dir)
    models = "".join(
        f"<tr><th scope=\"row\">{_esc(m)}</th><td>{_esc(v.get('ref'))}</td><td>{_esc(v.get('run_id') or DASH)}</td>"
        f"<td>{_esc(v.get('adapter') or DASH)}</td></tr>" for m, v in res["models"].items())
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(res['name'])}</title><style>{CSS}</style><script>{FILTER_JS}</script></head><body>",
        f"<h1>{_esc('comparison: ' + res['name'])}</h1>",
        f'<p class="muted">Generated {_esc(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}; baseline '
        f'{_esc(res["baseline"])}; decoding {_esc(_json(res["decoding"], None))}</p>',
        "<h2>Models</h2><table><thead><tr><th>name</th><th>ref</th><th>run</th><th>adapter</th></tr></thead>"
        f"<tbody>{models}</tbody></table>",
    ]
    for task in res["tasks"]:
        parts += [f"<h2>Task: {_esc(task)}</h2>", _task_table(res, task), _img(_ci_bars(res, task),
                                                                                f"{task} metrics with intervals")]
    if res.get("win_rates"):
        wr = res["win_rates"]
        body = "".join(f"<tr><th scope=\"row\">{_esc(m)}</th><td>{_esc(t)}</td><td class=\"num\">{_esc(_ci_text(v))}</td>"
                       f"<td>{_esc(v['counts'])}</td></tr>"
                       for m, per in wr.items() if m != "judge" for t, v in per.items())
        parts += ["<h2>Win rate (judge)</h2>",
                  f'<p class="muted">{_esc(wr["judge"])}: each model against {_esc(res["baseline"])}; a tie counts '
                  f'half; interval: percentile bootstrap over examples.</p>',
                  f"<table><thead><tr><th>model</th><th>task</th><th>win rate</th><th>counts</th></tr></thead>"
                  f"<tbody>{body}</tbody></table>"]
    if res.get("categories"):
        parts.append("<h2>Per-category breakdown</h2>")
        parts += [_category_section(res, t) for t in res["tasks"]]
    parts += ["<h2>Forgetting</h2>", _forgetting_section(res), "<h2>Business metrics</h2>", _business_section(res)]
    parts.append("<h2>Per-example outputs</h2>")
    for task in res["tasks"]:
        parts += [f"<h3>{_esc(task)}</h3>", _examples_section(res, rows, task, max_examples)]
    parts.append("</body></html>\n")
    out = out_dir / "report.html"
    _atomic_write(out, "\n".join(parts).encode("utf-8"))
    return out
