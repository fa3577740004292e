"""A project's runs, their lineage and their evaluations over the API (the console's runs, evaluations and
playground screens read these).

A run belongs to a project when one of the project's jobs made it (a training job's ``run_id``); any other
run answers 404, as if it did not exist. Everything here is read from what the run lifecycle, ``tunelab
eval``, ``tunelab export`` and ``tunelab compare`` already write (the catalog, ``lineage.json``,
``metrics.jsonl``, ``eval/``, a dataset version's ``manifest.json``): nothing is recomputed.

    GET /v1/tunelab/runs                              newest first: kind, state, base model, metrics, model name
    GET /v1/tunelab/runs/{id}                         + summary, config, exports, evaluations
    GET /v1/tunelab/runs/{id}/metrics                 every row of metrics.jsonl; ?offset=B: only the rows after
                                                      byte B (``next_offset`` of an earlier answer)
    GET /v1/tunelab/runs/{id}/lineage                 nodes (file, dataset, base_model, run, export, evaluation,
                                                      endpoint) in columns, and edges
    GET /v1/tunelab/evaluations                       the project's evaluations: each run's ``tunelab eval`` and
                                                      each comparison job (``recipe: suite``)
    GET /v1/tunelab/evaluations/{id}                  the metric table: values with intervals, differences from
                                                      the baseline with p, Holm-adjusted p, significance, verdict
    GET /v1/tunelab/evaluations/{id}/examples         side by side per example; ?task, filter, q, offset, limit
    GET /v1/tunelab/runs/{id}/evaluation[/examples]   the same for a run's own ``tunelab eval``
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at definition time.
import json
from pathlib import Path
from typing import Optional

from tunelab.platform import jobs as J
from tunelab.scoring.metrics import direction
from tunelab.workspace import Workspace, read_jsonl

FILTERS = ("all", "differ", "same", "wins")  # wins needs ?model=NAME


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def served_name(job: dict, ws: Workspace) -> Optional[str]:
    """The model name a client calls for a training job's run: its ``fine_tuned_model`` (OpenAI jobs), or the
    run id (every other succeeded training job with trained weights; tunelab.platform.inference serves both)."""
    if job.get("status") != "succeeded" or not job.get("run_id"):
        return None
    if job.get("fine_tuned_model"):
        return job["fine_tuned_model"]
    d = J.run_dir(ws, job["run_id"])
    weights = (d / "adapter" / "adapter_config.json").is_file() or (d / "model" / "config.json").is_file()
    return job["run_id"] if weights else None


def metrics_answer(path: Optional[Path], offset: Optional[int], APIError) -> dict:
    """``GET …/metrics``: the rows of a run's metrics.jsonl, and ``next_offset``, the byte where the rows that end in
    a newline end. With ``offset`` (a ``next_offset`` of an earlier answer) only the rows written after it are read
    (a live curve costs what is new, not the whole run); an offset past the end answers no rows. Without it: every
    row, as ``read_jsonl`` reads them (a last row still being written included when it parses)."""
    if offset is None:
        if path is None or not path.is_file():
            return {"object": "list", "data": [], "next_offset": 0}
        rows, next_offset = jsonl_from(path, 0, unfinished=True)
        return {"object": "list", "data": rows, "next_offset": next_offset}
    if path is None or not path.is_file():
        return {"object": "list", "data": [], "next_offset": offset}
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if 0 < offset <= size:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                raise APIError(400, f"offset {offset} is not the start of a row of metrics.jsonl: pass the "
                                    "next_offset of an earlier answer, or no offset for every row",
                               param="offset", code="invalid_offset")
    rows, next_offset = jsonl_from(path, offset)
    return {"object": "list", "data": rows, "next_offset": next_offset}


def jsonl_from(path: Path, offset: int, unfinished: bool = False) -> tuple[list, int]:
    """The rows of a JSON-lines file that is being appended to, read from byte ``offset`` (a line start) to the end,
    and the offset just after the last newline (where the next read starts). A line that is not JSON (cut by a
    kill mid-write) is skipped, as ``read_jsonl`` does; a last line without its newline is left for a later read
    unless ``unfinished`` (then it is returned when it parses, and read again by a later read from the offset)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = []
    for line in (data if unfinished else data[:end]).split(b"\n"):
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows, offset + end


