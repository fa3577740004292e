"""lm-evaluation-harness task files (the lm-eval 0.4.x YAML format) with a local dataset.

``read_task(path)`` turns a task file into the records a tunelab task scores, building each
prompt the way lm-eval 0.4.13 builds its context for that document (``ConfigurableTask.fewshot_context``
without a chat template):

    description + Σ over the few-shot docs (text + target_delimiter + answer + fewshot_delimiter) + text

- the dataset is ``datasets.load_dataset(dataset_path, dataset_name, **dataset_kwargs)`` as in lm-eval,
  restricted to local files (``dataset_path``: json, csv, parquet, text, arrow); a relative data file
  is looked up next to the task file first, then in the current folder;
- ``process_docs`` is applied to every split (the few-shot one included);
- the evaluated docs are ``test_split``, else ``validation_split``; few-shot docs come from
  ``fewshot_config.split`` / ``fewshot_split``, else ``training_split``, else ``validation_split``, else
  ``test_split``; the evaluated doc is left out of its own shots only when the few-shot split *is* the
  test split (lm-eval's rule, which compares the two split names);
- the ``default`` sampler is one ``random.Random(fewshot_seed)`` (lm-eval's ``fewshot_random_seed``,
  default 1234) drawing ``rnd.sample(pool, n)`` (``n + 1`` then dropping the doc itself when it is to
  be left out) for each evaluated doc in order; ``first_n`` takes the first n;
- ``!function module.name`` imports ``module.py`` from the task file's folder (else an importable
  module), exactly like lm-eval: this runs the Python code in that folder;
- ``include:`` merges a base YAML (relative to the including file; the including file's keys win).

The log-likelihood side (how a context and a continuation are tokenized) is in
``suites.choice_logliks``; the agreement with lm-eval itself is tested in
``tests/unit/test_lm_eval_agreement.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import random
import sys
from pathlib import Path

from tunelab._optional import require
from tunelab.errors import TunelabError
from tunelab.eval.templates import find_path, jinja_env

OUTPUT_TYPES = {"multiple_choice": "multiple_choice", "generate_until": "generation",
                "loglikelihood_rolling": "perplexity"}
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
DEFAULT_FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED, simple_evaluate's fewshot_random_seed


# ----------------------------------------------------------------------------- the YAML


def _import_function(qual: str, folder: Path):
    """lm-eval's ``!function``: ``utils.process_docs`` → ``process_docs`` from ``folder/utils.py``."""
    mod_path, _, fn_name = qual.rpartition(".")
    if not mod_path:
        raise TunelabError(f"!function {qual}: write module.function (from the task file in {folder})")
    local = (folder / f"{mod_path.replace('.', '/')}.py").resolve()
    if local.exists():
        name = str(local.with_suffix(""))  # lm-eval's module name for a file outside its task tree
        mod = sys.modules.get(name)
        mtime = local.stat().st_mtime_ns
        if mod is None or getattr(mod, "__mtime__", None) != mtime:
            spec = importlib.util.spec_from_file_location(name, local)
            mod = importlib.util.module_from_spec(spec)
            mod.__mtime__ = mtime
            spec.loader.exec_module(mod)
            sys.modules[name] = mod
    else:
        try:
            mod = __import__(mod_path, fromlist=[fn_name])
        except ImportError:
            raise TunelabError(f"!function {qual}: no {local.name} next to the task file and no module "
                               f"'{mod_path}' to import") from None
    try:
        return getattr(mod, fn_name)
    except AttributeError:
        raise TunelabError(f"!function {qual}: '{mod_path}' has no '{fn_name}'") from None


def load_config(path: Path, _seen: frozenset = frozenset()) -> dict:
    """The task file as lm-eval reads it: ``!function`` tags imported, ``include:`` merged."""
    import yaml

    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise TunelabError(f"{path}: include cycle")
    if not path.is_file():
        raise TunelabError(f"lm-eval task file not found: {path}")
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):
        pass

    Loader.add_constructor("!function", lambda loader, node: _import_function(loader.construct_scalar(node),
                                                                               path.parent))
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (SafeLoader + !function)
    except yaml.YAMLError as e:
        raise TunelabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise TunelabError(f"{path}: an lm-eval task file is a mapping")
    if "include" not in cfg:
        return cfg
    incs = cfg.pop("include")
    merged: dict = {}
    for inc in incs if isinstance(incs, list) else [incs]:
        p = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        sub = load_config(p, _seen | {path})
        sub.pop("task_list", None)
        merged.update(sub)
    merged.update(cfg)
    return merged


