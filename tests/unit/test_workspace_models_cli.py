"""Catalog, model resolution errors, and the CLI surface (help everywhere, light imports)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli
from tunelab.catalog import MIGRATIONS, Catalog
from tunelab.errors import TunelabError
from tunelab.models import resolve
from tunelab.models.resolve import PACKAGED, list_models
from tunelab.workspace import Workspace


def test_catalog_roundtrip_and_migrations(tmp_path):
    c = Catalog(tmp_path / "t.db")
    c.add_run(id="sft-1", kind="sft", dir=tmp_path, base_model="m", dataset_id="ds-1", config={"a": 1})
    c.add_run(id="eval-1", kind="eval", dir=tmp_path, parent_id="sft-1", status="completed")
    c.update_run("sft-1", status="completed", metrics={"loss": 0.5})
    r = c.get_run("sft-1")
    assert r["status"] == "completed" and r["metrics"] == {"loss": 0.5} and r["config"] == {"a": 1}
    assert [x["id"] for x in c.list_runs(parent_id="sft-1")] == ["eval-1"]
    assert [x["id"] for x in c.list_runs(kind="sft")] == ["sft-1"]
    import sqlite3

    assert sqlite3.connect(tmp_path / "t.db").execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    Catalog(tmp_path / "t.db")  # reopening applies nothing twice
    assert Catalog(tmp_path / "t.db").get_run("sft-1")["kind"] == "sft"


def test_run_dir_lookup(tmp_path):
    ws = Workspace.resolve(tmp_path)
    rid, d = ws.new_run_dir("sft", "my run!")
    (d / "config.yaml").write_text("recipe: sft\n")
    assert rid.startswith("sft-my-run-") and ws.run_dir(rid) == d and ws.run_dir(rid[:12]) == d
    assert ws.run_dir(str(d)) == d
    with pytest.raises(TunelabError, match="no run"):
        ws.run_dir("nope")


def test_resolve_local_folder_and_errors(tmp_path, tiny_model):
    ws = Workspace.resolve(tmp_path / "ws")
    assert resolve(str(tiny_model), ws) == tiny_model.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="no config.json"):
        resolve(str(tmp_path / "empty"), ws)
    with pytest.raises(TunelabError, match="unknown model"):
        resolve("not a model", ws)
    with pytest.raises(TunelabError, match="not pulled yet"):
        resolve("smollm2-135m-instruct", ws, pull_packaged=False)


def test_unreachable_hub_id_is_one_line(tmp_path):
    # HF_HUB_OFFLINE=1 (set for the whole suite) makes the hub unreachable, as on a machine without network.
    r = run_cli("models", "pull", "someorg/some-model-that-is-not-cached", "-w", str(tmp_path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "huggingface-cli download someorg/some-model-that-is-not-cached" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2


def test_models_list(tmp_path):
    rows = list_models(Workspace.resolve(tmp_path))
    names = [r["name"] for r in rows]
    assert "smollm2-135m-instruct" in names and all(r["kind"] == "packaged" for r in rows if r["name"] in PACKAGED)
    r = run_cli("models", "list", "-w", str(tmp_path))
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout


COMMANDS = [[], ["data"], ["data", "prepare"], ["data", "profile"], ["train"], ["validate"], ["eval"], ["report"], ["demo"], ["models"], ["models", "pull"],
            ["models", "list"], ["runs"], ["runs", "list"], ["runs", "show"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "tunelab")
def test_help_on_every_command(cmd):
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_cli_start_does_not_import_heavy_libraries():
    # `tunelab --help` must answer at once: torch/transformers/peft are imported only inside commands.
    code = ("import sys; from tunelab.cli import app; "
            "import tunelab.recipes, tunelab.train.sft, tunelab.demo, tunelab.eval.run; "
            "print(sorted(m for m in ('torch','transformers','peft','trl','datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def test_validate_command(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("recipe: sft\nmodel: {name: m}\ndata: {train: t.jsonl}\n")
    assert run_cli("validate", str(p)).returncode == 0
    p.write_text("recipe: sft\nmodel: {name: m}\ndata: {trian: t.jsonl}\n")
    r = run_cli("validate", str(p))
    assert r.returncode == 2 and "data.trian: unknown key; did you mean 'train'?" in r.stderr
    assert "data.train: required" in r.stderr