def routes(api, P, need, APIError) -> None:
    from fastapi import Query

    ws, store = P.ws, P.store

    def project_jobs(p) -> list[dict]:
        return store.list_jobs(p.project, limit=100000)

    def training_jobs(p) -> dict[str, dict]:
        """run id → the project's training job that made it (only runs whose folder exists)."""
        out = {}
        for j in project_jobs(p):
            if j["run_id"] and j["command"] == "train" and j["run_id"] not in out and \
                    (J.run_dir(ws, j["run_id"]) / "config.yaml").is_file():
                out[j["run_id"]] = j
        return out

    def get_run(ref: str, p) -> tuple[str, dict]:
        jobs = training_jobs(p)
        if ref in jobs:
            return ref, jobs[ref]
        hits = [r for r in jobs if r.startswith(ref)] if len(ref) >= 4 else []
        if len(hits) == 1:
            return hits[0], jobs[hits[0]]
        raise APIError(404, f"no run '{ref}' in this project", param="run_id", code="run_not_found")

    def view(run_id: str, job: dict, row: Optional[dict]) -> dict:
        row = row or {}
        d = J.run_dir(ws, run_id)
        cfg = row.get("config") or {}
        m = cfg.get("model")
        base = row.get("base_model") or (m.get("name") if isinstance(m, dict) else None)
        return {"id": run_id, "object": "tunelab.run", "kind": row.get("kind") or run_id.split("-", 1)[0],
                "name": row.get("name"), "status": row.get("status") or job["status"],
                "base_model": base, "method": cfg.get("method"), "dataset_id": row.get("dataset_id"),
                "parent_id": row.get("parent_id"), "created_at": int(row.get("created_at") or job["created_at"]),
                "updated_at": int(row["updated_at"]) if row.get("updated_at") else None, "error": row.get("error"),
                "metrics": row.get("metrics") or {}, "job_id": job["id"], "job_status": job["status"],
                "model": served_name(job, ws), "evaluated": (d / "eval" / "metrics.json").is_file()}

    # ------------------------------------------------------------------ runs

    @api.get("/v1/tunelab/runs")
    async def list_runs(limit: int = Query(100, ge=1, le=1000), after: Optional[str] = Query(None, max_length=200),
                        kind: Optional[str] = Query(None, max_length=32), p=need("read")):
        cat = ws.catalog()
        rows = [view(r, j, cat.get_run(r)) for r, j in training_jobs(p).items()]
        rows = [r for r in rows if not kind or r["kind"] == kind]
        rows.sort(key=lambda r: (-r["created_at"], r["id"]))
        if after:
            ids = [r["id"] for r in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}

    def exports_of(run_id: str, p, cat) -> list[dict]:
        by_dir = {}
        for j in project_jobs(p):
            if j["command"] == "export" and (j["spec"] or {}).get("run") == run_id:
                by_dir[str((J.job_dir(ws, j["id"]) / "export").resolve())] = j["id"]
        out = []
        for e in cat.list_runs(kind="export", parent_id=run_id):
            info = _json(Path(e["dir"]) / "export.json") or {}
            out.append({"id": e["id"], "created_at": int(e["created_at"]), "what": info.get("kind"),
                        "merged": info.get("merged"), "dtype": info.get("dtype"),
                        "weights_bytes": (e.get("metrics") or {}).get("weights_bytes"),
                        "job_id": by_dir.get(str(Path(e["dir"]).resolve()))})
        return out

    def evaluations_of(run_id: str, cat) -> list[dict]:
        return [{"id": e["id"], "created_at": int(e["created_at"]), "metrics": e.get("metrics") or {},
                 "config": e.get("config") or {}} for e in cat.list_runs(kind="eval", parent_id=run_id)]

    @api.get("/v1/tunelab/runs/{run_id}")
    async def retrieve_run(run_id: str, p=need("read")):
        run_id, job = get_run(run_id, p)
        cat = ws.catalog()
        d = J.run_dir(ws, run_id)
        out = view(run_id, job, cat.get_run(run_id))
        out.update(summary=_json(d / "summary.json"), lineage=_json(d / "lineage.json"),
                   config=(d / "config.yaml").read_text(encoding="utf-8"),
                   exports=exports_of(run_id, p, cat), evaluations=evaluations_of(run_id, cat))
        return out

    @api.get("/v1/tunelab/runs/{run_id}/metrics")
    async def run_metrics(run_id: str, offset: Optional[int] = Query(None, ge=0), p=need("read")):
        run_id, _ = get_run(run_id, p)
        return metrics_answer(J.run_dir(ws, run_id) / "metrics.jsonl", offset, APIError)

    @api.get("/v1/tunelab/runs/{run_id}/lineage")
    async def run_lineage(run_id: str, p=need("read")):
        run_id, job = get_run(run_id, p)
        return lineage_graph(run_id, job, p)

    def lineage_graph(run_id: str, job: dict, p) -> dict:
        """raw file(s) → dataset version → run (← base model, parent run) → export(s), evaluation(s); run → the
        endpoint name that serves its weights. Columns: 0 files, 1 dataset/base/parent, 2 run, 3 outputs,
        4 endpoint."""
        cat = ws.catalog()
        d = J.run_dir(ws, run_id)
        lin = _json(d / "lineage.json") or {}
        row = cat.get_run(run_id) or {}
        files_by_path = {}
        files_by_sha = {}
        for f in store.list_files(p.project, None, 100000, None, "desc"):
            files_by_path[str(Path(f["path"]).resolve())] = f
            if f.get("sha256"):
                files_by_sha.setdefault(f["sha256"], f)
        nodes, edges = [], []

        def node(id_, type_, col, label, **detail):
            nodes.append({"id": id_, "type": type_, "column": col, "label": label, **detail})
            return id_

        run_node = node(f"run:{run_id}", "run", 2, run_id, run_id=run_id, status=row.get("status") or job["status"],
                        kind=row.get("kind"))

        def file_node(path: str, sha: Optional[str]) -> str:
            f = files_by_path.get(str(Path(path).resolve())) if path else None
            f = f or (files_by_sha.get(sha) if sha else None)
            label = f["filename"] if f else Path(path).name
            nid = f"file:{sha or path}"
            if not any(n["id"] == nid for n in nodes):
                node(nid, "file", 0, label, sha256=sha, file_id=f["id"] if f else None)
            return nid

        ds_id = lin.get("dataset_id") or row.get("dataset_id")
        if ds_id:
            version = lin.get("dataset_version")
            ds = node(f"dataset:{ds_id}", "dataset", 1, ds_id, dataset_id=ds_id, prepared=bool(version))
            edges.append({"from": ds, "to": run_node, "label": "trained on"})
            if version:  # a prepared version: its raw sources, from the run's lineage (the version's manifest)
                sources = lin.get("dataset_sources") or (_json(Path(version) / "manifest.json") or {}).get("sources", [])
                for s in sources:
                    edges.append({"from": file_node(s.get("path", ""), s.get("sha256")), "to": ds, "label": "prepared"})
            else:  # files named in the recipe: they are the dataset as read
                files = lin.get("files") or {}
                items = files.values() if isinstance(files, dict) else files
                for s in items:
                    edges.append({"from": file_node(s.get("path", ""), s.get("sha256")), "to": ds, "label": "read"})
        base = lin.get("base_model") or row.get("base_model")
        if base:
            edges.append({"from": node(f"base:{base}", "base_model", 1, Path(base).name if Path(base).is_absolute()
                                       else base, model=base), "to": run_node, "label": "base"})
        parent = lin.get("parent_id") or row.get("parent_id")
        if parent:
            mine = parent in training_jobs(p)
            edges.append({"from": node(f"run:{parent}", "run", 1, parent, run_id=parent if mine else None),
                          "to": run_node, "label": "continues"})
        for e in exports_of(run_id, p, cat):
            nid = node(f"export:{e['id']}", "export", 3, f"export ({e['what'] or 'weights'})", export_id=e["id"],
                       job_id=e["job_id"], run_id=run_id)
            edges.append({"from": run_node, "to": nid, "label": "exported"})
        for e in evaluations_of(run_id, cat):
            nid = node(f"eval:{e['id']}", "evaluation", 3, "evaluation", eval_id=e["id"], run_id=run_id)
            edges.append({"from": run_node, "to": nid, "label": "evaluated"})
        name = served_name(job, ws)
        if name:
            nid = node(f"endpoint:{name}", "endpoint", 4, name, model=name)
            edges.append({"from": run_node, "to": nid, "label": "served as"})
        return {"object": "tunelab.lineage", "run_id": run_id, "nodes": nodes, "edges": edges}

    # ------------------------------------------------------------------ evaluations

    def compare_jobs(p) -> dict[str, dict]:
        return {j["id"]: j for j in project_jobs(p)
                if j["command"] == "compare" and (J.job_dir(ws, j["id"]) / "compare" / "results.json").is_file()}

    def source(eval_id: str, p) -> dict:
        """An evaluation: a run's own ``tunelab eval`` (by run id) or a comparison job (by job id)."""
        cmp = compare_jobs(p)
        if eval_id in cmp:
            out = J.job_dir(ws, eval_id) / "compare"
            return {"kind": "compare", "id": eval_id, "dir": out, "res": _json(out / "results.json"),
                    "created_at": int(cmp[eval_id]["created_at"])}
        run_id, job = get_run(eval_id, p)
        out = J.run_dir(ws, run_id) / "eval"
        res = _json(out / "metrics.json")
        if res is None:
            raise APIError(404, f"run {run_id} has no evaluation yet; start one: POST /v1/tunelab/jobs "
                                f'{{"command": "eval", "run": "{run_id}"}}', param="run_id", code="no_evaluation")
        return {"kind": "eval", "id": run_id, "dir": out, "res": res,
                "created_at": int((out / "metrics.json").stat().st_mtime)}

    @api.get("/v1/tunelab/evaluations")
    async def list_evaluations(p=need("read")):
        out = []
        for run_id, job in training_jobs(p).items():
            res = _json(J.run_dir(ws, run_id) / "eval" / "metrics.json")
            if res:
                out.append({"id": run_id, "object": "tunelab.evaluation", "kind": "eval", "run_id": run_id,
                            "models": list(res.get("models") or {}), "tasks": ["heldout"],
                            "n_examples": res.get("n_examples"),
                            "created_at": int((J.run_dir(ws, run_id) / "eval" / "metrics.json").stat().st_mtime)})
        for jid, job in compare_jobs(p).items():
            res = _json(J.job_dir(ws, jid) / "compare" / "results.json") or {}
            out.append({"id": jid, "object": "tunelab.evaluation", "kind": "compare", "run_id": None,
                        "name": res.get("name"), "models": list(res.get("models") or {}),
                        "tasks": list(res.get("tasks") or {}), "n_examples": None, "created_at": int(job["created_at"])})
        out.sort(key=lambda e: -e["created_at"])
        return {"object": "list", "data": out}

    def table(src: dict) -> dict:
        res = src["res"]
        if src["kind"] == "eval":
            models = list(res["models"])
            diffs = res.get("differences") or {}
            rows = []
            for k in _eval_metrics(res):
                vals = {}
                for m in models:
                    v = res["models"][m].get(k)
                    ci = (res["models"][m].get("ci") or {}).get(k) or [None, None]
                    vals[m] = {"value": v, "ci_low": ci[0], "ci_high": ci[1]}
                d = diffs.get(k)
                rows.append({"metric": k, "direction": direction(k), "values": vals,
                             "differences": {models[-1]: _diff(d)} if d and len(models) > 1 else {}})
            tasks = {"heldout": {"type": "generation", "n": res.get("n_examples"), "rows": rows}}
            return {"id": src["id"], "object": "tunelab.evaluation", "kind": "eval", "run_id": src["id"],
                    "models": models, "baseline": models[0], "tasks": tasks,
                    "confidence": (res.get("bootstrap") or {}).get("confidence", 0.95),
                    "decoding": res.get("decoding"), "data": Path(res.get("data") or "").name,
                    "forgetting": res.get("forgetting"), "created_at": src["created_at"]}
        models = list(res["models"])
        tasks = {}
        for t, meta in res["tasks"].items():
            rows = []
            for k in meta["metrics"]:
                vals = {m: {kk: res["scores"][m][t][k].get(kk) for kk in ("value", "ci_low", "ci_high")}
                        for m in models}
                diffs = {m: _diff(res["differences"][m][t].get(k)) for m in models[1:]}
                rows.append({"metric": k, "direction": direction(k), "values": vals, "differences": diffs})
            tasks[t] = {"type": meta["type"], "n": meta["n"], "rows": rows}
        return {"id": src["id"], "object": "tunelab.evaluation", "kind": "compare", "run_id": None, "name": res.get("name"),
                "models": models, "baseline": res["baseline"], "tasks": tasks,
                "confidence": (res.get("bootstrap") or {}).get("confidence", 0.95), "decoding": res.get("decoding"),
                "forgetting": res.get("forgetting"), "created_at": src["created_at"]}

    def examples(src: dict, task: Optional[str], filter: str, model: Optional[str], q: Optional[str], offset: int,
                 limit: int) -> dict:
        res = src["res"]
        models = list(res["models"])
        if src["kind"] == "eval":
            task = "heldout"
            per = {m: read_jsonl(src["dir"] / f"{m}.jsonl") for m in models}
        else:
            tasks = list(res["tasks"])
            task = task or tasks[0]
            if task not in tasks:
                raise APIError(404, f"no task '{task}' in evaluation {src['id']} (tasks: {', '.join(tasks)})",
                               param="task")
            per = {m: read_jsonl(src["dir"] / m / f"{task}.jsonl") for m in models}
        if filter == "wins" and model not in models:
            raise APIError(400, f"filter 'wins' needs model= one of {', '.join(models)}", param="model")
        n = min((len(v) for v in per.values()), default=0)
        needle = (q or "").lower().strip()
        matched, shown = 0, []
        counts = {"all": n, "differ": 0}
        for i in range(n):
            rs = {m: per[m][i] for m in models}
            first = rs[models[0]]
            outs = {m: _prediction(r) for m, r in rs.items()}
            scores = {m: _score(r) for m, r in rs.items()}
            differ = len(set(outs.values())) > 1
            counts["differ"] += differ
            if filter == "differ" and not differ or filter == "same" and differ:
                continue
            if filter == "wins":
                others = [s for m, s in scores.items() if m != model]
                if scores[model] is None or any(s is None or s >= scores[model] for s in others):
                    continue
            text = first.get("prompt")
            if text is None and "document" in first:  # a perplexity task's block: which document it came from
                text = f"document {first['document']}, block {first.get('index', i)}"
            text = text or ""
            if needle and needle not in " ".join([str(text), str(first.get("reference") or ""),
                                                  *map(str, outs.values())]).lower():
                continue
            if offset <= matched < offset + limit:
                shown.append({"index": first.get("index", i), "prompt": text, "reference": first.get("reference"),
                              "category": first.get("category"),
                              "outputs": {m: {"text": outs[m], "score": scores[m]} for m in models}})
            matched += 1
        return {"object": "list", "evaluation": src["id"], "task": task, "models": models, "filter": filter,
                "data": shown, "offset": offset, "limit": limit, "matched": matched, "total": n, "counts": counts,
                "has_more": offset + limit < matched, "score": _score_name(per, models)}

    @api.get("/v1/tunelab/evaluations/{eval_id}")
    async def retrieve_evaluation(eval_id: str, p=need("read")):
        return table(source(eval_id, p))

    @api.get("/v1/tunelab/runs/{run_id}/evaluation")
    async def run_evaluation(run_id: str, p=need("read")):
        run_id, _ = get_run(run_id, p)
        return table(source(run_id, p))

    def ex_params(task, filter, model, q, offset, limit):
        if filter not in FILTERS:
            raise APIError(400, f"filter must be one of {', '.join(FILTERS)}", param="filter")
        return task, filter, model, q, offset, limit

    @api.get("/v1/tunelab/evaluations/{eval_id}/examples")
    async def evaluation_examples(eval_id: str, task: Optional[str] = Query(None, max_length=200),
                                  filter: str = Query("all", max_length=16), model: Optional[str] = Query(None, max_length=500),
                                  q: Optional[str] = Query(None, max_length=500), offset: int = Query(0, ge=0, le=2 ** 31),
                                  limit: int = Query(20, ge=1, le=500), p=need("read")):
        return examples(source(eval_id, p), *ex_params(task, filter, model, q, offset, limit))

    @api.get("/v1/tunelab/runs/{run_id}/evaluation/examples")
    async def run_evaluation_examples(run_id: str, filter: str = Query("all", max_length=16),
                                      model: Optional[str] = Query(None, max_length=500),
                                      q: Optional[str] = Query(None, max_length=500),
                                      offset: int = Query(0, ge=0, le=2 ** 31), limit: int = Query(20, ge=1, le=500),
                                      p=need("read")):
        run_id, _ = get_run(run_id, p)
        return examples(source(run_id, p), *ex_params(None, filter, model, q, offset, limit))


