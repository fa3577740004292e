"""``tunelab compare SUITE``: N models (base, tuned variants, a distilled student) on one suite, one report.

Every model answers the same tasks with the same decoding. Each score carries a bootstrap interval,
and each model's difference from the baseline (the first model) carries a paired-bootstrap
interval and p-value on the same examples (tunelab/scoring/stats.py). Per model it also measures the
business figures (tunelab/eval/business.py) and, when enabled, runs the general-capability probe
to flag catastrophic forgetting against the baseline.

Writes ``<workspace>/evals/<id>/``: ``results.json``, ``<model>/<task>.jsonl`` per-example outputs
and ``report.html``; the comparison is recorded in the catalog (kind ``compare``).
"""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path

from tunelab._console import console, show, status, table
from tunelab.errors import TunelabError
from tunelab.eval import suites as S
from tunelab.eval.business import business_metrics, describe, quality_share, reset_peak_memory
from tunelab.eval.report import write_compare_report
from tunelab.eval.suites import (
    SuiteConfig,  # noqa: F401 (the recipes registry reads it here)
    _prompt_ids,
    forgetting_verdict,
)
from tunelab.models import refs
from tunelab.scoring.metrics import direction, mark_verdict
from tunelab.scoring.stats import bootstrap_ci, holm, paired_bootstrap, restrict, value
from tunelab.workspace import Workspace, write_json


def parse_models(specs: list[str]) -> list[dict]:
    """``name=ref`` strings → model specs (a bare ref is named after itself)."""
    out = []
    for s in specs:
        name, sep, ref = s.partition("=")
        if not sep:
            name, ref = re.sub(r"[^\w.-]+", "_", Path(s).name or s), s
        if not name or not ref:
            raise TunelabError(f"--model '{s}': write NAME=REF (a run id, a model folder or a packaged name)")
        out.append({"name": name, "ref": ref})
    return out


def load_model(ref: str, ws: Workspace):
    """A run id, model folder or packaged name → (model, tokenizer, info)."""
    import transformers

    transformers.logging.set_verbosity_error()
    start = refs.resolve(ref, ws)
    tok, added = refs.load_tokenizer(start)
    if added:  # no template of its own: prompts go in as plain text (the fallback only serves training)
        tok.chat_template = None
    model = refs.load(start, device=refs.eval_device()).eval()
    run_dir = ws.find_run(ref)
    return model, tok, {"ref": ref, "base_path": str(start.path),
                        "adapter": str(start.adapter) if start.adapter else None,
                        "run_id": start.run_id, "run_dir": str(run_dir) if run_dir else None}


def run(cfg, ws, **kw) -> dict:
    """``recipe: suite`` run from Python (the recipes registry): ``tunelab compare`` on the suite's models."""
    return run_compare(cfg, ws, **kw)


