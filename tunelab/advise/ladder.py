"""``tunelab advise --measure TASK.yaml``: the customization ladder measured on the user's own data.

    tunelab advise --measure examples/ladder_support.yaml
    tunelab validate examples/ladder_support.yaml          # a task is a recipe (recipe: ladder)

Every rung answers the same held-out examples with the same greedy decoding
(tunelab/models/generation.py), one model load per base model:

1. zero-shot: the task's instruction (and system prompt) before each query;
2. few-shot: the k training examples nearest to each query (MiniLM vectors, tunelab/data/retrieval.py) as
   earlier turns;
3. RAG: the top-k passages of an index over the task's documents (or the training pairs) in the prompt;
   recall@k when held-out records name their gold documents;
4. LoRA pilot: the SFT recipe (tunelab/train/sft.py) on 2–3 nested subsets within the time budget, each
   evaluated like the rungs above, and a power-law learning curve projected to the full training set;
5. existing runs named by the task, evaluated the same way.

Written to ``<workspace>/runs/ladder-<name>-<stamp>/``: report.json, report.html, predictions per rung,
the RAG and few-shot indexes (``tunelab serve MODEL --rag <run>/rag-index``) and ``next/`` with the recipe
of the next step. The verdict logic is tunelab/advise/verdict.py.
"""

from __future__ import annotations

import datetime
import html
import json
import random
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from tunelab import config as cfglib
from tunelab._console import console, show, table
from tunelab.advise import verdict as V
from tunelab.config import Strict
from tunelab.data import retrieval
from tunelab.data.formats import BadRecord, to_messages
from tunelab.data.loaders import load_records
from tunelab.environment import capture as environment
from tunelab.errors import TunelabError
from tunelab.models import refs
from tunelab.models.generation import generate
from tunelab.scoring import metrics as M
from tunelab.scoring.stats import bootstrap_ci, holm, mean_statistic, paired_bootstrap
from tunelab.scoring.stats import value as stat_value
from tunelab.sections import LoraSection, TrainSection
from tunelab.train import sft
from tunelab.train.numerics import prompt_ids
from tunelab.workspace import Workspace, write_json

RUNG_ORDER = ("zero_shot", "few_shot", "rag", "lora_pilot", "lora_full", "existing")


class LadderData(Strict):
    train: str = Field(description="training examples (.jsonl/.json/.csv; alpaca, prompt/completion or messages): "
                                   "the few-shot pool, the LoRA pilot's data")
    heldout: str = Field(description="held-out examples every rung answers")
    format: Literal["auto", "alpaca", "prompt_completion", "messages"] = "auto"
    instruction: str | None = Field(None, description="put before each query (every rung, and the pilot's data)")
    system_prompt: str | None = Field(None, description="system message for every rung")
    heldout_limit: int | None = Field(200, ge=2, description="answer the first N held-out examples")
    documents: str | None = Field(None, description="document collection for RAG: a folder of .txt/.md, or a "
                                                    "JSONL/JSON/CSV file with a text field")
    document_text_field: str = "text"
    document_id_field: str = "id"
    gold_field: str | None = Field(None, description="held-out record field with the id(s) of the documents that "
                                                     "answer it: recall@k of the retrieval")
    max_length: int = Field(512, ge=16, description="tokens per training example in the pilot")


class Target(Strict):
    metric: str = Field("rougeL", description="the metric the verdict is about (one of metrics)")
    value: float = Field(description="the level a rung must reach with its whole bootstrap interval")


class Budget(Strict):
    minutes: float = Field(30.0, gt=0, description="wall-clock for the whole ladder; the pilot gets what the "
                                                   "prompting rungs leave")
    price_per_hour: float = Field(1.0, ge=0, description="price of one hour of the compute this runs on")
    requests: int = Field(100_000, ge=1, description="requests expected over the deployment: total cost = "
                                                     "one-time cost + cost per request x requests")
    max_cost_per_1k: float | None = Field(None, gt=0, description="a rung above this cost per 1k requests is "
                                                                  "ruled out")
    max_latency_p95_s: float | None = Field(None, gt=0, description="a rung above this p95 latency is ruled out")


class Generation(Strict):
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1, description="held-out prompts decoded together; latency is the batch's "
                                                 "time (1: single-request latency)")


class Rung(Strict):
    enabled: bool = True


class FewShot(Rung):
    k: int = Field(3, ge=1, description="training examples per query, nearest first")


