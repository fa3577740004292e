"""Recipes: YAML → strict pydantic models, with ``--set a.b=c`` overrides.

Unknown keys are rejected (a typo must never be silently ignored) and every problem
is reported at once with its field path and a hint, then raised as one ConfigError.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tunelab.errors import ConfigError, ConfigFileError

T = TypeVar("T", bound="Strict")


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.learning_rate=1e-4`` → (["train", "learning_rate"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError([f"override '{text}' is not of the form key.path=value"], "--set")
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError([f"override '{text}' has an empty key"], "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each dotted override applied (intermediate dicts created).

    A number indexes into a list: ``inputs.0.path=x`` sets the first input's path."""
    out = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    where = ".".join(path[:i]) or "(top level)"
                    raise ConfigError([f"override '{text}': {where} is a list of {len(node)} item(s); "
                                       f"use an index from 0 to {len(node) - 1}"], "--set")
                key: Any = int(part)
            else:
                key = part
            if last:
                node[key] = value
                break
            nxt = node[key] if isinstance(node, list) else node.get(key)
            if not isinstance(nxt, (dict, list)):
                nxt = {}
                node[key] = nxt
            node = nxt
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# suffixes of files tunelab reads as data, not settings: named in the hint when one is given as a recipe
_DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".gz", ".zip", ".arrow", ".safetensors",
                  ".bin", ".gguf", ".pt"}


def _folder_problem(p: Path, what: str) -> str:
    found = sorted(f.name for f in p.glob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
    if found:
        more = f" ({len(found)} YAML files there: {', '.join(found[:4])}{', ...' if len(found) > 4 else ''})" \
            if len(found) > 1 else ""
        return f"{p} is a folder, not a {what}; give the YAML file, e.g. {p / found[0]}{more}"
    return f"{p} is a folder with no .yaml file in it, not a {what}; give the YAML file itself, e.g. {p / 'recipe.yaml'}"


def _read_problem(p: Path, what: str) -> tuple[bytes | None, str | None]:
    """The file's bytes, or the one-line reason it cannot be a YAML {what}."""
    if p.is_dir():
        return None, _folder_problem(p, what)
    if not p.exists():
        where = "" if p.is_absolute() else f" (relative paths are read from {Path.cwd()})"
        return None, f"{what} not found: {p}{where}"
    try:
        return p.read_bytes(), None
    except PermissionError:
        return None, f"{p}: permission denied; make the {what} readable (chmod u+r) or give a copy you can read"
    except OSError as e:
        return None, f"{p} cannot be read ({e.strerror or e}); give a {what} that can"


_SECTIONS = {"recipe file": "recipe:, model:, data:, ...", "suite file": "tasks:, models:, decoding:, ...",
             "answers file": "goal:, labeled_examples:, ...", "settings file": "host:, port:, ..."}


def _data_hint(p: Path) -> str:
    return (f"; {p.name} looks like a data or model file: give the recipe YAML that names it"
            if p.suffix.lower() in _DATA_SUFFIXES else "")


def load_yaml(path: str | Path, what: str = "recipe file") -> dict:
    """A YAML file whose top level is a mapping. Every way a file can fail to be one (missing, a folder,
    unreadable, empty, binary, not UTF-8, not YAML, a list or a scalar) is a ``ConfigFileError``: one line
    naming the file and the fix. ``what`` names the file in those lines ("recipe file", "suite file", ...)."""
    p = Path(path)
    raw, problem = _read_problem(p, what)
    if problem:
        raise ConfigFileError(problem, str(p))
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigFileError(f"{p} is UTF-16 text; save the {what} as UTF-8", str(p))
    if b"\x00" in raw:
        raise ConfigFileError(f"{p} is a binary file, not a YAML {what}{_data_hint(p)}", str(p))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigFileError(f"{p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, column {col}); "
                              f"save the {what} as UTF-8{_data_hint(p)}", str(p)) from None
    if not text.strip():
        raise ConfigFileError(f"{p} is empty; a {what} holds YAML settings ({_SECTIONS.get(what, 'key: value, ...')})", str(p))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{p}: not valid YAML{_yaml_where(e)}{_data_hint(p)}", str(p)) from None
    if data is None:  # comments only: no settings, every default
        data = {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single value ({type(data).__name__} {str(data)[:40]!r})"
        raise ConfigFileError(f"{p} holds {kind}; the top level of a {what} must be a mapping of sections "
                              f"({_SECTIONS.get(what, 'key: value, ...')}){_data_hint(p)}", str(p))
    return data


def _yaml_where(e: yaml.YAMLError) -> str:
    """' at line L, column C: problem' from PyYAML's multi-line message, one line."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Names of the fields valid at the parent of ``loc`` (for 'did you mean')."""
    cls: Any = model
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return []
        field = cls.model_fields.get(str(part))
        if field is None:
            return []
        cls = field.annotation
        # unwrap Optional[X] / X | None
        args = getattr(cls, "__args__", None)
        if args:
            subs = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            cls = subs[0] if subs else cls
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def format_validation_error(model: type[BaseModel], err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _fields_at(model, loc)
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else (f"; known keys: {', '.join(known)}" if known else "")
            problems.append(f"{path}: unknown key{hint}")
        elif e["type"] == "missing":
            problems.append(f"{path}: required, add it to the recipe or pass --set {path}=...")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            msg = e["msg"].removeprefix("Value error, ")  # our validators' messages stand on their own
            problems.append(f"{path}: {msg}" if shown in msg else f"{path}: {msg} (got {shown})")
    return problems


def validate(model: type[T], data: dict, source: str | None = None, check_files: bool = False) -> T:
    """Validate ``data`` against ``model``; raise one ConfigError listing every problem.

    A config class may add checks its field types cannot express with a classmethod
    ``recipe_problems(data, files)`` (on the raw data, so they are reported together with the type
    errors); ``check_files`` asks it to check that the files the recipe names exist."""
    problems: list[str] = []
    cfg = None
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        problems = format_validation_error(model, err)
    extra = getattr(model, "recipe_problems", None)
    if extra is not None and isinstance(data, dict):
        problems += extra(data, files=check_files)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         data: dict | None = None, check_files: bool = False, what: str = "recipe file") -> T:
    """Load a recipe from YAML (or a dict), apply overrides, validate strictly."""
    raw = load_yaml(path, what) if path is not None else (data or {})
    raw = apply_overrides(raw, overrides or [])
    return validate(model, raw, str(path) if path else None, check_files=check_files)


def dump(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
