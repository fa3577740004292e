"""Human A/B evaluation: blind sheet out, judgments in, win rate, kappa, preference pairs."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("sklearn")

from tests.conftest import run_cli  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.eval import human as H  # noqa: E402


def _outputs(tmp_path, n=30):
    a = [{"index": i, "prompt": f"question {i}", "prediction": f"plain answer {i}"} for i in range(n)]
    # model B is better on 2 of every 3 prompts
    b = [{"index": i, "prompt": f"question {i}", "prediction": (f"good answer {i}" if i % 3 else f"poor answer {i}")}
         for i in range(n)]
    pa, pb = tmp_path / "base.jsonl", tmp_path / "tuned.jsonl"
    pa.write_text("".join(json.dumps(r) + "\n" for r in a))
    pb.write_text("".join(json.dumps(r) + "\n" for r in b))
    return pa, pb


def _fill(sheet, out, rater, flip_every=0):
    """A rater who prefers the response with 'good' in it, and disagrees on every ``flip_every``-th item."""
    with open(sheet, newline="") as f:
        rows = list(csv.DictReader(f))
    for k, r in enumerate(rows):
        pick = "1" if "good" in r["response_1"] else "2" if "good" in r["response_2"] else (
            "1" if "plain" in r["response_1"] else "2")
        if flip_every and k % flip_every == 0:
            pick = "tie"
        r["judgment"], r["rater"] = pick, rater
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=H.SHEET_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return rows


def test_blind_sheet_roundtrip_winrate_kappa_and_preference_pairs(tmp_path):
    from sklearn.metrics import cohen_kappa_score

    pa, pb = _outputs(tmp_path)
    r = H.export_sheet(H.load_outputs(pa), H.load_outputs(pb), ("base", "tuned"), tmp_path / "he", seed=3)
    sheet = tmp_path / "he" / "sheet.csv"
    text = sheet.read_text()
    assert "base" not in text and "tuned" not in text  # blind: no model names on the sheet
    rows = list(csv.DictReader(open(sheet, newline="")))
    assert [x["prompt"] for x in rows] != [f"question {i}" for i in range(30)]  # shuffled
    key = json.loads((tmp_path / "he" / "key.json").read_text())
    assert {v["response_1"] for v in key["items"].values()} == {"base", "tuned"}  # both sides used
    assert r["items"] == 30

    _fill(sheet, tmp_path / "ann.csv", "ann")
    bob = _fill(sheet, tmp_path / "bob.csv", "bob", flip_every=5)
    res = H.import_judgments(tmp_path / "he" / "key.json", [tmp_path / "ann.csv", tmp_path / "bob.csv"],
                             n_resamples=300)
    # ann: tuned wins 20 of 30; bob: the same except ties on 6 items
    assert res["items_judged"] == 30 and res["judgments"] == 60
    w = res["win_rate"]
    assert w["of"] == "tuned" and w["ci_low"] < w["value"] < w["ci_high"]
    per_item_expected = []
    for k, row in enumerate(bob):
        ann_v = 1.0 if "good" in row["response_1"] + row["response_2"] else 0.0
        bob_v = 0.5 if k % 5 == 0 else ann_v
        per_item_expected.append((ann_v + bob_v) / 2)
    assert w["value"] == pytest.approx(sum(per_item_expected) / 30)
    # kappa equals scikit-learn's on the unblinded verdicts
    js = H.read_judgments(tmp_path / "he" / "key.json", [tmp_path / "ann.csv", tmp_path / "bob.csv"])[1]
    by = {(j["rater"], j["item"]): j["winner"] for j in js}
    items = sorted(key["items"])
    ref = cohen_kappa_score([by[("ann", i)] for i in items], [by[("bob", i)] for i in items])
    (pair,) = res["agreement"]["pairs"]
    assert pair["kappa"] == pytest.approx(ref) and 0 < pair["kappa"] < 1

    # preference pairs: one per item with a majority (a tie abstains); chosen is the preferred answer
    prefs = [json.loads(l) for l in (tmp_path / "he" / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == 30
    assert all(("good" in p["chosen"]) or ("plain" in p["chosen"] and "poor" in p["rejected"]) for p in prefs)
    # the reward/DPO recipes read them as preference records
    from tunelab.train.preference import load_pairs

    rejects = []
    loaded = load_pairs(str(tmp_path / "he" / "preferences.jsonl"), None, rejects)
    assert len(loaded) == len(prefs) and not rejects


def test_split_votes_give_no_preference_pair():
    key = {"models": {"a": "base", "b": "tuned"},
           "items": {"q1": {"response_1": "base", "response_2": "tuned"}, "q2": {"response_1": "tuned",
                                                                                "response_2": "base"}}}
    js = [{"item": "q1", "rater": "r1", "winner": "base"}, {"item": "q1", "rater": "r2", "winner": "tuned"},
          {"item": "q2", "rater": "r1", "winner": "tuned"}, {"item": "q2", "rater": "r2", "winner": "tie"}]
    rows = {"q1": {"prompt": "p1", "response_1": "x1", "response_2": "y1"},
            "q2": {"prompt": "p2", "response_1": "x2", "response_2": "y2"}}
    (p,) = H.preference_pairs(key, js, rows)
    assert p == {"prompt": "p2", "chosen": "x2", "rejected": "y2", "item": "q2", "votes": {"tuned": 1, "tie": 1}}


def test_jsonl_sheet_and_single_rater_has_no_kappa(tmp_path):
    pa, pb = _outputs(tmp_path, n=6)
    H.export_sheet(H.load_outputs(pa), H.load_outputs(pb), ("base", "tuned"), tmp_path / "he", fmt="jsonl")
    rows = [json.loads(l) for l in (tmp_path / "he" / "sheet.jsonl").read_text().splitlines()]
    for r in rows:
        r["judgment"] = "1"
    (tmp_path / "filled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = H.import_judgments(tmp_path / "he" / "key.json", [tmp_path / "filled.jsonl"], n_resamples=100)
    assert res["raters"] == ["filled"] and res["agreement"]["mean_kappa"] is None
    key = json.loads((tmp_path / "he" / "key.json").read_text())
    tuned_first = sum(v["response_1"] == "tuned" for v in key["items"].values())
    assert res["win_rate"]["value"] == pytest.approx(tuned_first / 6)


def test_bad_sheets_are_clear_errors(tmp_path):
    pa, pb = _outputs(tmp_path, n=4)
    a, b = H.load_outputs(pa), H.load_outputs(pb)
    with pytest.raises(TunelabError, match="differ in length"):
        H.export_sheet(a, b[:3], ("x", "y"), tmp_path / "o")
    with pytest.raises(TunelabError, match="csv or jsonl"):
        H.export_sheet(a, b, ("x", "y"), tmp_path / "o", fmt="xlsx")
    with pytest.raises(TunelabError, match="different names"):
        H.export_sheet(a, b, ("x", "x"), tmp_path / "o")
    H.export_sheet(a, b, ("x", "y"), tmp_path / "o")
    rows = list(csv.DictReader(open(tmp_path / "o" / "sheet.csv", newline="")))
    with pytest.raises(TunelabError, match="no judgments filled in"):
        H.import_judgments(tmp_path / "o" / "key.json", [tmp_path / "o" / "sheet.csv"])
    rows[0]["judgment"] = "maybe"
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=H.SHEET_FIELDS)
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(TunelabError, match="row 2: judgment 'maybe' is not 1, 2 or tie"):
        H.import_judgments(tmp_path / "o" / "key.json", [tmp_path / "bad.csv"])
    with pytest.raises(TunelabError, match="need 'prompt' and 'prediction'"):
        (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
        H.load_outputs(tmp_path / "x.jsonl")


def test_cli_export_and_import(tmp_path):
    pa, pb = _outputs(tmp_path, n=8)
    r = run_cli("human", "export", str(pa), str(pb), "--names", "base,tuned", "--out", str(tmp_path / "he"))
    assert r.returncode == 0, r.stderr
    assert "8 items" in r.stdout
    _fill(tmp_path / "he" / "sheet.csv", tmp_path / "ann.csv", "ann")
    r = run_cli("human", "import", str(tmp_path / "he" / "key.json"), str(tmp_path / "ann.csv"))
    assert r.returncode == 0, r.stderr
    assert "win rate of tuned over base" in r.stdout
    assert json.loads((tmp_path / "he" / "human.json").read_text())["items_judged"] == 8
    bad = run_cli("human", "import", str(tmp_path / "nope.json"), str(tmp_path / "ann.csv"))
    assert bad.returncode == 2 and "key file not found" in bad.stderr and "Traceback" not in bad.stderr
