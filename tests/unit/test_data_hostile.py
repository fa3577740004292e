"""Hostile and broken input to `tunelab data prepare`: each bad record is a reject with file, line and
reason, each recipe mistake a validation error naming the field, and nothing a user sent ends a run
with a traceback or loses records silently."""

from __future__ import annotations

import ast
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import config as cfglib
from tunelab.data.prepare import PrepareConfig, run
from tunelab.data.readers import read
from tunelab.data.records import BadRecord, to_canonical
from tunelab.errors import ConfigError, TunelabError
from tunelab.recipes import load_recipe
from tunelab.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]


def _prep(tmp_path, inputs, ws="ws", **kw):
    data = {"recipe": "data", "name": "h", "inputs": inputs, "split": {"validation": 0, "test": 0},
            "profile": None, "workers": 0, **kw}
    return run(cfglib.load(PrepareConfig, data=data), Workspace.resolve(tmp_path / ws))


def _rejects(m) -> list[dict]:
    return [json.loads(x) for x in (Path(m["path"]) / "rejects.jsonl").read_text().splitlines()]


def _lines(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"text": f"record number {i}", "label": "a"}) for i in range(start, start + n)]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=120)


# ----------------------------------------------------------------------------- records and files

def test_truncated_gzip_keeps_the_readable_prefix_and_names_the_position(tmp_path):
    full = gzip.compress(("\n".join(_lines(2000)) + "\n").encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(full[: len(full) * 2 // 3])
    items = list(read(p))
    good = [r for _, _, r in items if not isinstance(r, BadRecord)]
    bad = [(line, r) for _, line, r in items if isinstance(r, BadRecord)]
    assert len(good) > 500 and len(bad) == 1
    line, reason = bad[0]
    assert line == len(good) + 1 and "truncated" in str(reason) and f"after line {len(good)}" in str(reason)
    m = _prep(tmp_path, [{"path": str(p)}])
    assert m["counts"]["kept"] == len(good) and m["counts"]["rejected"] == 1
    (rej,) = _rejects(m)
    assert rej["file"] == str(p) and rej["line"] == len(good) + 1 and "truncated" in rej["reason"]


def test_truncated_gzip_through_the_cli_is_no_bare_abort(tmp_path):
    full = gzip.compress(("\n".join(_lines(300)) + "\n").encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(full[:-40])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"recipe: data\nname: cut\ninputs: [{{path: '{p}'}}]\nprofile: null\n")
    r = _cli("data", "prepare", str(recipe), "-w", str(tmp_path / "ws"))
    assert r.returncode == 0, r.stderr
    assert "Aborted" not in r.stdout + r.stderr and "truncated" in r.stdout and "rejects.jsonl" in r.stdout


def test_deep_nesting_is_a_reject_not_a_recursion_error(tmp_path):
    p = tmp_path / "deep.jsonl"
    deep = json.dumps({"text": "x", "label": "a", "extra": "PLACEHOLDER"}).replace(
        '"PLACEHOLDER"', "[" * 1000 + "]" * 1000)
    not_so_deep = json.dumps({"text": "y", "label": "a", "extra": "P"}).replace('"P"', "[" * 150 + "]" * 150)
    p.write_text("\n".join([*_lines(10), deep, not_so_deep, *_lines(10, 10)]) + "\n")
    m = _prep(tmp_path, [{"path": str(p)}], workers=2)  # worker processes: the record is pickled
    assert m["counts"] == {**m["counts"], "read": 22, "kept": 20, "rejected": 2}
    assert [r["line"] for r in _rejects(m)] == [11, 12] and all("nested" in r["reason"] for r in _rejects(m))
    jp = tmp_path / "deep.json"
    jp.write_text("[" * 1200 + "]" * 1200)
    (item,) = list(read(jp))
    assert isinstance(item[2], BadRecord) and "nested" in str(item[2])


def test_lone_surrogate_is_rejected_or_cleaned_never_a_crash(tmp_path):
    p = tmp_path / "sur.jsonl"
    p.write_text("\n".join([*_lines(3), '{"text": "broken \\ud800 emoji", "label": "a"}']) + "\n")
    m = _prep(tmp_path, [{"path": str(p)}])  # no control_chars step: a reject naming the field
    assert m["counts"]["kept"] == 3 and m["counts"]["rejected"] == 1
    (rej,) = _rejects(m)
    assert rej["line"] == 4 and "surrogate" in rej["reason"] and "'text'" in rej["reason"]
    m = _prep(tmp_path, [{"path": str(p)}], ws="ws2", steps=[{"kind": "control_chars"}])
    assert m["counts"]["kept"] == 4 and "broken  emoji" in (Path(m["path"]) / "train.jsonl").read_text()
    m = _prep(tmp_path, [{"path": str(p)}], ws="ws3", workers=2, steps=[{"kind": "exact_dedup"}])  # in workers
    assert m["counts"]["kept"] == 3 and [r["stage"] for r in _rejects(m)] == ["output"]


def test_utf8_bom_does_not_cost_the_first_record(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + ("\n".join(_lines(3)) + "\n").encode())
    assert not [r for _, _, r in read(p) if isinstance(r, BadRecord)]
    assert _prep(tmp_path, [{"path": str(p)}])["counts"]["kept"] == 3


def test_records_that_must_be_rejected():
    for pair in ({"prompt": "p", "chosen": "same", "rejected": "same"},
                 {"prompt": "p", "chosen": "same ", "rejected": " same"},
                 {"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: hi\n\nAssistant: ok"}):
        with pytest.raises(BadRecord, match="identical"):
            to_canonical(pair)
    for label in ("NaN", "nan", float("nan"), float("inf")):
        with pytest.raises(BadRecord, match="NaN"):
            to_canonical({"text": "t", "label": label})
    with pytest.raises(BadRecord, match="string or a number"):
        to_canonical({"text": "t", "label": {"a": 1}})


def test_csv_nan_label_and_unterminated_quote(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('text,label\nfine one,a\nmissing label,NaN\n"never closed,b\nfine two,a\nfine three,b\n')
    items = list(read(p))
    assert [line for _, line, _ in items] == [2, 3, 4, 5, 6]
    bad = items[2][2]
    assert isinstance(bad, BadRecord) and "unterminated quote" in str(bad)
    m = _prep(tmp_path, [{"path": str(p), "format": "classification"}])
    assert m["counts"]["kept"] == 3 and m["counts"]["rejected"] == 2
    reasons = {r["line"]: r["reason"] for r in _rejects(m)}
    assert "NaN" in reasons[3] and "unterminated quote" in reasons[4]
    # an unterminated quote on the last line (end of data inside a quote)
    p.write_text('text,label\nfine one,a\n"open at the end,b\n')
    assert "unterminated quote" in str(list(read(p))[-1][2])


def test_folder_input_reads_every_supported_file(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("\n".join(_lines(3)) + "\n")
    (d / "sub" / "b.csv").write_text("text,label\ncsv row,b\n")
    (d / "c.txt").write_text("a plain document")
    (d / "notes.xlsx").write_bytes(b"PK\x03\x04")
    (d / ".hidden.jsonl").write_text("not json\n")
    m = _prep(tmp_path, [{"path": str(d)}])
    assert m["counts"]["read"] == 5 and m["counts"]["kept"] == 5 and m["kinds"] == {"classification": 4, "text": 1}
    assert any("notes.xlsx" in w for w in m["warnings"])


def test_rejected_reasons_are_grouped_by_kind(tmp_path):
    p = tmp_path / "u.jsonl"
    rows = [f'{{"text": "{"x" * i}\xff", "label": "a"}}'.encode("latin-1") for i in range(1, 30)]
    p.write_bytes(b"\n".join([*rows, *(x.encode() for x in _lines(2))]) + b"\n")
    m = _prep(tmp_path, [{"path": str(p)}])
    assert m["counts"]["rejected_by_reason"] == {"invalid UTF-8": 29}
    assert len({r["reason"] for r in _rejects(m)}) == 29  # the detail stays in rejects.jsonl


def test_a_step_that_fails_on_one_record_drops_that_record_only(tmp_path, monkeypatch):
    from tunelab.data.steps import clean

    real = clean.Normalize.__call__

    def flaky(self, rec):
        if "boom" in rec.get("text", ""):
            raise RuntimeError("a bug in a step")
        return real(self, rec)

    monkeypatch.setattr(clean.Normalize, "__call__", flaky)
    p = tmp_path / "b.jsonl"
    p.write_text("\n".join([*_lines(4), json.dumps({"text": "boom", "label": "a"})]) + "\n")
    m = _prep(tmp_path, [{"path": str(p)}], steps=[{"kind": "normalize"}])
    assert m["counts"]["kept"] == 4 and m["steps"][0]["dropped"] == {"error": 1}
    assert _rejects(m)[0]["detail"] == "RuntimeError"


# ----------------------------------------------------------------------------- nothing survives, --strict

def test_no_record_survived_names_the_files_and_keeps_the_rejects(tmp_path):
    p = tmp_path / "all_bad.jsonl"
    p.write_text('{"text": \n{"nope": 1}\n')
    ws = Workspace.resolve(tmp_path / "ws")
    with pytest.raises(TunelabError) as e:
        run(cfglib.load(PrepareConfig, data={"recipe": "data", "name": "bad", "inputs": [{"path": str(p)}]}), ws)
    msg = str(e.value)
    assert "no record survived" in msg and str(p) in msg and "invalid JSON" in msg
    kept = Path(msg.rsplit(" are in ", 1)[1])
    assert kept.is_file() and kept.parent == ws.root / "rejects"
    assert [r["line"] for r in map(json.loads, kept.read_text().splitlines())] == [1, 2]
    assert not any((ws.root / "datasets").iterdir())  # no version, no half-written folder


def test_strict_fails_when_the_identical_version_exists_with_rejects(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join([*_lines(5), "{broken"]) + "\n")
    cfg = cfglib.load(PrepareConfig, data={"recipe": "data", "name": "s", "inputs": [{"path": str(p)}], "profile": None})
    ws = Workspace.resolve(tmp_path / "ws")
    m = run(cfg, ws)
    assert m["counts"]["rejected"] == 1
    with pytest.raises(TunelabError, match="strict.*already exists") as e:
        run(cfg, ws, strict=True)
    assert str(Path(m["path"]) / "rejects.jsonl") in str(e.value)
    again = run(cfg, ws)
    assert again["reused"] is True and again["path"] == m["path"]
    with pytest.raises(TunelabError, match="are in"):  # a fresh strict run keeps its rejects too
        run(cfglib.load(PrepareConfig, data={"recipe": "data", "name": "s2", "inputs": [{"path": str(p)}]}), ws,
            strict=True)


# ----------------------------------------------------------------------------- exports

def test_exporting_preference_pairs_as_chat_is_an_error_not_empty_files(tmp_path):
    p = tmp_path / "pref.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                         for i in range(6)))
    for fmt in ("prompt_completion", "messages"):
        with pytest.raises(TunelabError, match=f"cannot be written as '{fmt}'.*preference"):
            _prep(tmp_path, [{"path": str(p)}], export=[fmt])
    m = _prep(tmp_path, [{"path": str(p)}], export=["preference"])
    assert len((Path(m["path"]) / "train.preference.jsonl").read_text().splitlines()) == 6
    # a mix: the records that fit are written, the rest is a warning with the count
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(p.read_text() + json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    m = _prep(tmp_path, [{"path": str(mixed)}], ws="ws2", export=["prompt_completion"])
    assert m["exports"]["prompt_completion"]["not_exportable"] == 6
    assert any("6 of 7" in w for w in m["warnings"])
    # multi-turn chats only: alpaca cannot hold them
    chats = tmp_path / "multi.jsonl"
    turns = [{"role": r, "content": f"{r} {k}"} for k in range(2) for r in ("user", "assistant")]
    chats.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(TunelabError, match="no record could be written as 'alpaca'.*single-turn"):
        _prep(tmp_path, [{"path": str(chats)}], ws="ws3", export=["alpaca"])


# ----------------------------------------------------------------------------- recipe validation

def test_format_and_export_typos_fail_validation_with_a_suggestion(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(_lines(2)) + "\n")
    with pytest.raises(ConfigError) as e:
        cfglib.load(PrepareConfig, data={"recipe": "data", "name": "t",
                                         "inputs": [{"path": str(p), "format": "alpacca"}],
                                         "export": ["bedrok_conversation"]})
    msg = str(e.value)
    assert "inputs.0.format: unknown format 'alpacca'; did you mean 'alpaca'?" in msg
    assert "export: unknown export format 'bedrok_conversation'; did you mean 'bedrock_conversation'?" in msg


def test_step_settings_are_typed_and_every_problem_is_reported(tmp_path):
    data = {"recipe": "data", "name": "t", "inputs": [{"path": "x.jsonl"}],
            "steps": [{"kind": "length", "min_words": "three"},
                      {"kind": "near_dedup", "treshold": 0.8},
                      {"kind": "normalize", "form": "NFX"},
                      {"kind": "length", "min_chars": 10, "max_chars": 2},
                      {"kind": "pii", "style": "blur"},
                      {"kind": "dedup"},
                      {"kind": "decontaminate"},
                      {"kind": "length", "min_words": "3"}]}  # a number as text is read as the number
    with pytest.raises(ConfigError) as e:
        cfglib.load(PrepareConfig, data=data)
    problems = e.value.problems
    assert len(problems) == 7, problems
    assert problems[0].startswith("steps.0 (length): min_words: Input should be a valid integer") and "'three'" in problems[0]
    assert "steps.1 (near_dedup): unknown setting 'treshold'; did you mean 'threshold'?" in problems[1]
    assert problems[2].startswith("steps.2 (normalize): form must be one of")
    assert problems[3] == "steps.3 (length): min_chars=10 > max_chars=2"
    assert problems[4].startswith("steps.4 (pii):") and "blur" in problems[4]
    assert problems[5].startswith("steps.5.kind: unknown step 'dedup'")
    assert problems[6] == "steps.6 (decontaminate): 'paths' is required"
    # the run builds the steps with the typed values
    from tunelab.data.prepare import build_steps

    (step,) = build_steps(cfglib.load(PrepareConfig, data={**data, "steps": [data["steps"][-1]]}).steps)
    assert step.bounds["words"] == (3, None)


def test_validate_reports_missing_files_and_other_problems_at_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: data\nname: t\ninputs:\n  - {path: nowhere/a.jsonl, format: alpacca}\n"
                      "  - {path: nowhere/b.csv}\nsteps:\n  - {kind: length, min_words: three}\n"
                      "  - {kind: decontaminate, paths: [nowhere/eval.jsonl]}\n"
                      "select: {target: [nowhere/target.jsonl], size: 5}\nexport: [bedrok_conversation]\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, check_files=True)
    text = str(e.value)
    for want in ("inputs.0.format", "export:", "steps.0 (length): min_words", "inputs.0.path: file not found",
                 "inputs.1.path: file not found", "select.target.0: file not found",
                 "steps.1 (decontaminate).paths.0: file not found"):
        assert want in text, want
    r = _cli("validate", str(recipe))
    assert r.returncode == 2 and "inputs.1.path: file not found" in r.stderr and "Traceback" not in r.stderr
    # without check_files (how configs are loaded back from a run) the files are not looked at
    recipe.write_text("recipe: data\nname: t\ninputs: [{path: nowhere/a.jsonl}]\n")
    assert load_recipe(recipe)[0].inputs[0].path == "nowhere/a.jsonl"


def test_dotted_overrides_index_into_lists(tmp_path):
    data = {"inputs": [{"path": "a"}, {"path": "b"}], "split": {"test": 0.1}}
    out = cfglib.apply_overrides(data, ["inputs.1.path=c", "split.test=0.2", "new.key=1"])
    assert out == {"inputs": [{"path": "a"}, {"path": "c"}], "split": {"test": 0.2}, "new": {"key": 1}}
    assert data["inputs"][1]["path"] == "b"
    with pytest.raises(ConfigError, match="list of 2 item"):
        cfglib.apply_overrides(data, ["inputs.2.path=x"])


def test_readme_banking77_command_works(tmp_path):
    csv = tmp_path / "train.csv"
    rows = [f"how do I {verb} my card number {i},{label}" for i in range(40)
            for verb, label in (("activate", "activate_my_card"), ("freeze", "lost_or_stolen_card"))]
    csv.write_text("text,category\n" + "\n".join(rows) + "\n")
    r = _cli("data", "prepare", "examples/data_banking77.yaml", "--set", f"inputs.0.path={csv}",
             "--set", "profile=null", "-w", str(tmp_path / "ws"))
    assert r.returncode == 0, r.stderr
    (d,) = (tmp_path / "ws" / "datasets").iterdir()
    m = json.loads((d / "manifest.json").read_text())
    assert m["counts"]["kept"] == 80 and m["labels"]["test"] == {"activate_my_card": 4, "lost_or_stolen_card": 4}


def test_select_target_records_that_cannot_be_used_are_counted(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_text("\n".join(_lines(30)) + "\n")
    t = tmp_path / "target.jsonl"
    t.write_text(json.dumps({"text": "record number 3"}) + "\n{broken\n" + json.dumps({"nope": 1}) + "\n")
    m = _prep(tmp_path, [{"path": str(p)}], select={"target": [str(t)], "size": 5})
    dsir = m["selection"]["dsir"]
    assert dsir["target_records"] == 1 and dsir["target_dropped"] == 2
    assert dsir["target_dropped_by_reason"] == {"invalid JSON": 1, "unknown format": 1}
    assert any("select.target: 2 target record(s) not usable" in w for w in m["warnings"])


# ----------------------------------------------------------------------------- imports flow one way

def _data_imports() -> dict[str, set[str]]:
    """tunelab.data module → the tunelab.data modules it imports (anywhere in the file)."""
    base = ROOT / "tunelab" / "data"
    graph: dict[str, set[str]] = {}
    for f in base.rglob("*.py"):
        mod = ".".join(("tunelab", "data", *f.relative_to(base).with_suffix("").parts)).removesuffix(".__init__")
        pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    target = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([target] if target else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n for n in names if n.startswith("tunelab.data.") and n != mod}
        graph[mod] = deps
    return {m: {d for d in ds if d in graph} for m, ds in graph.items()}


def test_data_package_has_no_import_cycles():
    graph = _data_imports()
    assert "tunelab.data.records" in graph and "tunelab.data.formats" not in graph["tunelab.data.records"]
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, d])}"
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_line_separators_inside_text_keep_one_record_per_line(tmp_path):
    p = tmp_path / "ls.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"para\u2028graph\x85next\u2029{i}", "label": "a"}) for i in range(4)))
    m = _prep(tmp_path, [{"path": str(p)}], export=["text"])
    for name in ("train.jsonl", "train.text.jsonl"):
        lines = (Path(m["path"]) / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) == 4 and json.loads(lines[0])["text"].startswith("para\u2028graph\x85next\u2029")


def test_a_step_kind_used_twice_counts_its_drops_per_step(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"text": " ".join(["w"] * n), "label": "a"}) for n in range(1, 9)) + "\n")
    m = _prep(tmp_path, [{"path": str(p)}], steps=[{"kind": "length", "min_words": 3},
                                                   {"kind": "length", "max_words": 6}])
    assert [s["dropped"] for s in m["steps"]] == [{"too_short": 2}, {"too_long": 2}]
    assert m["counts"]["dropped"] == 4 and m["counts"]["kept"] == 4


def test_split_hashes_text_that_is_not_valid_unicode():
    from tunelab.data.split import content_fraction

    f = content_fraction({"text": "broken \ud800"})
    assert 0 <= f < 1 and f != content_fraction({"text": "broken "})
    assert content_fraction({"text": "é"}) == content_fraction({"text": "é"}, "")  # valid text: hash unchanged


def test_reason_kinds_group_numbers_but_keep_names():
    from tunelab.data.records import reason_kind

    assert reason_kind("invalid UTF-8 at byte 17") == "invalid UTF-8 at byte N"
    assert reason_kind("message 3 must be {'role': ...}") == "message N must be {'role'"
    assert BadRecord("row has 4 cells, header has 2").kind == "row has N cells, header has N"
    assert BadRecord("anything: detail", "my kind").kind == "my kind"
    import pickle

    assert pickle.loads(pickle.dumps(BadRecord("x 1", "k"))).kind == "k"


def test_step_settings_fall_back_to_the_step_for_types_pydantic_cannot_check():
    from typing import Any, Protocol

    from tunelab.data.prepare import _checkable

    class Backend(Protocol):
        def analyze(self, text: str) -> list: ...

    assert _checkable(Backend) is Any
    assert _checkable(list[str] | None) == (list[str] | None)