# ----------------------------------------------------------------------------- lm-eval's doc_to_* rules


def _env():
    """The suites' Jinja environment, with lm-eval's ``regex_replace`` filter added."""
    import re

    env = jinja_env()
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


class _Rules:
    """``ConfigurableTask.doc_to_text/_target/_choice`` for one task (``features``: the eval docs' fields)."""

    def __init__(self, cfg: dict, features: list[str]):
        self.cfg, self.features, self.env = cfg, features, _env()

    def _t(self, template, doc):
        return self.env.from_string(template).render(**doc)

    def text(self, doc, how=None):
        how = self.cfg.get("doc_to_text") if how is None else how
        if isinstance(how, int):
            return how
        if isinstance(how, str):
            if how in self.features:
                return doc[how]
            s = self._t(how, doc)
            return ast.literal_eval(s) if s.isdigit() and self.cfg.get("doc_to_choice") is not None else s
        if callable(how):
            return how(doc)
        raise TunelabError(f"doc_to_text must be a template, a field or a !function (got {type(how).__name__})")

    def target(self, doc, how=None):
        how = self.cfg.get("doc_to_target") if how is None else how
        if isinstance(how, (int, list)):
            return how
        if isinstance(how, str):
            if how in self.features:
                return doc[how]
            s = self._t(how, doc)
            if s.isdigit() and self.cfg.get("doc_to_choice") is not None:
                return ast.literal_eval(s)
            if len(s) >= 2 and s[0] == "[" and s[-1] == "]":
                try:
                    return ast.literal_eval(s)
                except (SyntaxError, ValueError):
                    return s
            return s
        if callable(how):
            return how(doc)
        raise TunelabError(f"doc_to_target must be a template, a field or a !function (got {type(how).__name__})")

    def choices(self, doc, how=None):
        how = self.cfg.get("doc_to_choice") if how is None else how
        if isinstance(how, str):
            return doc[how] if how in self.features else ast.literal_eval(self._t(how, doc))
        if isinstance(how, list):
            return how
        if isinstance(how, dict):
            return list(how.values())
        if callable(how):
            return how(doc)
        raise TunelabError(f"doc_to_choice must be a template, a field, a list or a !function "
                           f"(got {type(how).__name__})")

    def field(self, doc, how):
        """lm-eval's ``resolve_field`` (description, gen_prefix)."""
        if how:
            return doc[how] if how in doc else self._t(how, doc)
        return None


def _qa(q, c, a, tgt_delim, few_delim) -> str:
    """``build_qa_turn`` rendered as text, without a gen_prefix."""
    if not isinstance(q, str):
        raise TunelabError(f"doc_to_text gave {type(q).__name__}, not text (several inputs per doc, as in "
                           f"winogrande, are not supported)")
    has_answer = a is not None and a != ""
    if not has_answer:
        return q
    ans = c[a] if (c and isinstance(a, int)) else a[0] if isinstance(a, list) else a
    if not isinstance(ans, str):
        raise TunelabError(f"a few-shot answer is {type(ans).__name__}, not text: {ans!r}")
    return q + tgt_delim + ans + few_delim


def _gold(target, choices: list) -> int:
    """lm-eval's gold for multiple_choice: an index, or the position of a string among the choices
    (-100, never correct, when neither fits)."""
    if isinstance(target, list):
        raise TunelabError("several gold answers per doc (a list target) are not supported")
    if isinstance(target, int) and not isinstance(target, bool):
        return target if target < len(choices) else -100
    if isinstance(target, str):
        return choices.index(target) if target in choices else -100
    raise TunelabError(f"doc_to_target gave {type(target).__name__}: {target!r}")


# ----------------------------------------------------------------------------- the dataset