def run_compare(suite, ws: Workspace, *, models: list[str] | None = None,
                overrides: list[str] | None = None, limit: int | None = None, out: Path | None = None,
                business: bool = True) -> dict:
    """``suite``: a suite file, or a SuiteConfig (relative paths then resolve from the current folder)."""
    if isinstance(suite, S.SuiteConfig):
        cfg, base_dir, suite_path = suite, Path.cwd(), None
    else:
        cfg, base_dir = S.load_suite(suite, overrides)
        suite_path = Path(suite).resolve()
    specs = parse_models(models) if models else [m.model_dump() for m in cfg.models]
    if not specs:
        raise TunelabError("no models to compare: list them under models: in the suite or give --model NAME=REF")
    names = [m["name"] for m in specs]
    if len(set(names)) != len(names):
        raise TunelabError(f"model names must be unique ({', '.join(names)})")
    if limit:
        cfg = cfg.model_copy(update={"tasks": [t.model_copy(update={"limit": limit}) for t in cfg.tasks]})
    tasks = [S.load_task(t, base_dir) for t in cfg.tasks]
    bcfg = cfg.business
    slug = re.sub(r"[^\w.-]+", "-", cfg.name)
    cid = f"compare-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out) if out else ws.root / "evals" / cid
    out_dir.mkdir(parents=True, exist_ok=True)

    scored: dict[str, dict] = {}  # model → task → Scored
    rows: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for spec in specs:
        name = spec["name"]
        gc.collect()
        peak_reset = reset_peak_memory() if business else []  # this model's peak, not the ones before it
        status(f"compare: model {len(info) + 1} of {len(specs)}, {name} ({spec['ref']}): loading")
        model, tok, meta = load_model(spec["ref"], ws)
        scored[name], rows[name] = {}, {}
        t0 = time.perf_counter()
        for k, task in enumerate(tasks, 1):
            status(f"{name}: task {k} of {len(tasks)}, {task.name} ({task.type}, {len(task.items)} items)")
            s, r, g = S.run_task(task, model, tok, cfg.decoding, cfg.bootstrap, model_name=name)
            scored[name][task.name], rows[name][task.name] = s, r
            (out_dir / name).mkdir(exist_ok=True)
            (out_dir / name / f"{task.name}.jsonl").write_text("".join(S.dumps(x) + "\n" for x in r),
                                                                 encoding="utf-8")
        meta["eval_s"] = round(time.perf_counter() - t0, 2)
        if business:
            first = next((t for t in tasks if t.type == "generation"), None) or tasks[0]
            texts = [it.get("prompt") or it.get("text", "")[:400] for it in first.items[: bcfg.latency_requests]]
            chat = first.type == "generation" and bool(getattr(tok, "chat_template", None))
            prompts = [_prompt_ids(tok, t, chat) for t in texts]
            per = next((sc.values[bcfg.quality_metric].get("per_example") for sc in scored[name].values()
                        if bcfg.quality_metric in sc.values), None)
            meta["business"] = business_metrics(model, tok, prompts, bcfg,
                                                adapter_dir=Path(meta["adapter"]) if meta["adapter"] else None,
                                                run_dir=Path(meta["run_dir"]) if meta["run_dir"] else None,
                                                peak_reset=peak_reset, quality=quality_share(name, per, bcfg),
                                                name=name)
        if cfg.forgetting.enabled:
            meta["probe"] = S.probe(model, tok, cfg.forgetting, base_dir, model_name=name)
        info[name] = meta
        del model
        gc.collect()

    status(f"paired bootstrap differences against {names[0]} ({cfg.bootstrap.n_resamples} resamples)")
    res = assemble(cfg, tasks, specs, scored, info)
    if cfg.judge is not None:
        res["win_rates"] = S.judge_win_rates(cfg, ws, names[0], rows, tasks)
    res.update({"id": cid, "suite": str(suite_path) if suite_path else None, "out": str(out_dir)})
    write_json(out_dir / "results.json", S.json_safe(res))

    status(f"writing the report in {out_dir}")
    res["report"] = str(write_compare_report(out_dir, res, rows, cfg.max_examples_in_report))
    cat = ws.catalog()
    cat.add_run(id=cid, kind="compare", dir=out_dir, name=cfg.name, status="completed",
                config={"suite": res["suite"], "models": specs, "limit": limit})
    flat = {f"{m}:{t}:{k}": v["value"] for m, ts in res["scores"].items() for t, ms in ts.items()
            for k, v in ms.items()}
    flat.update({f"{m}:forgetting_flagged": f["flagged"] for m, f in res.get("forgetting", {}).items()})
    cat.update_run(cid, metrics=S.json_safe(flat))
    return res


def assemble(cfg, tasks, specs, scored, info) -> dict:
    """Scores, paired differences against the baseline, per-category breakdowns and forgetting flags."""
    b = cfg.bootstrap
    names = [m["name"] for m in specs]
    baseline = names[0]
    scores = {m: {t.name: {k: {kk: vv for kk, vv in v.items() if kk != "per_example"}
                           for k, v in scored[m][t.name].values.items()} for t in tasks} for m in names}
    diffs: dict = {}
    for m in names[1:]:
        diffs[m] = {}
        for t in tasks:
            diffs[m][t.name] = {}
            for k in scored[m][t.name].values:
                d = paired_bootstrap(scored[baseline][t.name].stats[k], scored[m][t.name].stats[k],
                                     n_resamples=b.n_resamples, confidence=b.confidence, seed=b.seed)
                diffs[m][t.name][k] = d
    # every difference is one test of one family: Holm–Bonferroni over all of them, significance on the adjusted p
    alpha = 1 - b.confidence
    family = [d for per_task in diffs.values() for per_metric in per_task.values() for d in per_metric.values()]
    for d, adj in zip(family, holm([d["p_value"] for d in family], alpha)):
        d["p_value_adjusted"] = adj
        d["significant"] = adj is not None and adj < alpha
        d["significant_unadjusted"] = d["p_value"] is not None and d["p_value"] < alpha
    for per_task in diffs.values():
        for per_metric in per_task.values():
            for k, d in per_metric.items():
                mark_verdict(k, d, None if d["p_value_adjusted"] is None else d["significant"])
    categories: dict = {}
    for t in tasks:
        cats = sorted({it.get("category") for it in t.items if it.get("category") is not None})
        if not cats:
            continue
        categories[t.name] = {}
        for c in cats:
            idx = [i for i, it in enumerate(t.items) if it.get("category") == c]
            categories[t.name][c] = {"n": len(idx)}
            for m in names:
                categories[t.name][c][m] = {}
                for k, st in scored[m][t.name].stats.items():
                    sub = restrict(st, idx)
                    try:
                        v = value(sub)
                    except Exception:
                        v = None
                    lo, hi = bootstrap_ci(sub, n_resamples=min(b.n_resamples, 300), confidence=b.confidence,
                                          seed=b.seed)
                    categories[t.name][c][m][k] = {"value": v, "ci_low": lo, "ci_high": hi}
    forgetting = {}
    if cfg.forgetting.enabled:
        for m in names[1:]:
            forgetting[m] = forgetting_verdict(info[baseline]["probe"], info[m]["probe"], cfg.forgetting)
    return {"name": cfg.name, "baseline": baseline, "models": {m: {**s, **info[m]} for m, s in zip(names, specs)},
            "tasks": {t.name: {"type": t.type, "source": t.source, "rejected": len(t.rejected),
                               # perplexity resamples token blocks, the other tasks records
                               "n": next(iter(scored[baseline][t.name].values.values()))["n"],
                               "metrics": list(scored[baseline][t.name].values)} for t in tasks},
            "decoding": cfg.decoding.model_dump(), "bootstrap": b.model_dump(), "scores": scores,
            "differences": diffs,
            "multiple_comparisons": {"method": "holm", "alpha": alpha,
                                     "tests": sum(d["p_value"] is not None for d in family),
                                     "note": "p_value_adjusted: Holm-Bonferroni over every difference in this "
                                             "comparison (all models, tasks and metrics); significant uses it"},
            "categories": categories, "forgetting": forgetting,
            "forgetting_thresholds": cfg.forgetting.model_dump()}