class Rag(Rung):
    k: int = Field(3, ge=1, description="passages per query")
    over: Literal["auto", "documents", "train"] = Field(
        "auto", description="index the documents, or the training pairs; auto: the documents when given")
    chunk_words: int = Field(120, ge=8, description="words per document passage")
    index: Literal["auto", "flat", "hnsw"] = Field("auto", description="faiss index: flat (exact) or hnsw; auto: "
                                                                       "hnsw from 100k passages")


class Pilot(Rung):
    sizes: list[int] | None = Field(None, description="training subset sizes (2-3, nested); default: the "
                                                      "largest that fits max_examples, its half and quarter")
    max_examples: int = Field(256, ge=4, description="largest pilot subset (auto sizes)")
    min_examples: int = Field(8, ge=2)
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection(epochs=2, early_stopping_patience=None)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        if v is not None and (len(v) < 1 or len(v) > 4 or any(n < 2 for n in v)):
            raise ValueError("give 1-4 subset sizes of at least 2 examples (2-3 give a learning curve)")
        return sorted(set(v)) if v is not None else v


class LadderConfig(Strict):
    """A measured-ladder task: models, data, metrics, target, budgets, and which rungs to run."""

    recipe: Literal["ladder"] = "ladder"
    name: str | None = Field(None, description="a short name used in the run id")
    models: list[str] = Field(min_length=1, description="base models (packaged names, folders, hub ids); the "
                                                        "pilot trains on the first")
    trust_remote_code: bool = False
    embedder: str | None = Field(None, description="sentence encoder folder; default: the packaged MiniLM")
    data: LadderData
    metrics: list[str] = Field(default_factory=lambda: ["rougeL"], description="scored on every rung")
    target: Target
    budget: Budget = Budget()
    generation: Generation = Generation()
    zero_shot: Rung = Rung()
    few_shot: FewShot = FewShot()
    rag: Rag = Rag()
    pilot: Pilot = Pilot()
    existing: list[str] = Field(default_factory=list, description="runs (ids or folders) to measure as rungs")
    n_resamples: int = Field(1000, ge=10)
    seed: int = 0

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v):
        try:
            names = M.resolve_names(v)
        except TunelabError as e:
            raise ValueError(str(e)) from None
        bad = [n for n in names if n not in M.GENERATION_METRICS and n not in M.BERTSCORE
               and n != "contains_reference"]
        if bad:
            raise ValueError(f"{', '.join(bad)}: the ladder scores generated text; use "
                             f"{', '.join(M.GENERATION_METRICS)} or bertscore")
        return names

    @model_validator(mode="after")
    def _target_metric(self):
        if self.target.metric not in self.metrics:
            raise ValueError(f"target.metric '{self.target.metric}' is not among metrics ({', '.join(self.metrics)})")
        if self.rag.over == "documents" and not self.data.documents:
            raise ValueError("rag.over: documents needs data.documents")
        return self

    @classmethod
    def recipe_problems(cls, data: dict, files: bool = False) -> list[str]:
        if not files or not isinstance(data.get("data"), dict):
            return []
        d = data["data"]
        return [f"data.{k}: file not found: {d[k]}" for k in ("train", "heldout", "documents")
                if isinstance(d.get(k), str) and not Path(d[k]).exists()]


# ----------------------------------------------------------------------------- data


def _examples(path: str, cfg: LadderConfig, limit: int | None, rejects: list, gold: bool = False) -> list[dict]:
    """{query, reference, messages (system + user), gold} per record; unusable records go to ``rejects``."""
    d = cfg.data

    def convert(rec):
        msgs = to_messages(rec, d.format, None)
        if msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs):
            raise BadRecord("needs a user turn and a reference answer")
        g = rec.get(d.gold_field) if gold and d.gold_field and isinstance(rec, dict) else None
        return {"context": msgs[:-2], "query": msgs[-2]["content"], "reference": msgs[-1]["content"],
                "gold": [str(x) for x in g] if isinstance(g, list) else ([str(g)] if g is not None else None)}

    return load_records(path, convert, rejects, limit)


def _short(model: str) -> str:
    """A model's name for the report: a folder's last part, else the name as given."""
    p = Path(model)
    return p.name if len(p.parts) > 1 and p.name else model


def _chat(ex: dict, cfg: LadderConfig, mode: str = "none", hits=()) -> list[dict]:
    msgs = [*ex["context"], {"role": "user", "content": ex["query"]}]
    return retrieval.augment(msgs, list(hits), mode, cfg.data.instruction, cfg.data.system_prompt)


# ----------------------------------------------------------------------------- measuring one rung


