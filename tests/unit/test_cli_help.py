"""Every CLI argument and option has a help text; 'train --help' shows the smoke run; tables fit the terminal."""

from __future__ import annotations

import io

import typer

from tunelab.cli import app


def _commands(cmd, path: str = "tunelab"):
    yield path, cmd
    if hasattr(cmd, "commands"):  # a group (typer's own click types)
        for name, sub in cmd.commands.items():
            yield from _commands(sub, f"{path} {name}")


def test_every_argument_and_option_has_help():
    commands = dict(_commands(typer.main.get_command(app)))
    assert {"tunelab train", "tunelab validate", "tunelab runs list", "tunelab models pull"} <= set(commands)
    missing = [f"{path} {p.name}" for path, cmd in _commands(typer.main.get_command(app)) for p in cmd.params
               if p.name != "help" and not (getattr(p, "help", None) or "").strip()]
    assert not missing, missing


def test_train_help_shows_a_smoke_run_and_models_pull_the_names():
    from typer.testing import CliRunner

    from tunelab.models.resolve import PACKAGED

    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "160"})
    assert r.exit_code == 0 and "--set train.max_steps=5 --set data.limit=40" in r.output
    r = CliRunner().invoke(app, ["models", "pull", "--help"], env={"COLUMNS": "400"})
    assert all(name in r.output for name in PACKAGED), r.output


def test_tables_fold_or_stack_instead_of_cutting_column_names():
    from rich.console import Console

    from tunelab._console import show, table

    names = ("id", "kind", "status", "created", "base model", "dataset", "key metrics")
    row = ("sft-demo-20250101-000000-abcd", "sft", "completed", "2025-01-01 00:00", "smollm2-135m-instruct",
           "ds-123456", "final_train_loss=1.234, best_eval_loss=1.1")
    for width in (40, 60, 75, 100, 200):
        t = table(*names, title="runs")
        t.add_row(*row)
        buf = io.StringIO()
        show(Console(width=width, file=buf, color_system=None), t)
        text = buf.getvalue()
        assert all(len(line) <= width for line in text.splitlines()), width
        words = text.replace("┃", " ").replace("│", " ").split()
        for n in names:
            assert all(w in words for w in n.split()), (width, n)  # every column name whole
        body = [line.split("│")[1] for line in text.splitlines() if line.startswith("│")]
        first = "".join(x.strip() for x in body) if body else "".join(text.split())
        assert row[0] in first, width  # the id whole: folded over lines at most, never cut
