"""A file given where a YAML recipe/suite/answers/settings file is expected that is no such file (a folder,
missing, unreadable, empty, binary, not UTF-8, not YAML, a list or a scalar): one line naming the file and
the fix, exit code 2, no traceback, from every command that reads one."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import run_cli
from tunelab.cli import app

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipe: sft\nmodel: {name: m}\ndata: {train: t.jsonl}\n"

# every command that loads a YAML config file through tunelab/config.py, with the file as its argument
COMMANDS = {
    "train": ["train", "{}"],
    "validate": ["validate", "{}"],
    "train --nproc": ["train", "--nproc", "2", "{}"],
    "data prepare": ["data", "prepare", "{}"],
    "compare": ["compare", "{}"],
    "advise": ["advise", "{}"],
    "advise --measure": ["advise", "--measure", "{}"],
    "server --config": ["server", "--config", "{}"],
}

# file content → what the one line must say
ODD = {
    "empty": (b"", "is empty"),
    "blank": (b"  \n\n", "is empty"),
    "list": (b"- recipe: sft\n- model: m\n", "holds a list; the top level of a"),
    "scalar": (b"sft\n", "holds a single value"),
    "number": (b"42\n", "holds a single value"),
    "latin1": ("recipe: sft\nmodel:\n  name: café\n".encode("latin-1"),
               "is not UTF-8 text (byte 0xe9 at line 3, column 12)"),
    "binary": (bytes(range(256)) * 4, "is a binary file, not a YAML"),
    "utf16": ("recipe: sft\n".encode("utf-16"), "is UTF-16 text"),
    "bad yaml": (b"recipe: sft\nmodel: [unclosed\n", "not valid YAML at line 3, column 1"),
}


def _invoke(args: list[str], tmp_path: Path):
    return CliRunner().invoke(app, [*args, "-w", str(tmp_path / "ws")] if args[0] in ("train", "data", "compare")
                              else args, env={"COLUMNS": "400", "TUNELAB_WORKSPACE": str(tmp_path / "ws")})


def _one_line_error(r, *wanted: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    err = r.stderr.strip()
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError, AttributeError))
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for w in wanted:
        assert w in err, err
    return err


@pytest.mark.parametrize("cmd", COMMANDS, ids=str)
def test_a_folder_is_named_a_folder_with_the_yaml_file_to_give(cmd, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "sft.yaml").write_text(RECIPE)
    args = [a.replace("{}", str(folder)) for a in COMMANDS[cmd]]
    err = _one_line_error(_invoke(args, tmp_path), f"{folder} is a folder, not a ", "give the YAML file, e.g. "
                          f"{folder / 'sft.yaml'}")
    assert "not found" not in err
    # a folder with no YAML in it says so, and still what to give
    (folder / "sft.yaml").unlink()
    _one_line_error(_invoke(args, tmp_path), f"{folder} is a folder with no .yaml file in it")


@pytest.mark.parametrize("case", ODD, ids=str)
def test_odd_files_each_get_one_clear_line(case, tmp_path):
    content, wanted = ODD[case]
    f = tmp_path / "recipe.yaml"
    f.write_bytes(content)
    for cmd in ("train", "validate", "compare"):
        args = [a.replace("{}", str(f)) for a in COMMANDS[cmd]]
        _one_line_error(_invoke(args, tmp_path), str(f), wanted)


def test_each_file_kind_is_named_for_its_command(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("- a\n")
    for cmd, what in (("validate", "recipe file"), ("compare", "suite file"), ("advise", "answers file"),
                      ("server --config", "settings file")):
        _one_line_error(_invoke([a.replace("{}", str(f)) for a in COMMANDS[cmd]], tmp_path), f"a {what} must be")


def test_missing_unreadable_and_data_files(tmp_path, monkeypatch):
    _one_line_error(_invoke(["train", str(tmp_path / "nope.yaml")], tmp_path),
                    f"recipe file not found: {tmp_path / 'nope.yaml'}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    _one_line_error(_invoke(["train", str(data)], tmp_path), "not valid YAML at line 2",
                    "train.jsonl looks like a data or model file: give the recipe YAML that names it")

    # unreadable (chmod 000 does not stop root, so the read itself is made to fail as it would for a user)
    locked = tmp_path / "locked.yaml"
    locked.write_text(RECIPE)
    real = Path.read_bytes

    def deny(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    for cmd in ("train", "validate", "compare"):
        _one_line_error(_invoke([a.replace("{}", str(locked)) for a in COMMANDS[cmd]], tmp_path),
                        f"{locked}: permission denied")


def test_pipeline_stage_file_that_is_a_folder(tmp_path):
    (tmp_path / "stage").mkdir()
    p = tmp_path / "pipe.yaml"
    p.write_text(f"recipe: pipeline\nname: p\nstages:\n  - file: {tmp_path / 'stage'}\n")
    r = _invoke(["train", str(p)], tmp_path)
    assert r.exit_code == 2 and f"stages.0.file: {tmp_path / 'stage'} is a folder" in r.stderr


def test_folder_through_the_real_cli(tmp_path):
    """The installed entry point, end to end: exit code 2, one line on stderr, nothing on stdout."""
    (tmp_path / "runs").mkdir()
    r = run_cli("train", str(tmp_path / "runs"), "-w", str(tmp_path / "ws"))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'runs'} is a folder with no .yaml file in it, "
                                             f"not a recipe file; give the YAML file itself, e.g. "
                                             f"{tmp_path / 'runs' / 'recipe.yaml'}"]
