"""Training sits below evaluation and serving: no module under tunelab/train imports tunelab.eval or
tunelab.serve (function-local imports included), so a training run never drags evaluation in."""

from __future__ import annotations

import ast
from pathlib import Path

import tunelab

TRAIN = Path(tunelab.__file__).parent / "train"


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_train_does_not_import_eval_or_serve():
    bad = [f"{p.name}:{line} imports {mod}" for p in sorted(TRAIN.glob("*.py")) for line, mod in _imports(p)
           if mod.startswith(("tunelab.eval", "tunelab.serve"))]
    assert not bad, "; ".join(bad)
