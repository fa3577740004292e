"""The run report: one self-contained HTML file plus PNG plots."""

from __future__ import annotations

import base64
import math
import re

import pytest

pytest.importorskip("matplotlib")

from tunelab.eval.report import write_report  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train_rows(n: int = 60) -> list[dict]:
    return [
        {"step": s, "epoch": s / 50, "loss": 2.5 - s * 0.01, "learning_rate": 1e-4, "grad_norm": 0.8,
         "tokens_per_s": 190.2, "time": s * 0.5}
        for s in range(1, n + 1)
    ]


def _summary(**extra) -> dict:
    return {
        "run_id": "sft-demo-20250101-000000-abcd",
        "status": "completed",
        "best_step": 50,
        "best_eval_loss": 1.7,
        "early_stopped": True,
        "stopped_step": 60,
        "train_runtime_s": 300,
        "tokens_per_s": float("nan"),
        "trainable_params": 1234,
        "total_params": 5678,
        "examples": {"kept": 95, "truncated": 5},
        **extra,
    }


def test_full_report(tmp_path):
    rows = _train_rows() + [
        {"step": 25, "epoch": 0.5, "eval_loss": 1.9},
        {"step": 50, "epoch": 1.0, "eval_loss": 1.7},
        {"step": 60, "epoch": 1.2, "eval_loss": float("nan")},
        {"step": 61, "note": "row without loss"},
    ]
    eval_metrics = {
        "models": {
            "base": {"rougeL": 0.21, "rouge1": 0.30, "bleu": 12.5, "chrf": 35.0, "exact_match": 0.05,
                     "perplexity": 9.1},
            "tuned": {"rougeL": 0.35, "rouge1": 0.42, "bleu": 20.0, "chrf": 48.0, "exact_match": 0.12,
                      "perplexity": 6.4},
        },
        "n_examples": 100,
        "decoding": {"max_new_tokens": 128, "do_sample": False},
    }
    samples = [
        {"id": f"ex-{i}", "prompt": f"Question {i} & <b>bold</b>?", "reference": "An answer.",
         "outputs": {"base": "meh", "tuned": "<script>alert('x')</script>"}}
        for i in range(25)
    ]

    out = write_report(
        tmp_path, title="Demo <run>", config={"lr": 1e-4, "model": "tiny"}, summary=_summary(),
        metrics_rows=rows, eval_metrics=eval_metrics, samples=samples,
        lineage={"dataset": "data/train.jsonl", "sha256": "abc"}, environment={"python": "3.11"},
    )

    assert out == tmp_path / "report.html"
    assert out.is_file()
    assert not (tmp_path / "report.html.tmp").exists()
    html = out.read_text(encoding="utf-8")

    for metric in ("rougeL", "rouge1", "bleu", "chrf", "exact_match", "perplexity"):
        assert f">{metric}<" in html
    assert "<th>base</th>" in html and "<th>tuned</th>" in html
    assert "tuned − base" in html
    assert "+0.14" in html  # rougeL delta
    assert "—" in html  # NaN tokens_per_s

    # Summary keys, nested ones flattened.
    assert "examples.truncated" in html and "run_id" in html

    # Plots embedded, decodable as PNG, and also written to disk.
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2
    for data in images:
        assert base64.b64decode(data).startswith(PNG_SIGNATURE)
    for name in ("loss.png", "metrics.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_SIGNATURE)

    # Self-contained and escaped.
    assert 'src="http' not in html and 'href="http' not in html
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<title>Demo &lt;run&gt;</title>" in html
    assert "Question 19 &amp; &lt;b&gt;bold&lt;/b&gt;?" in html
    assert "Question 20 " not in html  # at most 20 samples


def test_report_without_eval_or_validation(tmp_path):
    summary = _summary(best_step=None, early_stopped=False, best_eval_loss=float("nan"))
    out = write_report(tmp_path / "run", title="Bare run", config={}, summary=summary,
                       metrics_rows=_train_rows(5), samples=[])

    html = out.read_text(encoding="utf-8")
    assert "No evaluation was run." in html
    assert "No samples." in html
    assert html.count("data:image/png;base64,") == 1
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()
    assert not (tmp_path / "run" / "plots" / "metrics.png").exists()


def test_report_with_no_rows_and_one_model(tmp_path):
    eval_metrics = {"models": {"tuned": {"rougeL": 0.3, "perplexity": math.inf}}}
    out = write_report(tmp_path, title="t", config={}, summary={}, metrics_rows=[], eval_metrics=eval_metrics)

    html = out.read_text(encoding="utf-8")
    assert "<th>tuned</th>" in html and "tuned − base" not in html
    assert (tmp_path / "plots" / "metrics.png").is_file()