_DIRECTION_WORDS = {"higher": "higher is better", "lower": "lower is better", "neutral": "neutral"}


def print_compare(res: dict) -> None:
    c = console()
    names = list(res["models"])
    mc = res.get("multiple_comparisons") or {"tests": 0, "alpha": 1 - res["bootstrap"]["confidence"]}
    c.print(f"value [{res['bootstrap']['confidence']:.0%} bootstrap interval] (difference [its interval], p from a "
            f"paired bootstrap vs {res['baseline']}, Holm p: p adjusted by Holm-Bonferroni over all {mc['tests']} "
            f"differences; * marks Holm p < {mc['alpha']:.2g}: verdict). 'better'/'worse' only where Holm p < "
            f"{mc['alpha']:.2g}, in the metric's direction", soft_wrap=True, markup=False)
    for task, meta in res["tasks"].items():
        t = table("metric", *names, title=f"{task} ({meta['type']}, {meta['n']} examples)", right=tuple(names))
        for k in meta["metrics"]:
            cells = []
            for m in names:
                v = res["scores"][m][task][k]
                cell = f"{v['value']:.4g}"
                if v["ci_low"] is not None:
                    cell += f" [{v['ci_low']:.4g}, {v['ci_high']:.4g}]"
                if m != res["baseline"]:
                    d = res["differences"][m][task][k]
                    p = "—" if d["p_value"] is None else f"{d['p_value']:.3g}"
                    pa = "—" if d.get("p_value_adjusted") is None else f"{d['p_value_adjusted']:.3g}"
                    ci = "" if d.get("ci_low") is None else f" [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"
                    cell += (f" ({d['difference']:+.3g}{ci}, p={p}, Holm p={pa}{' *' if d.get('significant') else ''}"
                             f": {d.get('verdict', '—')})")
                cells.append(cell)
            t.add_row(f"{k} ({_DIRECTION_WORDS[direction(k)]})", *cells)
        show(c, t)
    wr = res.get("win_rates")
    if wr:
        for m, per in wr.items():
            if m == "judge":
                continue
            for task, v in per.items():
                ci = "" if v["ci_low"] is None else f" [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
                c.print(f"win rate of {m} over {res['baseline']} on {task} ({wr['judge']}): {v['value']:.3f}{ci} "
                        f"{v['counts']}")
    for m, f in res.get("forgetting", {}).items():
        flag = "FLAGGED: " + "; ".join(f["reasons"]) if f["flagged"] else "no forgetting flagged"
        c.print(f"forgetting probe {m} vs {res['baseline']}: general perplexity "
                f"{f['before']['general_perplexity']:.4g} → {f['after']['general_perplexity']:.4g}, probe accuracy "
                f"{f['before']['probe_accuracy']:.3f} → {f['after']['probe_accuracy']:.3f}: {flag}")
    for m in names:
        if "business" in res["models"][m]:
            c.print(f"[bold]{m}[/bold]")
            for line in describe(res["models"][m]["business"]):
                c.print("  " + line)
    c.print(f"report: {res['report']}")