def _data_files(files, folder: Path):

    def one(f):
        return str(find_path(f, folder, cwd_first=False))

    if isinstance(files, str):
        return one(files)
    if isinstance(files, list):
        return [one(f) for f in files]
    if isinstance(files, dict):
        return {k: (one(v) if isinstance(v, str) else [one(x) for x in v]) for k, v in files.items()}
    return files


def _load_dataset(cfg: dict, path: Path):
    datasets = require("datasets", "train")
    src = cfg.get("dataset_path")
    kw = dict(cfg.get("dataset_kwargs") or {})
    kw.pop("trust_remote_code", None)  # lm-eval drops it too (datasets >= 4)
    local_dir = src is not None and (path.parent / src).is_dir()
    if src not in LOCAL_BUILDERS and not local_dir:
        raise TunelabError(f"{path}: tunelab reads lm-eval tasks with a local dataset (dataset_path: "
                           f"{' | '.join(LOCAL_BUILDERS)} with dataset_kwargs.data_files, or a folder), "
                           f"got dataset_path: {src}")
    if "data_files" in kw:
        kw["data_files"] = _data_files(kw["data_files"], path.parent)
    elif not local_dir:
        raise TunelabError(f"{path}: dataset_path: {src} needs dataset_kwargs.data_files")
    if "data_dir" in kw:
        kw["data_dir"] = str((path.parent / kw["data_dir"]).resolve())
    try:
        return datasets.load_dataset(str((path.parent / src).resolve()) if local_dir else src,
                                     name=cfg.get("dataset_name"), **kw)
    except FileNotFoundError as e:
        raise TunelabError(f"{path}: data not found ({e})") from None


def _split(ds, cfg: dict, name: str | None, path: Path, process):
    if name not in ds:
        raise TunelabError(f"{path}: split '{name}' is not in the dataset (it has {', '.join(ds)})")
    docs = ds[name]
    return process(docs) if process is not None else docs


# ----------------------------------------------------------------------------- the task