EVAL_SHOWN = ("rougeL", "rouge1", "rouge2", "bleu", "chrf", "exact_match", "perplexity", "generated_tokens",
              "generation_s", "generation_tokens_per_s")


def _eval_metrics(res: dict) -> list[str]:
    """The figures ``tunelab eval`` prints, in its order, that the evaluation holds."""
    return [k for k in EVAL_SHOWN if any(isinstance(r.get(k), (int, float)) for r in res["models"].values())]


def _diff(d: Optional[dict]) -> Optional[dict]:
    if not d:
        return None
    return {k: d.get(k) for k in ("difference", "ci_low", "ci_high", "p_value", "p_value_adjusted", "significant",
                                  "verdict")}


def _prediction(r: dict) -> str:
    v = r.get("prediction")
    if v is None and "perplexity" in r:
        return f"perplexity {r['perplexity']}"
    return "" if v is None else str(v)


def _score(r: dict) -> Optional[float]:
    """One per-example score to say which model won an example: ROUGE-L where the evaluation kept it (tunelab
    eval), else correctness (classification, multiple choice), else exact match with the reference, else
    minus the perplexity (a perplexity task)."""
    if isinstance(r.get("rougeL"), (int, float)):
        return float(r["rougeL"])
    if isinstance(r.get("correct"), bool):
        return float(r["correct"])
    if r.get("prediction") is not None and r.get("reference") is not None:
        return float(str(r["prediction"]).strip() == str(r["reference"]).strip())
    if isinstance(r.get("perplexity"), (int, float)):
        return -float(r["perplexity"])
    return None


def _score_name(per: dict, models: list) -> str:
    first = next((rows[0] for rows in per.values() if rows), {})
    if isinstance(first.get("rougeL"), (int, float)):
        return "rougeL"
    if isinstance(first.get("correct"), bool):
        return "correctness"
    if "prediction" in first:
        return "exact match"
    return "perplexity (lower)"
