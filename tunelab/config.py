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

from tunelab.errors import ConfigError

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


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"file not found: {p}"], str(p))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of sections (model:, data:, ...)"], str(p))
    return data


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
         data: dict | None = None, check_files: bool = False) -> T:
    """Load a recipe from YAML (or a dict), apply overrides, validate strictly."""
    raw = load_yaml(path) if path is not None else (data or {})
    raw = apply_overrides(raw, overrides or [])
    return validate(model, raw, str(path) if path else None, check_files=check_files)


def dump(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
