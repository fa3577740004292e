"""SFT through the real CLI with padded and with padding-free batches: the same training, step for step."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.recipes.test_sft_cli import _only_run, _recipe, _rows


def _train(tmp_path, tiny_model, padding_free: bool) -> tuple[list[dict], dict]:
    d = tmp_path / ("pf" if padding_free else "padded")
    d.mkdir()
    recipe = _recipe(d, tiny_model, train={"max_steps": 8, "eval_every": 4, "early_stopping_patience": None,
                                           "group_by_length": True, "padding_free": padding_free,
                                           "precision": "fp32"})  # fp32: the two runs compared to 1e-4
    r = run_cli("train", str(recipe), "-w", str(d / "ws"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"padding-free batches {'on' if padding_free else 'off'}" in r.stdout
    run_dir = _only_run(d / "ws")
    return _rows(run_dir), json.loads((run_dir / "summary.json").read_text())


def test_padding_free_trains_exactly_like_padded(tmp_path, tiny_model):
    padded, s_pad = _train(tmp_path, tiny_model, False)
    free, s_free = _train(tmp_path, tiny_model, True)
    assert (s_pad["padding_free"], s_free["padding_free"]) == (False, True)
    lp = [x["loss"] for x in padded if "loss" in x]
    lf = [x["loss"] for x in free if "loss" in x]
    assert len(lp) == len(lf) == 8
    assert lf == pytest.approx(lp, rel=1e-4)  # same batches, same loss at every step, updates included
    vp = [x["eval_loss"] for x in padded if "eval_loss" in x]
    vf = [x["eval_loss"] for x in free if "eval_loss" in x]
    assert len(vf) == 2 and vf == pytest.approx(vp, rel=1e-4)
    assert vf[-1] < vf[0] and sum(lf[-3:]) < sum(lf[:3])  # and it learns
    # every real token is counted once, padding never: the same token count either way
    assert s_free["tokens_seen"] == s_pad["tokens_seen"] > 0
