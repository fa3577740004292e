"""What suites and lm-eval task files share: the Jinja environment prompts are rendered with, and how a
relative path in a task is found."""

from __future__ import annotations

from pathlib import Path

from tunelab._optional import require


def jinja_env():
    """A strict Jinja environment (an undefined field is an error), trailing newlines kept as lm-eval does."""
    jinja2 = require("jinja2", "eval")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def find_path(path: str, base: Path, cwd_first: bool = True) -> Path:
    """A relative path is looked up from the current folder (like every tunelab recipe), then from ``base``
    (the suite's or the lm-eval task file's folder); lm-eval data files look next to their task first."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    order = [Path.cwd() / p, base / p] if cwd_first else [base / p, Path.cwd() / p]
    return next((c.resolve() for c in order if c.exists()), order[0].resolve())
