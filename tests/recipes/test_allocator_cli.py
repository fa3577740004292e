"""`tunelab train` starts over once with jemalloc preloaded where the machine has it
(tunelab/allocator.py), says so, and records the allocator it ran on in environment.json."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import run_cli
from tests.recipes.test_run_lifecycle import _recipe
from tunelab import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def _train(tmp_path, recipe, setting: str) -> tuple[str, str]:
    env = {"OMP_NUM_THREADS": "1", "TUNELAB_ALLOCATOR": setting, allocator.CHOSEN: "", "LD_PRELOAD": "",
           "MALLOC_CONF": ""}
    ws = tmp_path / f"ws-{setting}"
    r = run_cli("train", str(recipe), "-w", str(ws), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (ws / "runs").iterdir()
    return r.stdout, json.loads((run_dir / "environment.json").read_text())["allocator"]


def test_train_runs_on_jemalloc_where_installed_and_records_it(tmp_path, tiny_model):
    name, lib, why = allocator.choose({"TUNELAB_ALLOCATOR": "auto"})
    if lib is None:
        pytest.skip(f"auto preloads nothing on this machine: {why}")
    out, used = _train(tmp_path, _recipe(tmp_path, str(tiny_model), epochs=1, max_steps=2), "auto")
    assert used == name == "jemalloc"  # LD_PRELOAD names it and the process has it mapped
    assert "memory allocator: jemalloc (preloaded" in out


def test_train_on_the_c_library_when_asked(tmp_path, tiny_model):
    out, used = _train(tmp_path, _recipe(tmp_path, str(tiny_model), epochs=1, max_steps=2), "system")
    assert used == "system" and "memory allocator: the C library's (TUNELAB_ALLOCATOR=system)" in out
