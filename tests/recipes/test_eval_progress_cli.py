"""No silent phase: ``tunelab eval`` on a tiny run announces every phase on stderr, with what it does and a count,
and its generation bars advance once per example (not once per batch); the output is plain lines in a pipe."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import run_cli, write_color_data


@pytest.mark.slow  # ~4 min on a loaded 2-core machine: a training run and two CLI processes
def test_eval_announces_every_phase_and_bars_count_examples(tmp_path, tiny_model):
    train = write_color_data(tmp_path / "train.jsonl", 40, seed=1)
    test = write_color_data(tmp_path / "test.jsonl", 12, seed=2)
    cfg = {"recipe": "sft", "name": "tiny", "model": {"name": str(tiny_model)},
           "data": {"train": str(train), "test": str(test), "max_length": 64},
           "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"learning_rate": 1e-2, "max_steps": 2, "batch_size": 8, "seed": 7},
           # the batch is larger than the set: a per-batch bar would jump 0 -> 10 in one update
           "eval": {"max_new_tokens": 6, "batch_size": 20}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    ws = tmp_path / "ws"
    r = run_cli("train", str(tmp_path / "r.yaml"), "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = next((ws / "runs").iterdir()).name

    r = run_cli("eval", run_id, "-w", str(ws), "--limit", "10", env={"TUNELAB_PROGRESS_INTERVAL": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    assert "\r" not in err, "a pipe gets whole lines, not carriage-return redraws"
    phases = [rf"eval {re.escape(run_id)}: 10 held-out examples", r"loading the tuned model",
              r"tuned: generate", r"tuned: reference perplexity", r"tuned: metrics with \d+-resample bootstrap",
              r"latency timing tuned \(\d+ single requests\)", r"forgetting probe of tuned: perplexity on \d+",
              r"base: generate", r"base: reference perplexity", r"latency timing base", r"forgetting probe of base",
              r"tuned − base: paired bootstrap", r"writing .*report\.html"]
    missing = [p for p in phases if not re.search(p, err)]
    assert not missing, f"phases that did not announce themselves: {missing}\n{err[-4000:]}"
    for name in ("tuned", "base"):
        for phase in ("generate", "reference perplexity"):
            seen = {int(m) for m in re.findall(rf"^{name}: {phase}:.*?\b(\d+)/10\b", err, re.MULTILINE)}
            assert seen == set(range(11)), f"{name} {phase}: the bar showed {sorted(seen)}, not every example"
