"""`tunelab train` starts over once with jemalloc/tcmalloc preloaded where the machine has one
(tunelab/allocator.py), says so, and records the allocator it ran on in environment.json."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import run_cli
from tests.recipes.test_run_lifecycle import _recipe
from tunelab import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def test_train_runs_on_the_chosen_allocator_and_records_it(tmp_path, tiny_model):
    recipe = _recipe(tmp_path, str(tiny_model), epochs=1, max_steps=2)
    env = {"OMP_NUM_THREADS": "1", "TUNELAB_ALLOCATOR": "auto", allocator.CHOSEN: "", "LD_PRELOAD": ""}
    expected, lib, _ = allocator.choose(env)
    runs = {}
    for setting in ("auto", "system"):
        ws = tmp_path / f"ws-{setting}"
        r = run_cli("train", str(recipe), "-w", str(ws), env={**env, "TUNELAB_ALLOCATOR": setting})
        assert r.returncode == 0, r.stderr[-3000:]
        (run_dir,) = (ws / "runs").iterdir()
        runs[setting] = (r.stdout, json.loads((run_dir / "environment.json").read_text())["allocator"])
    out, used = runs["auto"]
    assert used == expected  # read from the process's own memory map, not from the setting
    if lib is not None:
        assert f"memory allocator: {expected} (preloaded" in out
    out, used = runs["system"]
    assert used == "system" and "memory allocator: the C library's (TUNELAB_ALLOCATOR=system)" in out
