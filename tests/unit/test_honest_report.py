"""Reports never flatter: a tuned model that is slower and worse is called slower and worse, neutral figures
(tokens and seconds generated) are never called better, and the ROI credits only acceptable answers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("rouge_score")
pytest.importorskip("statsmodels")

from tunelab.scoring import metrics as M  # noqa: E402
from tunelab.eval.business import BusinessSection, costs, quality_share, speed_differences  # noqa: E402
from tunelab.eval.run import paired_differences, print_eval  # noqa: E402

N = 30
BOOT = {"n_resamples": 500, "seed": 0}
REFS = [f"the order {i} ships on monday to the warehouse in lyon by truck" for i in range(N)]


def _latency(total: list[float], tokens: float) -> dict:
    return {"requests": len(total), "max_new_tokens": 32, "first_token_s": {"p50": min(total) / 4, "p95": None},
            "total_s": {"p50": sorted(total)[len(total) // 2], "p95": max(total)},
            "tokens_per_s": tokens * len(total) / sum(total), "mean_generated_tokens": tokens,
            "samples_total_s": total, "samples_first_token_s": [t / 4 for t in total]}


def _model(preds: list[str], nll: list[float], gen_tokens: int, gen_s: float, latency: list[float], name: str,
           bcfg: BusinessSection):
    text = M.evaluate(M.GENERATION_METRICS, preds, REFS, **BOOT)
    ppl = M.evaluate(["perplexity"], nll, [10] * N, **BOOT)
    values = {**text.flat(), "perplexity": ppl.values["perplexity"]["value"],
              "ci": {k: [v["ci_low"], v["ci_high"]] for k, v in {**text.values, **ppl.values}.items()},
              "generated_tokens": gen_tokens, "generation_s": gen_s,
              "generation_tokens_per_s": round(gen_tokens / gen_s, 2)}
    lat = _latency(latency, gen_tokens / N)
    q = quality_share(name, text.values[bcfg.quality_metric]["per_example"], bcfg)
    business = {"latency": lat, "memory": {"peak_bytes": 2**28, "what": "test"},
                "size": {"parameters": 1000, "model_bytes": 4000}, "training": None,
                "cost": costs(lat, None, bcfg, q), "device": "cpu"}
    return values, {**text.stats, **ppl.stats}, business


@pytest.fixture(scope="module")
def slower_and_worse():
    """The issue's case: the tuned model generates more tokens for longer (neutral), answers worse and is
    slower per request than its base."""
    bcfg = BusinessSection()
    good = list(REFS)
    bad = [f"sorry i cannot help with order {i}" for i in range(N)]
    base = _model(good, [12.0 + (i % 3) * 0.1 for i in range(N)], 750, 20.26, [0.50 + 0.01 * (i % 4) for i in range(8)],
                  "base", bcfg)
    tuned = _model(bad, [25.0 + (i % 3) * 0.1 for i in range(N)], 829, 22.55,
                   [0.80 + 0.01 * (i % 4) for i in range(8)], "tuned", bcfg)
    res = {"run_id": "sft-x", "n_examples": N, "models": {"base": base[0], "tuned": tuned[0]},
           "bootstrap": {**BOOT, "confidence": 0.95},
           "differences": paired_differences(base[1], tuned[1], base[0], tuned[0], BOOT),
           "business": {"base": base[2], "tuned": tuned[2]},
           "speed_differences": speed_differences(base[2], tuned[2], **BOOT)}
    return json.loads(json.dumps(res))  # what metrics.json holds


def test_results_json_says_worse_and_slower(slower_and_worse):
    res = slower_and_worse
    d = res["differences"]
    for k in ("rougeL", "rouge1", "bleu", "chrf", "perplexity"):
        assert d[k]["verdict"] == "worse" and d[k]["better"] is False, k
        assert d[k]["ci_low"] <= d[k]["difference"] <= d[k]["ci_high"]
    assert d["perplexity"]["direction"] == "lower" and d["perplexity"]["difference"] > 0
    # more tokens and more seconds are neither better nor worse
    for k in ("generated_tokens", "generation_s"):
        assert d[k]["direction"] == "neutral" and d[k]["verdict"] == "neutral" and d[k]["better"] is None
    # tokens/s has a direction but no paired test here: no verdict either way
    assert d["generation_tokens_per_s"]["verdict"] == "not tested"
    assert not any(v["verdict"] == "better" for v in d.values())
    s = res["speed_differences"]["latency_total_s"]
    assert s["difference"] > 0 and s["verdict"] == "worse"
    # ROI: the base answers every held-out ticket acceptably, the tuned model none: it earns no benefit
    bt, bb = res["business"]["tuned"]["cost"], res["business"]["base"]["cost"]
    assert bb["acceptable_share"] == 1.0 and bt["acceptable_share"] == 0.0
    assert bt["benefit"] == 0.0 and bt["roi"] < bb["roi"]
    assert "rougeL ≥ 0.5" in bt["assumptions"]["acceptable_answers"]


def test_console_says_worse_and_slower(slower_and_worse, capsys):
    print_eval(slower_and_worse)
    out = capsys.readouterr().out
    assert "better on nothing; worse on rougeL" in out
    line = next(x for x in out.splitlines() if "generation_s" in x)
    assert "neutral" in line and "better" not in line.replace("↑ better", "").replace("↓ better", "")
    # the difference's interval is printed, not only a p-value
    d = slower_and_worse["differences"]["rougeL"]
    assert f"{d['ci_low']:+.4f}, {d['ci_high']:+.4f}" in out
    assert "tuned vs base, total latency per request" in out and ": slower" in out
    roi = [x for x in out.splitlines() if "ROI over" in x]
    assert len(roi) == 2 and "0% acceptable answers (held-out answers with rougeL ≥ 0.5)" in roi[1]


def test_html_says_worse_and_slower(slower_and_worse, tmp_path):
    from tunelab.eval.report import write_report

    html = write_report(tmp_path, title="t", config={}, summary={}, metrics_rows=[],
                        eval_metrics=slower_and_worse).read_text(encoding="utf-8")
    row = next(r for r in html.split("<tr>") if ">rougeL<" in r)
    assert '<td class="down">worse</td>' in row
    row = next(r for r in html.split("<tr>") if ">generation_s<" in r)
    assert "<td class=\"\">neutral</td>" in row and "up" not in row
    assert ": slower" in html and "acceptable answers (share)" in html
    assert '<td class="up">' not in html


def test_no_quality_measured_no_benefit():
    c = costs(_latency([0.5] * 4, 10), None, BusinessSection(), None)
    assert c["benefit"] is None and c["roi"] is None
    assert "no benefit credited" in c["assumptions"]["acceptable_answers"]
    # a human acceptance share, when given, is the measure
    q = quality_share("tuned", [0.0] * 5, BusinessSection(acceptance={"tuned": 0.75}))
    assert q["share"] == 0.75 and "human acceptance" in q["what"]


def test_every_metric_declares_a_direction():
    assert set(M.DIRECTION) >= set(M.METRICS)
    assert M.direction("perplexity") == "lower" and M.direction("rougeL") == "higher"
    assert M.direction("something_new") == "neutral"
    assert M.verdict("rougeL", 0.1, False) == "no significant difference"
    assert M.verdict("perplexity", -1.0, True) == "better" and M.verdict("generated_tokens", 5, True) == "neutral"


def test_final_loss_is_the_example_weighted_last_epoch():
    """17 examples at batch 8: steps of 8, 8 and 1 example; the 1-example step's loss counts as one example."""
    from types import SimpleNamespace

    from tunelab.train._run import final_loss

    losses = [1.0, 0.9, 3.55, 0.8, 0.85, 3.5]
    tr = SimpleNamespace(
        state=SimpleNamespace(log_history=[{"step": i + 1, "loss": v, "epoch": (i + 1) / 3} for i, v in
                                           enumerate(losses)] + [{"step": 6, "eval_loss": 0.7}]),
        args=SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1, world_size=1),
        train_dataset=list(range(17)))
    out = final_loss(tr)
    assert out["final_train_loss"] == pytest.approx((8 * 0.8 + 8 * 0.85 + 1 * 3.5) / 17)
    assert out["last_step_loss"] == 3.5 and out["last_step_examples"] == 1 and out["final_train_loss_steps"] == 3
    # a run shorter than an epoch: all its steps
    tr.state.log_history = tr.state.log_history[:2]
    assert final_loss(tr)["final_train_loss"] == pytest.approx(0.95)