def _measure(label: str, rung: str, model, tokenizer, chats: list[list[dict]], examples: list[dict],
             cfg: LadderConfig, *, retrieval_s: float = 0.0, one_time_s: float = 0.0, extra: dict | None = None):
    """Answer ``chats`` with the project's generation loop and score them; returns (row, per-metric statistics)."""
    import numpy as np

    prompts = [prompt_ids(tokenizer, c) for c in chats]
    t0 = time.perf_counter()
    preds, gstats = generate(model, tokenizer, prompts, cfg.generation.max_new_tokens, cfg.generation.batch_size,
                             desc=label)
    gen_s = time.perf_counter() - t0
    n = len(prompts)
    refs = [e["reference"] for e in examples]
    boot = {"n_resamples": cfg.n_resamples, "seed": cfg.seed}
    scored = M.evaluate(cfg.metrics, preds, refs, **boot)
    per_query_ret = retrieval_s / max(n, 1)
    per_request_s = gen_s / max(n, 1) + per_query_ret
    lat = np.asarray([s.get("batch_time_s", gen_s / max(n, 1)) + per_query_ret for s in gstats])
    price = cfg.budget.price_per_hour
    # the proxy: entities of the answer found nowhere in its prompt (input, examples, retrieved passages)
    miss_tot = [V.unsupported(p, [m["content"] for m in c]) for p, c in zip(preds, chats)]
    # ... nor in the reference answer: stated facts that are likely wrong
    miss_ref = [V.unsupported(p, [m["content"] for m in c] + [r]) for p, c, r in zip(preds, chats, refs)]
    hal = {}
    for key, pairs in (("unsupported_entity_rate", miss_tot), ("unsupported_not_in_reference_rate", miss_ref)):
        st = V.rate_statistic([a for a, _ in pairs], [b for _, b in pairs])
        lo, hi = bootstrap_ci(st, **boot)
        hal[key] = {"value": stat_value(st), "ci_low": lo, "ci_high": hi}
        scored.stats[key] = st
    hal["answers_with_entities"] = sum(1 for _, t in miss_tot if t)
    row = {
        "label": label, "rung": rung, "n": n,
        "scores": {k: {x: v.get(x) for x in ("value", "ci_low", "ci_high")} for k, v in scored.values.items()},
        "hallucination_proxy": hal,
        "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
        "prompt_tokens_per_request": float(np.mean([len(p) for p in prompts])),
        "generated_tokens_per_request": float(np.mean([s.get("new_tokens", 0) for s in gstats])),
        "generation_s": round(gen_s, 3), "retrieval_s": round(retrieval_s, 4),
        "compute_s_per_request": per_request_s,
        "one_time_s": round(one_time_s, 3), "one_time_cost": one_time_s / 3600 * price,
        "cost_per_1k": per_request_s * 1000 / 3600 * price,
        **(extra or {}),
    }
    rows = [{"index": i, "query": examples[i]["query"], "reference": refs[i], "prediction": preds[i],
             "prompt_tokens": len(prompts[i]), **{k: v["per_example"][i] for k, v in scored.values.items()
                                                   if "per_example" in v}}
            for i in range(n)]
    return row, scored.stats, rows


def _paired(prev_stats: dict, cur_stats: dict, metrics: list[str], boot: dict) -> dict:
    out = {m: paired_bootstrap(prev_stats[m], cur_stats[m], **boot) for m in metrics}
    for m, adj in zip(metrics, holm([out[m]["p_value"] for m in metrics])):
        out[m]["p_value_adjusted"] = adj
        M.mark_verdict(m, out[m], None if adj is None else adj < 0.05)
    return out


# ----------------------------------------------------------------------------- the ladder


def run(cfg: LadderConfig, ws: Workspace | None = None) -> dict:
    """Measure every enabled rung; write report.json/report.html and the next step's recipe; return the report."""
    import transformers

    ws = ws or Workspace.resolve()
    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    deadline = t_start + cfg.budget.minutes * 60
    rejects: list[dict] = []
    train = _examples(cfg.data.train, cfg, None, rejects)
    held = _examples(cfg.data.heldout, cfg, cfg.data.heldout_limit, rejects, gold=True)
    if len(held) < 2:
        raise TunelabError(f"{cfg.data.heldout}: {len(held)} usable held-out example(s); the ladder needs at least 2 "
                           f"({len(rejects)} rejected)")
    if not train:
        raise TunelabError(f"{cfg.data.train}: no usable training examples ({len(rejects)} rejected)")
    for m in cfg.models:  # a model that cannot be found fails before anything is written
        refs.resolve(m, ws, trust_remote_code=cfg.trust_remote_code)
    run_id, out = ws.new_run_dir("ladder", cfg.name)
    (out / "config.yaml").write_text(cfglib.dump(cfg), encoding="utf-8")
    cat = ws.catalog()
    cat.add_run(id=run_id, kind="ladder", dir=out, name=cfg.name, status="running", base_model=cfg.models[0],
                config=cfg.model_dump(mode="json"))
    try:
        report = _climb(cfg, ws, run_id, out, train, held, rejects, t_start, deadline)
    except BaseException as e:
        cat.update_run(run_id, status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                       error=str(e)[:500])
        raise
    cat.update_run(run_id, status="completed",
                   metrics={"verdict": report["verdict"]["sentence"][:200], "minutes": report["minutes"]})
    return report


