"""Every example file named in code or docs exists, and every example recipe validates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# "examples/s" is a unit (examples per second), not a path
NAMED = re.compile(r"examples/(?!s\b)[A-Za-z0-9_./-]*[A-Za-z0-9_/]")


def _mentions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    files = [*ROOT.glob("tunelab/**/*.py"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("bench/*.py"), ROOT / "README.md",
             *ROOT.glob("*.md"), ROOT / "Makefile"]
    for f in files:
        if not f.is_file():
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            for m in NAMED.finditer(line):
                found.setdefault(m.group(0).rstrip("/."), []).append(f"{f.relative_to(ROOT)}:{i}")
    return found


def test_every_example_named_exists():
    missing = {p: where for p, where in _mentions().items() if not (ROOT / p).exists()}
    assert not missing, "named but missing:\n" + "\n".join(f"{p} ({', '.join(w)})" for p, w in missing.items())


def _is_recipe(p: Path) -> bool:
    return re.search(r"^recipe:", p.read_text(encoding="utf-8"), re.M) is not None  # lm-eval task files are not


RECIPES = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if _is_recipe(p))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_recipe_validates(path, monkeypatch):
    from tunelab import recipes

    monkeypatch.chdir(ROOT)  # examples name their data relative to the repository
    recipes.load_recipe(path)


def test_examples_are_found():
    assert len(RECIPES) >= 15  # the walk above is not silently empty
