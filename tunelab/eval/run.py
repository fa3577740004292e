"""``tunelab eval``: the base and the tuned model on the same held-out set, fixed decoding.

Writes ``<run>/eval/{base,tuned}.jsonl`` (one row per example), ``<run>/eval/metrics.json``,
records the evaluation in the catalog as a child of the run, and refreshes ``report.html``.

A LoRA-family adapter is scored merged into the base weights, after the base was scored with the
adapter off (``merge_decision``; docs/evaluation.md says why and when not).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab import config as cfglib
from tunelab import recipes
from tunelab._console import console, show, status, table
from tunelab.data.loaders import load_chats
from tunelab.errors import TunelabError
from tunelab.eval.business import (BusinessSection, business_metrics, describe, describe_speed, quality_share,
                                   speed_differences)
from tunelab.eval.report import write_report
from tunelab.eval.suites import ForgettingSection, forgetting_verdict, probe
from tunelab.models import refs
from tunelab.models.generation import generate
from tunelab.scoring import metrics as M
from tunelab.scoring.metrics import direction, mark_verdict
from tunelab.scoring.stats import holm, paired_bootstrap
from tunelab.sections import ChatDataSection
from tunelab.train.numerics import prompt_ids, response_nll_per_example, tokenize_all_chats
from tunelab.workspace import Workspace, read_jsonl, write_json


def _load_cfg(run_dir: Path):
    import yaml

    raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    cls, _ = recipes.get(raw.get("recipe", "sft"))
    return cfglib.validate(cls, raw, str(run_dir / "config.yaml"))


def evaluate_run(ref: str, ws: Workspace, data: Path | None = None, limit: int | None = None,
                 with_base: bool = True, *, business: bool = True, forgetting: bool = True,
                 business_cfg: dict | None = None, forgetting_cfg: dict | None = None,
                 n_resamples: int = 1000, seed: int = 0, merge: bool = True) -> dict:
    """Base vs tuned on the held-out set: every metric with a bootstrap interval, the tuned − base
    difference with a paired-bootstrap p-value, business metrics and the forgetting probe.

    A LoRA adapter (DoRA, rsLoRA) is scored merged into the base weights, as a merged export or a
    single-adapter deployment runs it: the base is scored first (adapter off), then the adapter is folded
    in (``refs.lora_merge_blocker`` says when it cannot be); ``merge=False`` scores it unmerged, as loaded."""
    import transformers

    transformers.logging.set_verbosity_error()
    run_dir = ws.run_dir(ref)
    run_id = run_dir.name
    cfg = _load_cfg(run_dir)

    if not isinstance(getattr(cfg, "data", None), ChatDataSection) or not hasattr(cfg.eval, "max_new_tokens"):
        raise TunelabError(f"run {run_id} is a '{cfg.recipe}' run: 'tunelab eval' scores generated answers of "
                           f"instruction-tuned runs; this recipe reports its own held-out metrics in "
                           f"{run_dir / 'summary.json'} (and 'tunelab runs show {run_id}')")
    data_path = str(data) if data else cfg.data.test
    if not data_path:
        raise TunelabError("no held-out set: give --data FILE or set data.test in the recipe")
    rejects: list[dict] = []
    chats = load_chats(data_path, cfg.data, rejects, limit or cfg.eval.limit)
    if not chats:
        raise TunelabError(f"no usable examples in {data_path} ({len(rejects)} rejected)")
    adapter = run_dir / "adapter"
    tuned_ref = refs.resolve(str(run_dir), ws)  # its adapter on the base in its lineage, or its model/
    tokenizer, _ = refs.load_tokenizer(tuned_ref, chat_template=False)  # saved with the run: same template
    # a recipe without `model:` (distill: teacher/student) records in lineage.json the base its weights sit on
    base_ref = cfg.model.name if hasattr(cfg, "model") else json.loads(
        (run_dir / "lineage.json").read_text(encoding="utf-8"))["base_model_path"]

    prompts = [prompt_ids(tokenizer, c) for c in chats]
    references = [c[-1]["content"] for c in chats]
    feats, _ = tokenize_all_chats(tokenizer, chats, cfg.data.max_length)
    gen_cfg = {"strategy": "greedy", "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size}

    status(f"eval {run_id}: {len(chats)} held-out examples from {data_path}"
           + (f" ({len(rejects)} rejected)" if rejects else "") + f"; loading the tuned model")
    tuned = refs.load(tuned_ref)  # with an adapter: a PeftModel, so the base is the same weights, adapter off
    base = None
    if with_base and tuned_ref.adapter is None:  # a full fine-tune: the base is a second model
        status(f"loading the base model {base_ref}")
        base = refs.load(refs.resolve(base_ref, ws, trust_remote_code=tuned_ref.trust_remote_code, runs=False))
    tuned_model = merge_decision(tuned, merge)
    if tuned_model["adapter"] is not None:
        status(f"tuned: {tuned_model['adapter']} adapter "
               + ("merged into the base weights for scoring" + (" (the base is scored first, adapter off)"
                                                                  if with_base else "")
                  if tuned_model["merged"] else f"scored unmerged: {tuned_model['why']}"))

    bcfg = BusinessSection(**(business_cfg or {}))
    fcfg = ForgettingSection(**(forgetting_cfg or {}))
    boot = {"n_resamples": n_resamples, "seed": seed}
    scored: dict[str, dict] = {}
    extras: dict[str, dict] = {"business": {}, "probe": {}}

    def score(model, name: str) -> tuple[dict, list[dict]]:
        t0 = time.perf_counter()
        preds, gstats = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                 desc=f"{name}: generate")
        gen_s = time.perf_counter() - t0
        nlls, counts = response_nll_per_example(model, feats, cfg.eval.batch_size, tokenizer.pad_token_id,
                                                desc=f"{name}: reference perplexity")
        status(f"{name}: metrics with {n_resamples}-resample bootstrap intervals over {len(chats)} examples")
        text = M.evaluate(M.GENERATION_METRICS, preds, references, **boot)
        ppl = M.evaluate(["perplexity"], nlls, counts, **boot)
        scored[name] = {**text.stats, **ppl.stats}
        m = text.flat()
        m["perplexity"] = ppl.values["perplexity"]["value"]
        m["ci"] = {k: [v["ci_low"], v["ci_high"]] for k, v in {**text.values, **ppl.values}.items()}
        if business:
            quality = quality_share(name, text.values.get(bcfg.quality_metric, {}).get("per_example"), bcfg)
            extras["business"][name] = business_metrics(model, tokenizer, prompts, bcfg,
                                                        adapter_dir=adapter if name == "tuned" and adapter.is_dir()
                                                        else None, run_dir=run_dir if name == "tuned" else None,
                                                        quality=quality, name=name,
                                                        adapter_off=name == "base" and adapter.is_dir())
        if forgetting:
            extras["probe"][name] = probe(model, tokenizer, fcfg, model_name=name)
        new_tokens = sum(s["new_tokens"] for s in gstats)
        m["generated_tokens"] = new_tokens
        m["generation_s"] = round(gen_s, 3)
        m["generation_tokens_per_s"] = round(new_tokens / gen_s, 2) if gen_s > 0 else None
        per = text.values["rougeL"]["per_example"]
        rows = [{"index": i, "prompt": chats[i][-2]["content"] if len(chats[i]) > 1 else "",
                 "reference": references[i], "prediction": preds[i], "rougeL": per[i],
                 "response_nll": nlls[i], "response_tokens": counts[i], **gstats[i]}
                for i in range(len(chats))]
        return m, rows

    results: dict[str, dict] = {}
    rows_by_model: dict[str, list[dict]] = {}

    def score_base() -> None:  # the same weights with the adapter off, or a second model (a full fine-tune)
        if not with_base:
            return
        if adapter.is_dir():
            with tuned.disable_adapter():
                results["base"], rows_by_model["base"] = score(tuned, "base")
        else:
            results["base"], rows_by_model["base"] = score(base, "base")

    if tuned_model["merged"]:  # the base first, on the unmerged weights; then W + BA in place, the base is gone
        score_base()
        tuned = tuned.merge_and_unload()
        results["tuned"], rows_by_model["tuned"] = score(tuned, "tuned")
    else:
        results["tuned"], rows_by_model["tuned"] = score(tuned, "tuned")
        score_base()

    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    for name, rows in rows_by_model.items():
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
    order = ["base", "tuned"] if "base" in results else ["tuned"]
    res = {"run_id": run_id, "data": str(Path(data_path).resolve()), "n_examples": len(chats),
           "rejected": len(rejects), "decoding": gen_cfg, "tuned_model": tuned_model,
           "models": {k: results[k] for k in order},
           "bootstrap": {**boot, "confidence": 0.95, "method": "percentile over examples"}}
    if "base" in scored:
        status(f"tuned − base: paired bootstrap ({n_resamples} resamples) over {len(chats)} examples")
        res["differences"] = paired_differences(scored["base"], scored["tuned"], res["models"]["base"],
                                                res["models"]["tuned"], boot)
    if extras["business"]:  # tuned, base: the order it had before merged scoring put the base first
        res["business"] = {k: extras["business"][k] for k in ("tuned", "base") if k in extras["business"]}
        if "base" in extras["business"]:
            res["speed_differences"] = speed_differences(extras["business"]["base"], extras["business"]["tuned"],
                                                         **boot)
    if "base" in extras["probe"] and "tuned" in extras["probe"]:
        res["forgetting"] = forgetting_verdict(extras["probe"]["base"], extras["probe"]["tuned"], fcfg)
        _mark_forgetting(ws, run_dir, res["forgetting"])
    write_json(out / "metrics.json", res)
    eval_id = f"eval-{run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    cat = ws.catalog()
    cat.add_run(id=eval_id, kind="eval", dir=out, parent_id=run_id, base_model=base_ref, status="completed",
                config={"data": data_path, "limit": limit, "decoding": gen_cfg})
    cat.update_run(eval_id, metrics={f"{m}_{k}": v for m, r in res["models"].items() for k, v in r.items()
                                     if k in ("rougeL", "bleu", "perplexity")})
    status(f"writing {run_dir / 'report.html'}")
    res["report"] = str(report_run(run_id, ws))
    return res


def merge_decision(model, merge: bool = True) -> dict:
    """Whether the tuned model is scored with its adapter merged into the base weights, and why (or why not):
    the ``tuned_model`` record of metrics.json."""
    kind = refs.adapter_kind(model)
    blocker = refs.lora_merge_blocker(model)
    if blocker is None and not merge:
        blocker = "merging was turned off (--no-merge): scored as loaded, as base + adapter serving runs it"
    why = blocker or ("a LoRA-family adapter on an unquantized base: folded into the base weights (peft "
                      "merge_and_unload; the base, when evaluated, is scored first), so the tuned model runs at the base "
                      "model's speed; its scores equal the unmerged model's up to floating-point rounding")
    return {"adapter": kind, "merged": blocker is None, "why": why}


def paired_differences(base: dict, tuned: dict, base_values: dict, tuned_values: dict, boot: dict,
                       confidence: float = 0.95) -> dict:
    """tuned − base for every figure: a paired bootstrap on the same examples (interval, p and Holm's p over
    the tested metrics) where per-example scores exist (``base``/``tuned``: metric → Statistic), the plain
    difference elsewhere (generated tokens, seconds: not tested). Each carries its direction and the verdict
    a report may print: better/worse only where the adjusted p is below 1 − ``confidence``."""
    alpha = 1 - confidence
    out: dict = {}
    for k in tuned:
        out[k] = paired_bootstrap(base[k], tuned[k], confidence=confidence, **boot)
    tested = list(out)
    for k, adj in zip(tested, holm([out[k]["p_value"] for k in tested], alpha)):
        out[k]["p_value_adjusted"] = adj
        out[k]["significant"] = adj is not None and adj < alpha
        mark_verdict(k, out[k], None if adj is None else out[k]["significant"])
    for k, v in tuned_values.items():
        b = base_values.get(k)
        if k in out or isinstance(v, bool) or not isinstance(v, (int, float)) or not isinstance(b, (int, float)):
            continue
        out[k] = mark_verdict(k, {"difference": v - b, "ci_low": None, "ci_high": None, "p_value": None,
                                  "p_value_adjusted": None, "significant": None, "n": None}, None)
    return out


def _mark_forgetting(ws: Workspace, run_dir: Path, verdict: dict) -> None:
    """Record the probe's verdict on the run itself: summary.json and the catalog row."""
    p = run_dir / "summary.json"
    if p.is_file():
        s = json.loads(p.read_text(encoding="utf-8"))
        s["forgetting_flagged"] = verdict["flagged"]
        s["forgetting_probe"] = {"general_perplexity_change": verdict["perplexity_change"],
                                 "probe_accuracy_change": verdict["accuracy_change"], "reasons": verdict["reasons"]}
        write_json(p, s)
    cat = ws.catalog()
    row = cat.get_run(run_dir.name)
    if row is not None:
        cat.update_run(run_dir.name, metrics={**(row.get("metrics") or {}), "forgetting_flagged": verdict["flagged"]})