def _climb(cfg: LadderConfig, ws: Workspace, run_id: str, out: Path, train: list[dict], held: list[dict],
           rejects: list[dict], t_start: float, deadline: float) -> dict:
    import numpy as np

    boot = {"n_resamples": cfg.n_resamples, "seed": cfg.seed}
    rows: list[dict] = []
    stats: list[dict | None] = []
    notes: list[str] = []
    pred_dir = out / "predictions"
    pred_dir.mkdir()
    retrieval_info: dict = {}

    # the indexes (built once, shared by every model)
    embedder = None
    fewshot_index = rag_index = None
    fewshot_hits = rag_hits = None
    queries = [e["query"] for e in held]
    if cfg.few_shot.enabled or cfg.rag.enabled:
        embedder = retrieval.Embedder(cfg.embedder)
        t0 = time.perf_counter()
        q_vecs = embedder.encode(queries)
        q_embed_s = time.perf_counter() - t0
    if cfg.few_shot.enabled:
        t0 = time.perf_counter()
        fewshot_index = retrieval.build([e["query"] for e in train], [f"train#{i}" for i in range(len(train))],
                                        embedder=embedder, extras=[{"answer": e["reference"]} for e in train],
                                        meta={"mode": "few_shot", "k": cfg.few_shot.k,
                                              "instruction": cfg.data.instruction,
                                              "system_prompt": cfg.data.system_prompt})
        fs_build = time.perf_counter() - t0
        by_text: dict[str, set] = {}
        for i, e in enumerate(train):
            by_text.setdefault(e["query"].strip(), set()).add(i)
        excl = [by_text.get(q.strip(), set()) for q in queries]  # a held-out query's own copy is not an example
        t0 = time.perf_counter()
        fewshot_hits = fewshot_index.search_vectors(q_vecs, cfg.few_shot.k, excl)
        fs_search = time.perf_counter() - t0 + q_embed_s
        fewshot_index.save(out / "fewshot-index")
        retrieval_info["few_shot"] = {"passages": len(train), "build_s": round(fs_build, 3),
                                      "search_s_per_query": (fs_search) / len(queries),
                                      "excluded_exact_copies": sum(len(x) for x in excl)}
    if cfg.rag.enabled:
        over = cfg.rag.over if cfg.rag.over != "auto" else ("documents" if cfg.data.documents else "train")
        t0 = time.perf_counter()
        if over == "documents":
            docs = retrieval.read_documents(cfg.data.documents, cfg.data.document_text_field,
                                            cfg.data.document_id_field)
            ids, texts, sources = retrieval.chunk(docs, cfg.rag.chunk_words)
        else:
            ids = [f"train#{i}" for i in range(len(train))]
            texts = [f"Q: {e['query']}\nA: {e['reference']}" for e in train]
            sources = ids
        if not texts:
            raise TunelabError(f"RAG: nothing to index ({over} is empty)")
        rag_index = retrieval.build(texts, ids, sources=sources, embedder=embedder, kind=cfg.rag.index,
                                    meta={"mode": "rag", "k": cfg.rag.k, "over": over,
                                          "instruction": cfg.data.instruction,
                                          "system_prompt": cfg.data.system_prompt})
        rag_build = time.perf_counter() - t0
        excl = None
        if over == "train":
            by_q: dict[str, set] = {}
            for i, e in enumerate(train):
                by_q.setdefault(e["query"].strip(), set()).add(i)
            excl = [by_q.get(q.strip(), set()) for q in queries]
        t0 = time.perf_counter()
        rag_hits = rag_index.search_vectors(q_vecs, cfg.rag.k, excl)
        rag_search = time.perf_counter() - t0 + q_embed_s
        rag_index.save(out / "rag-index")
        info = {"over": over, "passages": len(texts), "index": rag_index.meta["kind"], "build_s": round(rag_build, 3),
                "search_s_per_query": rag_search / len(queries)}
        golds = [e["gold"] for e in held]
        if any(g for g in golds):
            per = []
            for g, hits in zip(golds, rag_hits):
                if g:
                    got = {h.source for h in hits} | {h.id for h in hits}
                    per.append(len(set(g) & got) / len(set(g)))
            st = mean_statistic(per)
            lo, hi = bootstrap_ci(st, **boot)
            info[f"recall@{cfg.rag.k}"] = {"value": float(np.mean(per)), "ci_low": lo, "ci_high": hi, "n": len(per)}
        retrieval_info["rag"] = info

    def record(row, st, per_rows):
        prev = next((s for s in reversed(stats) if s is not None), None)
        row["vs_previous"] = None if prev is None else {"label": rows[[i for i, s in enumerate(stats)
                                                                       if s is not None][-1]]["label"],
                                                         **_paired(prev, st, cfg.metrics, boot)}
        rows.append(row)
        stats.append(st)
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in row["label"])
        (pred_dir / f"{len(rows):02d}-{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_rows), encoding="utf-8")
        s = row["scores"][cfg.target.metric]
        console().print(f"  {row['label']}: {cfg.target.metric} {s['value']:.4f} "
                        f"[{_f(s['ci_low'])}, {_f(s['ci_high'])}]  p95 {row['latency_p95_s']:.3f}s")

    # prompting rungs, per model
    for mname in cfg.models:
        ref = refs.resolve(mname, ws, trust_remote_code=cfg.trust_remote_code)
        tok, _ = refs.load_tokenizer(ref)
        model = refs.load(ref, device=refs.eval_device())
        if cfg.zero_shot.enabled:
            record(*_measure(f"{_short(mname)} zero-shot", "zero_shot", model, tok, [_chat(e, cfg) for e in held], held, cfg,
                             extra={"model": mname}))
        if cfg.few_shot.enabled:
            fs = retrieval_info["few_shot"]
            record(*_measure(f"{_short(mname)} few-shot k={cfg.few_shot.k}", "few_shot", model, tok,
                             [_chat(e, cfg, "few_shot", h) for e, h in zip(held, fewshot_hits)], held, cfg,
                             retrieval_s=fs["search_s_per_query"] * len(held), one_time_s=fs["build_s"],
                             extra={"model": mname, "index": str(out / "fewshot-index")}))
        if cfg.rag.enabled:
            ri = retrieval_info["rag"]
            chats = [_chat(e, cfg, "rag", h) for e, h in zip(held, rag_hits)]
            row, st, per_rows = _measure(f"{_short(mname)} RAG k={cfg.rag.k}", "rag", model, tok, chats, held, cfg,
                                         retrieval_s=ri["search_s_per_query"] * len(held), one_time_s=ri["build_s"],
                                         extra={"model": mname, "index": str(out / "rag-index"),
                                                **({"retrieval_recall": ri[f"recall@{cfg.rag.k}"]}
                                                   if f"recall@{cfg.rag.k}" in ri else {})})
            for r, hits in zip(per_rows, rag_hits):
                r["sources"] = [h.id for h in hits]
            record(row, st, per_rows)
        del model

    curve = None
    if cfg.pilot.enabled:
        curve = _pilot(cfg, ws, run_id, out, train, held, deadline, rows, stats, record, notes)
    for ref_s in cfg.existing:
        r = refs.resolve(ref_s, ws)
        tok, _ = refs.load_tokenizer(r)
        model = refs.load(r, device=refs.eval_device())
        record(*_measure(f"run {r.run_id or ref_s}", "existing", model, tok, [_chat(e, cfg) for e in held], held,
                         cfg, extra={"model": ref_s}))
        del model

    decision = V.decide(rows, cfg.target.metric, cfg.target.value, requests=cfg.budget.requests,
                        max_cost_per_1k=cfg.budget.max_cost_per_1k, max_latency_p95_s=cfg.budget.max_latency_p95_s)
    nxt = _next_step(cfg, out, train, rows, decision)
    minutes = (time.perf_counter() - t_start) / 60
    if minutes > cfg.budget.minutes:
        notes.append(f"the ladder took {minutes:.1f} min, over the budget of {cfg.budget.minutes:g} min")
    report = {"kind": "ladder", "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "run_id": run_id, "task": cfg.name, "dir": str(out), "n_heldout": len(held), "n_train": len(train),
              "rejected": len(rejects), "decoding": {"strategy": "greedy", **cfg.generation.model_dump()},
              "target": cfg.target.model_dump(), "budget": cfg.budget.model_dump(), "metrics": cfg.metrics,
              "retrieval": retrieval_info, "rungs": rows, "learning_curve": curve, "verdict": decision,
              "next": nxt, "notes": notes, "minutes": round(minutes, 2),
              "bootstrap": {**boot, "confidence": 0.95, "method": "percentile over held-out examples"},
              "environment": environment()}
    write_json(out / "report.json", report)
    if rejects:
        (out / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects), encoding="utf-8")
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    report["report"] = str(out / "report.html")
    return report


