"""Imports flow one way (DESIGN.md): core → models → scoring → data → train → eval/advise → serve →
platform → console → front ends; no cycles between modules; no private module imported from another package; and a
tunelab module is imported inside a function only when it is heavy (it pulls torch & co. at import time)
or the importer is a front end that must start fast.

The graph is read from the source with ``ast`` (top-level and function-local imports alike), so a
back-edge hidden inside a function is found too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "tunelab"

# rank of each package; a module may import its own package and packages of a lower rank only
RANKS = {"core": 0, "models": 1, "scoring": 2, "data": 3, "train": 4, "eval": 5, "advise": 5, "serve": 6,
         "platform": 7, "console": 8, "front": 9}
FRONT = {"tunelab.cli", "tunelab.demo", "tunelab.demo_data", "tunelab.__main__"}
# tunelab.recipes is core: a registry of names that imports recipe modules by string when asked (DESIGN 6)
HEAVY = {"torch", "transformers", "peft", "trl", "datasets", "accelerate", "safetensors", "tokenizers", "numpy",
         "sklearn", "scipy", "matplotlib", "fastapi", "uvicorn", "optuna", "bitsandbytes", "pandas", "pyarrow",
         "spacy", "presidio_analyzer", "ray", "boto3", "statsmodels", "sacrebleu", "rouge_score", "bert_score",
         "datasketch", "lm_eval", "jinja2", "starlette", "phonenumbers", "httpx", "openai"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODS = _modules()


def _package(mod: str) -> str:
    if mod in FRONT:
        return "front"
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else "core"


def _target(name: str) -> str | None:
    while name and name not in MODS:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str):
    """(target module, line, is_top_level) for every tunelab import in ``mod``; and its heavy top-level imports."""
    path = MODS[mod]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    top = set(id(n) for n in tree.body)
    for n in tree.body:  # `if TYPE_CHECKING:` blocks and try/except at top level still run at import
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    out, heavy = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        is_top = id(node) in top
        for n in names:
            if n.split(".")[0] in HEAVY and is_top:
                heavy.add(n.split(".")[0])
            if n.startswith("tunelab"):
                t = _target(n)
                if t and t != mod:
                    out.append((t, node.lineno, is_top))
                    break  # one edge per statement is enough
    return out, heavy


EDGES = {m: _imports(m) for m in MODS}


def _is_heavy(mod: str, seen: set | None = None) -> bool:
    """Imports a heavy library at import time, itself or through its top-level tunelab imports."""
    seen = seen if seen is not None else set()
    if mod in seen:
        return False
    seen.add(mod)
    edges, heavy = EDGES[mod]
    return bool(heavy) or any(_is_heavy(t, seen) for t, _, top in edges if top)


def test_imports_flow_one_way():
    bad = []
    for mod, (edges, _) in EDGES.items():
        a = _package(mod)
        for t, line, _top in edges:
            b = _package(t)
            if a != b and RANKS[b] >= RANKS[a]:
                bad.append(f"{MODS[mod].relative_to(ROOT.parent)}:{line}: {a} imports {b} ({t})")
    assert not bad, "imports against the flow:\n" + "\n".join(sorted(bad))


def test_no_private_module_imported_from_another_package():
    bad = []
    for mod, (edges, _) in EDGES.items():
        for t, line, _top in edges:
            owner, _, leaf = t.rpartition(".")
            if leaf.startswith("_") and not leaf.startswith("__") and not (mod == owner or mod.startswith(owner + ".")):
                bad.append(f"{MODS[mod].relative_to(ROOT.parent)}:{line}: imports private {t}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = defaultdict(set)
    for mod, (edges, _) in EDGES.items():
        for t, _line, _top in edges:
            # a package's __init__ re-exporting its own modules is not a cycle with them
            if not (t == mod.rpartition(".")[0] and MODS[t].name == "__init__.py"):
                graph[mod].add(t)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in list(MODS):
        if v not in index:
            strong(v)
    assert not sccs, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in sccs)


def test_light_tunelab_modules_are_imported_at_top_level():
    bad = []
    for mod, (edges, _) in EDGES.items():
        if mod in FRONT:
            continue  # the CLI imports lazily so that `tunelab --help` starts fast
        for t, line, top in edges:
            if not top and not _is_heavy(t):
                bad.append(f"{MODS[mod].relative_to(ROOT.parent)}:{line}: imports {t} inside a function")
    assert not bad, f"{len(bad)} function-local imports of light modules:\n" + "\n".join(sorted(bad))


def test_the_checker_sees_a_back_edge_and_a_cycle(tmp_path, monkeypatch):
    """The rules above are not vacuous: a planted back-edge and cycle are reported."""
    global EDGES
    planted = dict(EDGES)
    planted["tunelab.data.readers"] = (EDGES["tunelab.data.readers"][0] + [("tunelab.train.sft", 1, False)],
                                       EDGES["tunelab.data.readers"][1])
    planted["tunelab.workspace"] = (EDGES["tunelab.workspace"][0] + [("tunelab.catalog", 1, True)],
                                    EDGES["tunelab.workspace"][1])
    planted["tunelab.catalog"] = (EDGES["tunelab.catalog"][0] + [("tunelab.workspace", 1, True)],
                                  EDGES["tunelab.catalog"][1])
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "EDGES", planted)
    import pytest

    with pytest.raises(AssertionError, match="data imports train"):
        test_imports_flow_one_way()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