def report_run(ref: str, ws: Workspace) -> Path:
    """Gather a run's files and write its report.html."""
    run_dir = ws.run_dir(ref)

    def _json(name):
        p = run_dir / name
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None

    import yaml

    ev = _json("eval/metrics.json")
    samples = None
    if ev:
        per = {m: read_jsonl(run_dir / "eval" / f"{m}.jsonl") for m in ev["models"]}
        first = next(iter(per.values()))
        samples = [{"id": r["index"], "prompt": r["prompt"], "reference": r["reference"],
                    "outputs": {m: per[m][i]["prediction"] for m in per if i < len(per[m])}}
                   for i, r in enumerate(first)]
    return write_report(
        run_dir,
        title=f"tunelab run {run_dir.name}",
        config=yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")),
        summary=_json("summary.json") or {"run_id": run_dir.name, "status": "not finished"},
        metrics_rows=read_jsonl(run_dir / "metrics.jsonl"),
        eval_metrics=ev,
        samples=samples,
        lineage=_json("lineage.json"),
        environment=_json("environment.json"),
    )


def print_eval(res: dict) -> None:
    models = list(res["models"])
    diffs = res.get("differences") or {}
    both = len(models) == 2 and bool(diffs)
    conf = (res.get("bootstrap") or {}).get("confidence", 0.95)
    heads = ["metric", *models] + (["tuned − base [interval]", "Holm p", "verdict"] if both else [])
    t = table(*heads, right=tuple(heads[1:-1]), title=f"held-out evaluation: {res['n_examples']} examples, greedy "
                                                      f"decoding; [{conf:.0%} bootstrap interval]")
    ways = {"higher": "↑ better", "lower": "↓ better", "neutral": "neutral"}
    shown = ("rougeL", "rouge1", "rouge2", "bleu", "chrf", "exact_match", "perplexity", "generated_tokens",
             "generation_s", "generation_tokens_per_s")
    for k in shown:
        vals = [res["models"][m].get(k) for m in models]
        if all(v is None for v in vals):
            continue
        cells = []
        for m, v in zip(models, vals):
            cell = f"{v:.4f}" if isinstance(v, float) else str(v)
            ci = (res["models"][m].get("ci") or {}).get(k)
            if ci and ci[0] is not None:
                cell += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
            cells.append(cell)
        if both:
            d = diffs.get(k)
            if d is None:
                cells += ["—", "—", "—"]
            else:
                ci = "" if d.get("ci_low") is None else f" [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
                pa = d.get("p_value_adjusted")
                cells += [f"{d['difference']:+.4f}{ci}", "—" if pa is None else f"{pa:.3g}", d["verdict"]]
        t.add_row(f"{k} ({ways[direction(k)]})", *cells)
    con = console()
    show(con, t)
    if both:
        by = {v: [k for k in shown if k in diffs and diffs[k]["verdict"] == v] for v in ("better", "worse")}
        con.print(f"tuned vs base: better on {', '.join(by['better']) or 'nothing'}; worse on "
                  f"{', '.join(by['worse']) or 'nothing'} (a verdict only where the paired bootstrap's "
                  f"Holm-adjusted p < {1 - conf:.2g}; tokens and seconds generated are neutral)", soft_wrap=True)
    f = res.get("forgetting")
    if f:
        flag = "FLAGGED: " + "; ".join(f["reasons"]) if f["flagged"] else "not flagged"
        con.print(f"forgetting probe: general perplexity {f['before']['general_perplexity']:.4g} → "
                  f"{f['after']['general_perplexity']:.4g} ({f['perplexity_change']:+.1%}), probe accuracy "
                  f"{f['before']['probe_accuracy']:.3f} → {f['after']['probe_accuracy']:.3f}: {flag}")
    if res.get("business"):
        for m, b in res["business"].items():
            con.print(f"[bold]{m}[/bold]")
            for line in describe(b):
                con.print("  " + line)
        for line in describe_speed(res.get("speed_differences") or {}):
            con.print(line)
    if res.get("report"):
        con.print(f"report: {res['report']}")