def read_task(path: Path, *, num_fewshot: int | None = None, fewshot_seed: int = DEFAULT_FEWSHOT_SEED,
              n_docs: int | None = None) -> dict:
    """The task file at ``path`` → ``{"type", "items", "target_delimiter", "stop", "num_fewshot",
    "rejected", "source"}``; items as ``suites.load_task`` makes them (``prompt`` is lm-eval's context).

    ``num_fewshot`` overrides the file's, as lm-eval's ``--num_fewshot`` does (not when the file says 0).
    ``n_docs``: build only the first N evaluated docs (the few-shot draws for them are unchanged).
    """
    cfg = load_config(path)
    path = Path(path).resolve()
    out_type = cfg.get("output_type", "generate_until")
    if out_type not in OUTPUT_TYPES:
        raise TunelabError(f"{path}: output_type '{out_type}' is not supported (use {', '.join(OUTPUT_TYPES)})")
    for k in ("process_results", "use_prompt", "doc_to_image", "doc_to_audio", "custom_dataset"):
        if cfg.get(k) is not None:
            raise TunelabError(f"{path}: {k} is not supported by tunelab")
    fs = dict(cfg.get("fewshot_config") or {})
    for k in ("samples", "fewshot_indices"):
        if fs.get(k) is not None:
            raise TunelabError(f"{path}: fewshot_config.{k} is not supported by tunelab")
    shots = cfg.get("num_fewshot")
    if num_fewshot is not None and shots != 0:
        shots = num_fewshot
    shots = int(shots or 0)
    sampler = fs.get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise TunelabError(f"{path}: fewshot_config.sampler '{sampler}' is not supported (default, first_n)")

    ds = _load_dataset(cfg, path)
    process = cfg.get("process_docs")
    test_split, val_split, train_split = cfg.get("test_split"), cfg.get("validation_split"), cfg.get("training_split")
    eval_split = test_split if test_split is not None else val_split
    if eval_split is None:
        raise TunelabError(f"{path}: set test_split or validation_split (the docs to evaluate)")
    docs = _split(ds, cfg, eval_split, path, process)
    features = list(docs.features.keys()) if hasattr(docs, "features") else list(docs[0])
    docs = list(docs)
    rules = _Rules(cfg, features)

    fewshot_delim = cfg.get("fewshot_delimiter", "\n\n")
    target_delim = cfg.get("target_delimiter", " ")
    # FewshotConfig.from_dict: fewshot_config's keys over the task's
    fs_split = fs.get("split", cfg.get("fewshot_split"))
    fs_process = fs.get("process_docs", process)
    fs_text = fs.get("doc_to_text", cfg.get("doc_to_text"))
    fs_choice = fs.get("doc_to_choice", cfg.get("doc_to_choice"))
    fs_target = fs.get("doc_to_target", cfg.get("doc_to_target"))
    fs_tdelim = fs.get("target_delimiter", target_delim)
    fs_fdelim = fs.get("fewshot_delimiter", fewshot_delim)
    if fs.get("gen_prefix", cfg.get("gen_prefix")):
        raise TunelabError(f"{path}: gen_prefix is not supported by tunelab")

    pool: list = []
    if shots > 0:
        if fs_split is not None:
            pool = list(_split(ds, cfg, fs_split, path, fs_process))
        else:  # Task.fewshot_docs: training, else validation, else test docs
            for s in (train_split, val_split, test_split):
                if s is not None:
                    pool = list(_split(ds, cfg, s, path, process))
                    break
        if not pool:
            raise TunelabError(f"{path}: num_fewshot is {shots} but there are no few-shot docs")
    exclude_self = fs_split == test_split
    rnd = random.Random(fewshot_seed)

    def draw(doc) -> list:
        if sampler == "first_n":
            p = [x for x in pool if x != doc] if exclude_self else pool
            if shots > len(p):
                raise TunelabError(f"{path}: num_fewshot {shots} exceeds the {len(p)} few-shot docs")
            return p[:shots]
        if not exclude_self:
            return rnd.sample(pool, shots)
        res = [x for x in rnd.sample(pool, shots + 1) if x != doc][:shots]
        if len(res) < shots:
            res = rnd.sample([x for x in pool if x != doc], shots)
        return res

    kind = OUTPUT_TYPES[out_type]
    items: list[dict] = []
    rejected: list[dict] = []
    for i, doc in enumerate(docs[:n_docs] if n_docs is not None else docs):
        try:
            ctx = rules.field(doc, cfg.get("description", "")) or ""
            if shots > 0:
                for f in draw(doc):
                    q = rules.text(f, fs_text)
                    c = rules.choices(f, fs_choice) if fs_choice else None
                    ctx += _qa(q, c, rules.target(f, fs_target), fs_tdelim, fs_fdelim)
            if kind == "perplexity":
                text = rules.target(doc)
                items.append({"text": str(text), "doc": i})
                continue
            q = rules.text(doc)
            ctx += _qa(q, None, None, target_delim, "")
            item = {"prompt": ctx, "doc": i}
            tgt = rules.target(doc)
            if kind == "multiple_choice":
                choices = rules.choices(doc)
                if not isinstance(choices, list) or not choices:
                    raise TunelabError(f"doc_to_choice gave {choices!r}, not a list of choices")
                choices = [str(c) for c in choices]
                gold = _gold(tgt, choices)
                item.update({"choices": choices, "gold": gold, "target": choices[gold] if gold >= 0 else str(tgt)})
            else:
                item["target"] = str(tgt[0] if isinstance(tgt, list) and tgt else tgt)
            item["record"] = doc
            items.append(item)
        except TunelabError as e:
            rejected.append({"source": str(path), "line": i, "reason": str(e)})
        except Exception as e:  # a template naming a field this doc lacks, a failing !function
            rejected.append({"source": str(path), "line": i, "reason": f"{type(e).__name__}: {e}"})
    until = (cfg.get("generation_kwargs") or {}).get("until") if out_type == "generate_until" else None
    if out_type == "generate_until" and until is None:
        until = [fewshot_delim]  # lm-eval's default
    return {"type": kind, "items": items, "rejected": rejected, "target_delimiter": target_delim,
            "stop": [until] if isinstance(until, str) else list(until or []), "num_fewshot": shots,
            "source": str(path), "task": cfg.get("task")}
