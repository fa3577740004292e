"""Progress in a pipe or a job log: one plain line per update (no carriage returns), and training's validation
passes get a bar of their own (the Trainer's bars are off), counting examples."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace


def _capture(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)  # not a terminal
    monkeypatch.setenv("TUNELAB_PROGRESS_INTERVAL", "0")
    return buf


def _counts(lines, prefix):
    """The counts a bar showed, in order, a repeat of the last one (its closing line) dropped."""
    out = []
    for line in lines:
        if line.startswith(prefix):
            n = int(line.split("|")[-1].split("/")[0])
            if not out or out[-1] != n:
                out.append(n)
    return out


def test_progress_writes_plain_lines_per_update_when_not_a_terminal(monkeypatch):
    from tunelab._console import progress, status

    buf = _capture(monkeypatch)
    status("phase: 3 things")
    with progress(3, "work") as bar:
        for _ in range(3):
            bar.update(1)
    for _ in progress(["a", "b"], "items"):
        pass
    out = buf.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[0] == "phase: 3 things"
    assert _counts(lines, "work:") == [0, 1, 2, 3]
    assert any(line.startswith("items:") and "2/2" in line for line in lines)


def test_training_validation_pass_has_a_bar_counting_examples(monkeypatch):
    from tunelab.train.callbacks import Progress

    buf = _capture(monkeypatch)
    cb = Progress()
    state = SimpleNamespace(max_steps=4, global_step=2)
    args = SimpleNamespace(per_device_eval_batch_size=4)
    loader = SimpleNamespace(dataset=list(range(10)), batch_size=4)
    cb.on_train_begin(args, state, None)
    for _ in range(3):  # 4 + 4 + 2 examples
        cb.on_prediction_step(args, state, None, eval_dataloader=loader)
    cb.on_evaluate(args, state, None)
    cb.on_train_end(args, state, None)
    assert _counts(buf.getvalue().splitlines(), "validation at step 2") == [0, 4, 8, 10]
