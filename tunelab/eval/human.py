"""Human evaluation: a blind A/B sheet out, judgments in, win rate, agreement and preference pairs.

``export_sheet`` writes a shuffled sheet (CSV or JSONL) in which each item shows one prompt and two
responses as ``response_1``/``response_2``: the item order and the side each model lands on are
random (seeded), and which model wrote which side lives only in the separate ``key.json``, so raters
judge blind. Raters fill ``judgment`` with 1, 2 or tie and their name in ``rater``.

``import_judgments`` reads one or more filled sheets against the key and reports
- the win rate of model B over model A with a percentile-bootstrap interval over items (each
  item's judgments averaged first, so several raters on one item are not counted as independent);
- Cohen's kappa (scikit-learn) for each pair of raters over the items both judged;
- the judgments as preference pairs (``prompt``/``chosen``/``rejected`` JSONL, the format the
  reward and DPO recipes read), one per item with a clear majority: the RLHF loop closes here.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.scoring.stats import bootstrap_ci, mean_statistic
from tunelab.workspace import read_jsonl, write_json

SHEET_FIELDS = ["item", "prompt", "response_1", "response_2", "judgment", "rater", "comment"]
_VERDICTS = {"1": "1", "2": "2", "tie": "tie", "=": "tie", "0": "tie"}


def load_outputs(path: Path) -> list[dict]:
    """Per-example outputs (``tunelab eval``/``compare`` JSONL): prompt + prediction (or output/response)."""
    p = Path(path)
    if not p.is_file():
        raise TunelabError(f"outputs file not found: {p}")
    rows = read_jsonl(p)
    out = []
    for i, r in enumerate(rows):
        text = next((r[k] for k in ("prediction", "output", "response", "completion") if k in r), None)
        if not isinstance(text, str) or "prompt" not in r:
            raise TunelabError(f"{p}:{i + 1}: need 'prompt' and 'prediction' (or output/response) fields")
        out.append({"id": r.get("index", i), "prompt": r["prompt"], "output": text})
    return out


def export_sheet(a: list[dict], b: list[dict], names: tuple[str, str], out_dir: Path, fmt: str = "csv",
                 seed: int = 0) -> dict:
    """Write ``sheet.<fmt>`` (blind, shuffled) and ``key.json`` for two models' outputs on the same prompts."""
    if fmt not in ("csv", "jsonl"):
        raise TunelabError(f"sheet format must be csv or jsonl, not '{fmt}'")
    if len(a) != len(b):
        raise TunelabError(f"the two output files differ in length ({len(a)} vs {len(b)}): they must cover the "
                           f"same prompts in the same order")
    if not a:
        raise TunelabError("no outputs to put on a sheet")
    if names[0] == names[1]:
        raise TunelabError("the two models need different names")
    for i, (x, y) in enumerate(zip(a, b)):
        if x["prompt"] != y["prompt"]:
            raise TunelabError(f"row {i + 1}: the two files have different prompts; they must pair up")
    rng = random.Random(seed)
    order = list(range(len(a)))
    rng.shuffle(order)
    rows, key = [], {}
    for k, i in enumerate(order):
        item = f"q{k + 1:04d}"
        a_first = rng.random() < 0.5
        r1, r2 = (a[i], b[i]) if a_first else (b[i], a[i])
        rows.append({"item": item, "prompt": a[i]["prompt"], "response_1": r1["output"], "response_2": r2["output"],
                     "judgment": "", "rater": "", "comment": ""})
        key[item] = {"source_index": a[i]["id"], "response_1": names[0] if a_first else names[1],
                     "response_2": names[1] if a_first else names[0]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet = out_dir / f"sheet.{fmt}"
    if fmt == "csv":
        with open(sheet, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SHEET_FIELDS)
            w.writeheader()
            w.writerows(rows)
    else:
        sheet.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    key_path = out_dir / "key.json"
    write_json(key_path, {"models": {"a": names[0], "b": names[1]}, "seed": seed, "items": key,
                          "note": "keep this file away from raters: it unblinds the sheet"})
    return {"sheet": str(sheet), "key": str(key_path), "items": len(rows)}


def _read_sheet(path: Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise TunelabError(f"sheet not found: {p}")
    if p.suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if p.suffix == ".jsonl":
        return read_jsonl(p)
    raise TunelabError(f"{p}: a sheet is .csv or .jsonl")


def read_judgments(key_path: Path, sheets: list[Path]) -> tuple[dict, list[dict]]:
    """The key and every filled judgment as ``{item, rater, winner}`` (winner: a model name or 'tie')."""
    kp = Path(key_path)
    if not kp.is_file():
        raise TunelabError(f"key file not found: {kp} (export_sheet writes it next to the sheet)")
    key = json.loads(kp.read_text(encoding="utf-8"))
    items = key["items"]
    out, seen = [], set()
    for sheet in sheets:
        for n, row in enumerate(_read_sheet(sheet), start=2):
            raw = str(row.get("judgment") or "").strip().lower()
            if not raw:
                continue  # not judged (yet)
            if raw not in _VERDICTS:
                raise TunelabError(f"{sheet}, row {n}: judgment '{raw}' is not 1, 2 or tie")
            item = str(row.get("item", ""))
            if item not in items:
                raise TunelabError(f"{sheet}, row {n}: item '{item}' is not in {kp}; was the sheet exported with "
                                   f"another key?")
            rater = str(row.get("rater") or "").strip() or Path(sheet).stem
            if (item, rater) in seen:
                raise TunelabError(f"{sheet}, row {n}: rater '{rater}' judged item {item} twice")
            seen.add((item, rater))
            v = _VERDICTS[raw]
            out.append({"item": item, "rater": rater, "winner": "tie" if v == "tie" else items[item][f"response_{v}"]})
    if not out:
        raise TunelabError("no judgments filled in: put 1, 2 or tie in the 'judgment' column")
    return key, out


def summarize(key: dict, judgments: list[dict], *, n_resamples: int = 1000, seed: int = 0,
              confidence: float = 0.95) -> dict:
    """Win rate of model B over A (ties count half) with an interval, and Cohen's kappa per rater pair."""
    a, b = key["models"]["a"], key["models"]["b"]
    value = {b: 1.0, "tie": 0.5, a: 0.0}
    by_item: dict[str, list[float]] = defaultdict(list)
    for j in judgments:
        by_item[j["item"]].append(value[j["winner"]])
    per_item = [sum(v) / len(v) for v in by_item.values()]
    lo, hi = bootstrap_ci(mean_statistic(per_item), n_resamples=n_resamples, confidence=confidence, seed=seed)
    counts = {name: sum(j["winner"] == name for j in judgments) for name in (b, a, "tie")}
    res = {"models": {"a": a, "b": b}, "items_judged": len(per_item), "items_on_sheet": len(key["items"]),
           "judgments": len(judgments), "raters": sorted({j["rater"] for j in judgments}), "counts": counts,
           "win_rate": {"of": b, "over": a, "value": sum(per_item) / len(per_item), "ci_low": lo, "ci_high": hi,
                        "confidence": confidence, "ties": "count half"},
           "agreement": _kappas(judgments)}
    return res


def _kappas(judgments: list[dict]) -> dict:
    """Cohen's kappa (scikit-learn) for each pair of raters with at least two items in common."""
    from sklearn.metrics import cohen_kappa_score

    by_rater: dict[str, dict[str, str]] = defaultdict(dict)
    for j in judgments:
        by_rater[j["rater"]][j["item"]] = j["winner"]
    pairs = []
    for r1, r2 in combinations(sorted(by_rater), 2):
        common = sorted(set(by_rater[r1]) & set(by_rater[r2]))
        if len(common) < 2:
            continue
        x = [by_rater[r1][i] for i in common]
        y = [by_rater[r2][i] for i in common]
        if len(set(x) | set(y)) < 2:
            k = 1.0  # both gave the same single verdict everywhere: perfect (kappa's formula is 0/0)
        else:
            k = float(cohen_kappa_score(x, y))
        pairs.append({"raters": [r1, r2], "items": len(common), "kappa": k,
                      "raw_agreement": sum(p == q for p, q in zip(x, y)) / len(common)})
    if not pairs:
        return {"pairs": [], "mean_kappa": None, "note": "no two raters judged the same items"}
    return {"pairs": pairs, "mean_kappa": sum(p["kappa"] for p in pairs) / len(pairs)}


def preference_pairs(key: dict, judgments: list[dict], sheets_rows: dict[str, dict]) -> list[dict]:
    """One ``{prompt, chosen, rejected}`` per item whose raters prefer one model by a majority (ties skip)."""
    a, b = key["models"]["a"], key["models"]["b"]
    votes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for j in judgments:
        votes[j["item"]][j["winner"]] += 1
    out = []
    for item, v in votes.items():
        na, nb = v.get(a, 0), v.get(b, 0)
        if na == nb:
            continue
        win = a if na > nb else b
        row, k = sheets_rows[item], key["items"][item]
        text = {k["response_1"]: row["response_1"], k["response_2"]: row["response_2"]}
        out.append({"prompt": row["prompt"], "chosen": text[win], "rejected": text[b if win == a else a],
                    "item": item, "votes": dict(v)})
    return out


def import_judgments(key_path: Path, sheets: list[Path], out_dir: Path | None = None, *, n_resamples: int = 1000,
                     seed: int = 0) -> dict:
    """Read filled sheets; write ``human.json`` and ``preferences.jsonl`` next to the key (or into ``out_dir``)."""
    if not sheets:
        raise TunelabError("give at least one filled sheet")
    key, judgments = read_judgments(key_path, sheets)
    res = summarize(key, judgments, n_resamples=n_resamples, seed=seed)
    rows: dict[str, dict] = {}
    for s in sheets:
        for r in _read_sheet(s):
            rows.setdefault(str(r.get("item")), r)
    pairs = preference_pairs(key, judgments, rows)
    out = Path(out_dir) if out_dir else Path(key_path).parent
    out.mkdir(parents=True, exist_ok=True)
    pref = out / "preferences.jsonl"
    pref.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    res["preference_pairs"] = {"path": str(pref), "pairs": len(pairs)}
    write_json(out / "human.json", res)
    res["summary_path"] = str(out / "human.json")
    return res


def print_summary(res: dict) -> None:
    from rich.console import Console

    w = res["win_rate"]
    c = Console()
    ci = f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}]" if w["ci_low"] is not None else "(one item: no interval)"
    c.print(f"win rate of {w['of']} over {w['over']}: {w['value']:.3f} {ci} ({res['items_judged']} items, "
            f"{res['judgments']} judgments, ties count half; counts {res['counts']})")
    ag = res["agreement"]
    if ag["pairs"]:
        for p in ag["pairs"]:
            c.print(f"Cohen's kappa {p['raters'][0]} vs {p['raters'][1]}: {p['kappa']:.3f} over {p['items']} items "
                    f"(raw agreement {p['raw_agreement']:.2f})")
    else:
        c.print(ag["note"])
    c.print(f"preference pairs: {res['preference_pairs']['pairs']} → {res['preference_pairs']['path']}")
    c.print(f"written: {res['summary_path']}")