def _subset_file(path: Path, items: list[dict], cfg: LadderConfig) -> Path:
    """Training chats as the rungs prompt them (system prompt, instruction), in messages format."""
    with open(path, "w", encoding="utf-8") as f:
        for e in items:
            msgs = _chat(e, cfg) + [{"role": "assistant", "content": e["reference"]}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def _sft_config(cfg: LadderConfig, train_file: Path, name: str):
    return sft.SFTConfig(name=name, model={"name": cfg.models[0], "trust_remote_code": cfg.trust_remote_code},
                     data={"train": str(train_file), "format": "messages", "max_length": cfg.data.max_length},
                     method="lora", lora=cfg.pilot.lora, train=cfg.pilot.train,
                     eval={"max_new_tokens": cfg.generation.max_new_tokens,
                           "batch_size": cfg.generation.batch_size})


def _pilot(cfg, ws, run_id, out, train, held, deadline, rows, stats, record, notes):
    """LoRA on nested subsets, smallest first, each only when its predicted time fits the budget."""
    n_full = len(train)
    if cfg.pilot.sizes:
        sizes = [n for n in cfg.pilot.sizes if n <= n_full]
    else:
        top = min(n_full, cfg.pilot.max_examples)
        sizes = sorted({max(cfg.pilot.min_examples, top // 4), max(cfg.pilot.min_examples, top // 2), top})
        sizes = [n for n in sizes if n <= n_full]
    order = list(range(n_full))
    random.Random(cfg.seed).shuffle(order)  # nested subsets: each smaller one inside the larger
    pdir = out / "pilot"
    pdir.mkdir()
    done_sizes, done_stats, per_example_s, eval_s = [], [], None, 0.0
    last_row = None
    for n in sizes:
        left = deadline - time.perf_counter()
        if per_example_s is not None:
            need = per_example_s * n * cfg.pilot.train.epochs + eval_s
            if need > left:
                notes.append(f"pilot n={n} skipped: predicted {need / 60:.1f} min, {max(left, 0) / 60:.1f} min left "
                             f"in the budget")
                continue
        elif left <= 0:
            notes.append("pilot skipped: the prompting rungs used the whole time budget")
            break
        f = _subset_file(pdir / f"train-{n}.jsonl", [train[i] for i in order[:n]], cfg)
        console().print(f"  LoRA pilot on {n} examples ...")
        t0 = time.perf_counter()
        try:
            summary = sft.run(_sft_config(cfg, f, f"pilot{n}"), ws, parent_id=run_id)
        except TunelabError as e:  # the prompting rungs stand; the report says why the pilot did not
            notes.append(f"pilot n={n} failed: {e}")
            break
        train_s = time.perf_counter() - t0
        per_example_s = train_s / (n * cfg.pilot.train.epochs)
        r = refs.resolve(str(ws.run_dir(summary["run_id"])), ws)
        tok, _ = refs.load_tokenizer(r)
        model = refs.load(r, device=refs.eval_device())
        t0 = time.perf_counter()
        row, st, per_rows = _measure(f"{_short(cfg.models[0])} LoRA pilot n={n}", "lora_pilot", model, tok,
                                     [_chat(e, cfg) for e in held], held, cfg, one_time_s=train_s,
                                     extra={"model": cfg.models[0], "pilot_run": summary["run_id"],
                                            "train_examples": n, "train_s": round(train_s, 2)})
        eval_s = time.perf_counter() - t0
        del model
        record(row, st, per_rows)
        last_row = row
        done_sizes.append(n)
        done_stats.append(st[cfg.target.metric])
    if not done_sizes:
        return None
    curve = V.learning_curve(done_sizes, done_stats, cfg.target.metric, n_full, n_resamples=cfg.n_resamples,
                             seed=cfg.seed)
    curve["seconds_per_example_epoch"] = per_example_s
    if curve.get("fitted") and n_full > done_sizes[-1]:
        full_s = per_example_s * n_full * cfg.pilot.train.epochs
        proj = {"label": f"{_short(cfg.models[0])} LoRA full set n={n_full} (projected)", "rung": "lora_full",
                "projected": True, "n": len(held), "model": cfg.models[0], "train_examples": n_full,
                "scores": {cfg.target.metric: {"value": curve["projection"], "ci_low": curve.get("ci_low"),
                                               "ci_high": curve.get("ci_high")}},
                # serving a full-set adapter costs what serving the pilot's adapter cost
                **{k: last_row[k] for k in ("latency_p50_s", "latency_p95_s", "prompt_tokens_per_request",
                                            "cost_per_1k", "compute_s_per_request")},
                "one_time_s": round(full_s, 1), "one_time_cost": full_s / 3600 * cfg.budget.price_per_hour,
                "vs_previous": None, "note": "projected by the learning curve; training time from the pilot's "
                                             "seconds per example"}
        rows.append(proj)
        stats.append(None)
    return curve


def _next_step(cfg: LadderConfig, out: Path, train: list[dict], rows: list[dict], decision: dict) -> dict:
    """Write ``next/`` with what the verdict says to do, and return the exact command."""
    nd = out / "next"
    nd.mkdir(exist_ok=True)
    i = decision.get("choice")
    chosen = rows[i] if i is not None else None
    rung = chosen["rung"] if chosen else None
    if rung in ("zero_shot", "few_shot", "rag"):
        model = chosen["model"]
        if rung == "zero_shot":
            idx = None
        else:
            idx = chosen["index"]
        cmd = f"tunelab serve {model}" + (f" --rag {idx}" if idx else "")
        serve = {"model": model, "rag": idx, "system_prompt": cfg.data.system_prompt,
                 "instruction": cfg.data.instruction,
                 "note": ("the index folder carries the instruction, system prompt and k: the server prompts as "
                          "the ladder measured" if idx else
                          "send the system prompt and put the instruction before each query, as measured")}
        (nd / "serve.yaml").write_text(yaml.safe_dump(serve, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return {"command": cmd, "file": str(nd / "serve.yaml"), "why": decision["sentence"]}
    if rung == "existing":
        return {"command": f"tunelab serve {chosen['model']}", "file": None, "why": decision["sentence"]}
    if chosen is None and decision.get("interval_too_wide"):
        # an interval's width falls with the square root of the examples: four times as many halve it
        n = rows[decision["best"]]["n"]
        more = cfg.model_copy(deep=True)
        more.data.heldout_limit = 4 * n
        (nd / "ladder.yaml").write_text(cfglib.dump(more), encoding="utf-8")
        return {"command": f"tunelab advise --measure {nd / 'ladder.yaml'}", "file": str(nd / "ladder.yaml"),
                "why": decision["sentence"],
                "note": f"the same ladder on up to {4 * n} held-out examples (the held-out file may hold fewer)"}
    # a LoRA rung won, or nothing met the target: the next step up is training on the full set
    data_file = _subset_file(nd / "train.jsonl", train, cfg)
    sft_cfg = _sft_config(cfg, data_file, cfg.name or "ladder")
    sft_cfg.data.test = str(Path(cfg.data.heldout).resolve())
    raw = sft_cfg.model_dump(mode="json", exclude_defaults=False)
    (nd / "sft.yaml").write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    why = decision["sentence"] if chosen else (decision["sentence"] + "; the next rung is a LoRA run on the full "
                                                                      "training set")
    return {"command": f"tunelab train {nd / 'sft.yaml'}", "file": str(nd / "sft.yaml"), "why": why,
            "note": "the held-out set is the recipe's data.test, so 'tunelab eval RUN' scores the same examples "
                    "(the instruction and system prompt are in the training file, not in data.test's queries)"}


# ----------------------------------------------------------------------------- output


def _f(x, d: int = 4) -> str:
    return "—" if x is None else f"{x:.{d}g}"


def _cells(report: dict) -> tuple[list[str], list[list[str]]]:
    m = report["target"]["metric"]
    heads = ["rung", f"{m} [95% CI]", "Δ vs previous [CI]", "p95 s", "p50 s", "prompt tok", "one-time cost",
             "per 1k req", "unsupported"]
    out = []
    for r in report["rungs"]:
        s = r["scores"][m]
        d = (r.get("vs_previous") or {}).get(m)
        hal = (r.get("hallucination_proxy") or {}).get("unsupported_entity_rate")
        out.append([r["label"] + (" *" if r.get("projected") else ""),
                    f"{_f(s['value'])} [{_f(s.get('ci_low'))}, {_f(s.get('ci_high'))}]",
                    "—" if not d else f"{d['difference']:+.3g} [{_f(d['ci_low'], 3)}, {_f(d['ci_high'], 3)}] "
                                      f"{d['verdict']}",
                    _f(r.get("latency_p95_s"), 3), _f(r.get("latency_p50_s"), 3),
                    _f(r.get("prompt_tokens_per_request"), 4), _f(r.get("one_time_cost"), 3),
                    _f(r.get("cost_per_1k"), 3),
                    "—" if not hal else f"{hal['value']:.2f} [{_f(hal['ci_low'], 2)}, {_f(hal['ci_high'], 2)}]"])
    return heads, out


def print_report(report: dict) -> None:
    con = console()
    heads, body = _cells(report)
    t = table(*heads, right=tuple(heads[1:]),
              title=f"measured ladder: {report['n_heldout']} held-out examples, greedy decoding, "
                    f"target {report['target']['metric']} {report['target']['value']:g}")
    for row in body:
        t.add_row(*row)
    show(con, t)
    rag = (report.get("retrieval") or {}).get("rag") or {}
    for k, v in rag.items():
        if k.startswith("recall@"):
            con.print(f"retrieval {k}: {v['value']:.3f} [{_f(v['ci_low'], 3)}, {_f(v['ci_high'], 3)}] "
                      f"over {v['n']} queries with gold documents")
    c = report.get("learning_curve")
    if c and c.get("fitted"):
        con.print(f"learning curve: {c['law']}, a={c['a']:.4g}, b={c['b']:.3g}; projected at n={c['full_size']}: "
                  f"{c['projection']:.4g} [{_f(c.get('ci_low'))}, {_f(c.get('ci_high'))}] ({c['note']})",
                  soft_wrap=True)
    if any(r.get("projected") for r in report["rungs"]):
        con.print("* projected from the pilot's learning curve, not measured")
    con.print("unsupported: share of numbers/names in answers found nowhere in the prompt (input, examples, "
              "retrieved passages)", soft_wrap=True)
    for n in report.get("notes") or []:
        con.print(f"note: {n}", soft_wrap=True)
    con.print(f"[bold]verdict[/bold]: {report['verdict']['sentence']}", soft_wrap=True)
    con.print(f"next: {report['next']['command']}", soft_wrap=True)
    con.print(f"report: {report.get('report')}  ({report['minutes']} min)", soft_wrap=True)


def render_html(report: dict) -> str:
    """A self-contained page: the table, retrieval, learning curve, verdict and next command."""
    e = html.escape
    heads, body = _cells(report)
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
    parts = [f"<h1>tunelab measured ladder {e(report['run_id'])}</h1>",
             (f"<p>{report['n_heldout']} held-out examples, greedy decoding, target "
              f"{e(report['target']['metric'])} {report['target']['value']:g}; {report['minutes']} min</p>"),
             "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in heads) + f"</tr>{rows}</table>",
             f"<h2>Verdict</h2><p><b>{e(report['verdict']['sentence'])}</b></p>",
             f"<p>Next: <code>{e(report['next']['command'])}</code></p>"]
    for k, v in ((report.get("retrieval") or {}).get("rag") or {}).items():
        if k.startswith("recall@"):
            parts.append(f"<p>Retrieval {e(k)}: {v['value']:.3f} [{_f(v['ci_low'], 3)}, {_f(v['ci_high'], 3)}]</p>")
    c = report.get("learning_curve")
    if c:
        pts = ", ".join(f"n={n}: {s:.4g}" for n, s in zip(c["sizes"], c["scores"]))
        txt = f"Pilot points: {pts}. "
        if c.get("fitted"):
            txt += (f"{c['law']}: a={c['a']:.4g}, b={c['b']:.3g}; projected at n={c['full_size']}: "
                    f"{c['projection']:.4g} [{_f(c.get('ci_low'))}, {_f(c.get('ci_high'))}]. {c['note']}")
        else:
            txt += c.get("note", "")
        parts.append(f"<h2>Learning curve</h2><p>{e(txt)}</p>")
    for n in report.get("notes") or []:
        parts.append(f"<p>Note: {e(n)}</p>")
    parts.append("<p>Unsupported: share of numbers/names in the answers found nowhere in the prompt. Costs: "
                 f"{report['budget']['price_per_hour']:g} per compute hour; total cost counts "
                 f"{report['budget']['requests']:,} requests.</p>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ladder {e(report['run_id'])}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
