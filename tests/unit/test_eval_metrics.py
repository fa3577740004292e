"""Metrics by name with bootstrap intervals, the paired test, judges, and every bad input."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from tunelab.errors import TunelabError  # noqa: E402
from tunelab.scoring import metrics as M  # noqa: E402
from tunelab.scoring import stats as S  # noqa: E402

PREDS = ["the cat sat on the mat", "a dog barked loudly", "it rained all day", "hello world", "blue sky"]
REFS = ["the cat sat on a mat", "the dog barked", "it was sunny all day", "hello world", "green grass"]


def test_every_text_metric_has_a_value_inside_its_interval():
    s = M.evaluate(M.GENERATION_METRICS, PREDS, REFS, n_resamples=300)
    assert list(s.values) == list(M.GENERATION_METRICS)
    for name, v in s.values.items():
        assert v["n"] == len(PREDS)
        assert v["ci_low"] <= v["value"] <= v["ci_high"], name
    assert s.values["exact_match"]["value"] == pytest.approx(1 / 5)
    # the legacy helpers and the registry agree
    legacy = M.text_metrics(PREDS, REFS)
    for k, v in legacy.items():
        assert s.values[k]["value"] == pytest.approx(v, abs=1e-12)


def test_interval_narrows_with_more_examples_and_is_reproducible():
    import random

    rng = random.Random(0)
    small = [float(rng.random() < 0.6) for _ in range(30)]
    big = [float(rng.random() < 0.6) for _ in range(3000)]
    lo_s, hi_s = S.bootstrap_ci(S.mean_statistic(small), n_resamples=500)
    lo_b, hi_b = S.bootstrap_ci(S.mean_statistic(big), n_resamples=500)
    assert hi_b - lo_b < (hi_s - lo_s) / 3
    assert S.bootstrap_ci(S.mean_statistic(small), seed=3) == S.bootstrap_ci(S.mean_statistic(small), seed=3)


def test_percentile_interval_matches_scipy_bootstrap():
    """Our resampling against scipy.stats.bootstrap (percentile): the same interval up to Monte Carlo noise."""
    import numpy as np
    from scipy.stats import bootstrap

    x = np.random.default_rng(1).normal(size=400)
    ours = S.bootstrap_ci(S.mean_statistic(x), n_resamples=4000, seed=0)
    ref = bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    se = x.std() / len(x) ** 0.5
    assert abs(ours[0] - ref.low) < 0.1 * se * 4 and abs(ours[1] - ref.high) < 0.1 * se * 4


def test_corpus_metric_resamples_by_recomputing():
    s = M.evaluate(["bleu"], PREDS * 4, REFS * 4, n_resamples=200)
    v = s.values["bleu"]
    assert v["ci_low"] < v["value"] < v["ci_high"]
    import numpy as np

    import sacrebleu

    idx = np.array([0, 0, 3, 1, 2])
    assert s.stats["bleu"](idx[None, :])[0] == pytest.approx(
        sacrebleu.corpus_bleu([PREDS[i] for i in idx], [[REFS[i] for i in idx]]).score)


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    import random

    rng = random.Random(0)
    a = [float(rng.random() < 0.5) for _ in range(400)]
    b = [1.0 if x == 1.0 or rng.random() < 0.3 else 0.0 for x in a]  # b fixes some of a's misses
    r = S.paired_bootstrap(S.mean_statistic(a), S.mean_statistic(b), n_resamples=1000)
    assert r["difference"] > 0 and r["ci_low"] > 0 and r["p_value"] < 0.01
    same = S.paired_bootstrap(S.mean_statistic(a), S.mean_statistic(a), n_resamples=200)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    c = [float(rng.random() < 0.5) for _ in range(400)]
    null = S.paired_bootstrap(S.mean_statistic(a), S.mean_statistic(c), n_resamples=1000)
    assert null["ci_low"] <= 0 <= null["ci_high"] or null["p_value"] < 0.05  # consistent either way
    assert null["p_value"] > 0.01


def test_classification_metrics_and_roc_auc():
    from sklearn.metrics import f1_score, roc_auc_score

    refs = ["a", "b", "c", "a", "b", "c", "a", "a"]
    preds = ["a", "b", "b", "a", "c", "c", "a", "b"]
    s = M.evaluate(M.CLASSIFICATION_METRICS, preds, refs, n_resamples=100)
    for avg in M.AVERAGES:
        assert s.values[f"f1_{avg}"]["value"] == pytest.approx(f1_score(refs, preds, average=avg))
    assert s.values["accuracy"]["value"] == pytest.approx(5 / 8)
    y = [0, 1, 1, 0, 1, 0, 1, 0]
    p = [0.1, 0.9, 0.4, 0.35, 0.8, 0.2, 0.7, 0.6]
    assert M.evaluate(["roc_auc"], p, y, n_resamples=100).values["roc_auc"]["value"] == pytest.approx(
        roc_auc_score(y, p))
    probs = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.6, 0.2, 0.2], [0.2, 0.3, 0.5],
             [0.1, 0.1, 0.8], [0.5, 0.4, 0.1], [0.3, 0.6, 0.1]]
    got = M.evaluate(["roc_auc"], probs, refs, n_resamples=100, labels=["a", "b", "c"]).values["roc_auc"]
    assert got["value"] == pytest.approx(roc_auc_score(refs, probs, multi_class="ovr", average="macro"))


def test_pairwise_winrate_perplexity():
    s = M.evaluate(["pairwise_accuracy"], [2.0, 1.0, 0.5, 3.0], [1.0, 1.0, 0.7, 0.0], n_resamples=50)
    assert s.values["pairwise_accuracy"]["value"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    w = M.evaluate(["win_rate"], ["win", "tie", "loss", 1, 1.0], n_resamples=50)
    assert w.values["win_rate"]["value"] == pytest.approx(3.5 / 5)
    import math

    p = M.evaluate(["perplexity"], [2.0, 6.0], [2, 4], n_resamples=50)
    assert p.values["perplexity"]["value"] == pytest.approx(math.exp(8 / 6))


@pytest.mark.parametrize("call, message", [
    (lambda: M.evaluate(["rougeL"], [], []), "no examples"),
    (lambda: M.evaluate(["bleu"], ["a", "b"], ["a"]), "2 predictions but 1 references"),
    (lambda: M.evaluate(["rouge9"], ["a"], ["a"]), "unknown metric 'rouge9'; known: rouge1"),
    (lambda: M.evaluate([], ["a"], ["a"]), "no metrics"),
    (lambda: M.evaluate(["rougeL"], ["a"], None), "needs references"),
    (lambda: M.evaluate(["rougeL"], [None], ["a"]), "predictions must be strings"),
    (lambda: M.evaluate(["win_rate"], ["maybe"]), "win, tie or loss"),
    (lambda: M.evaluate(["roc_auc"], [0.2, 0.4], [1, 1]), "roc_auc: unusable input"),
    (lambda: M.evaluate(["perplexity"], [1.0], [0]), "perplexity: unusable input"),
    (lambda: S.bootstrap_ci(S.mean_statistic([1, 2]), confidence=1.5), "confidence"),
    (lambda: S.paired_bootstrap(S.mean_statistic([1, 2]), S.mean_statistic([1])), "same examples"),
    (lambda: M.bertscore_model("no-such-encoder"), "neither a local model folder"),
])
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(TunelabError) as e:
        call()
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_single_example_has_no_interval():
    v = M.evaluate(["exact_match"], ["x"], ["x"]).values["exact_match"]
    assert v["value"] == 1.0 and v["ci_low"] is None and v["ci_high"] is None


def test_reward_judge():
    from tunelab.eval.judge import reward_judgments

    scorer = lambda prompts, comps: [len(c) for c in comps]  # noqa: E731  longer is "better"
    j = reward_judgments(scorer, ["p"] * 3, ["aa", "a", "abc"], ["a", "bb", "xyz"])
    assert j == [0.0, 1.0, 0.5]
    with pytest.raises(TunelabError, match="one prompt per answer pair"):
        reward_judgments(scorer, ["p"], ["a", "b"], ["c"])


class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that always prefers the answer containing 'good'."""

    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeJudge.seen.append((self.path, body, self.headers.get("Authorization")))
        text = body["messages"][0]["content"]
        first = text.split("Answer 1:")[1].split("Answer 2:")[0]
        second = text.split("Answer 2:")[1]
        verdict = "1" if "good" in first and "good" not in second else "2" if "good" in second else "tie"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"{verdict}"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_llm_judge_against_a_local_openai_compatible_server(monkeypatch):
    from tunelab.eval.judge import LLMJudge

    _FakeJudge.seen.clear()  # other tests use the same fake server class
    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        judge = LLMJudge(f"http://127.0.0.1:{server.server_port}/v1", "judge-model", api_key_env="JUDGE_KEY", seed=1)
        a = ["good answer", "bad", "meh", "bad"] * 5
        b = ["bad", "good answer", "meh", "good too"] * 5
        j = judge(["q"] * len(a), a, b)
        assert j == [0.0, 1.0, 0.5, 1.0] * 5  # mapped back correctly whichever order it was shown in
        paths = {p for p, _, _ in _FakeJudge.seen}
        assert paths == {"/v1/chat/completions"}
        assert {k for _, _, k in _FakeJudge.seen} == {"Bearer sk-test"}
        assert _FakeJudge.seen[0][1]["model"] == "judge-model"
        # both orders were used (position-bias control)
        firsts = [b_["messages"][0]["content"].split("Answer 1:")[1][:8] for _, b_, _ in _FakeJudge.seen[:8]]
        assert len(set(firsts)) > 2
        s = M.evaluate(["win_rate"], j, n_resamples=200)
        assert s.values["win_rate"]["value"] == pytest.approx(0.625)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(TunelabError, match="unreachable"):
        LLMJudge(f"http://127.0.0.1:{server.server_port}/v1", "m", timeout=2)(["q"], ["a"], ["b"])
