"""Measured evidence for the rule-table advisor: ladder reports found in the workspace.

A measured ladder (``tunelab advise --measure task.yaml``) runs the cheap rungs (zero-shot, few-shot,
RAG, a LoRA pilot) on the user's own held-out data and writes a report. The advisor reads those
reports here and cites the rung that measures a rule next to that rule; a rule without a measurement
says it is a rule of thumb. The contract between the two is docs/advise.md ("Ladder reports"):

- where: ``<workspace>/runs/ladder-*/report.json``, and the ``dir`` of any catalog row of kind
  ``ladder`` (its ``report.json``);
- what: ``{"kind": "ladder", "task": {"name"} (or the name alone), "created_at", "target": {"metric", "op",
  "value"}, "rungs": [{"name", "kind"?, "rule"?, "metric", "value", "interval": [lo, hi], "meets_target"}],
  "verdict": {"rung", "meets_target", "shortfall"?}}``; fields beyond these are ignored.

Only :func:`read_ladder_reports` knows the file layout; a report that does not follow the contract
is skipped with its reason (a broken file never stops the advice).
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

# Rung kinds → the advisor rule each one measures, matched on the start of the rung's "kind" (else its
# "name"), lower-cased with runs of other characters as "_" ("Few-shot (k=3)" → "few_shot_k_3").
# A rung may name its rule itself ("rule": "fine_tuning"), which wins over this table.
RUNG_RULES = {
    "zero_shot": "prompt_engineering",
    "few_shot": "prompt_engineering",
    "rag": "rag",
    "lora": "fine_tuning",
    "fine_tuning": "fine_tuning",
}
# Recommendations the advisor derives from a rule, measured by that rule's rungs.
DERIVED = {"peft_lora": "fine_tuning"}


def task_name(d: dict) -> str:
    """The report's task name: ``task.name``, or ``task`` itself when it is a string."""
    t = d.get("task")
    name = t.get("name") if isinstance(t, dict) else t
    return name if isinstance(name, str) else ""


def from_ladder(d: object) -> object:
    """The measured ladder's own ``report.json`` (tunelab.advise.ladder: rows with ``label``, ``rung`` and
    ``scores[metric]``, a verdict with the chosen row's index) in the contract's shape; anything else as it is."""
    if not isinstance(d, dict) or not isinstance(d.get("rungs"), list) or not isinstance(d.get("verdict"), dict) \
            or "choice" not in d["verdict"] or not isinstance(d.get("target"), dict):
        return d
    metric, v = d["target"].get("metric"), d["verdict"]
    rungs, names = [], {}
    for i, r in enumerate(d["rungs"]):
        s = ((r.get("scores") or {}).get(metric) or {}) if isinstance(r, dict) else {}
        if not isinstance(s.get("value"), (int, float)):
            continue
        names[i] = str(r.get("label"))
        iv = [s["ci_low"], s["ci_high"]] if s.get("ci_low") is not None and s.get("ci_high") is not None else None
        rungs.append({"name": names[i], "kind": str(r.get("rung") or r.get("label")), "metric": metric,
                      "value": s["value"], "interval": iv, "meets_target": i in (v.get("meets") or [])})
    idx = v.get("choice") if v.get("met") else v.get("best")
    out = {**d, "rungs": rungs,
           "verdict": {"rung": names.get(idx, "none"), "meets_target": bool(v.get("met")),
                       "sentence": v.get("sentence")}}
    out.setdefault("kind", "ladder")
    return out


def _check(d: object) -> str | None:
    """Why ``d`` is not a ladder report of the contract, or None when it is."""
    if not isinstance(d, dict):
        return "not a JSON object"
    if d.get("kind") != "ladder":
        return "kind is not 'ladder'"
    if not task_name(d):
        return "task.name missing"
    if not isinstance(d.get("created_at"), str):
        return "created_at missing"
    rungs = d.get("rungs")
    if not isinstance(rungs, list) or not rungs:
        return "rungs missing or empty"
    for i, r in enumerate(rungs):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not isinstance(r.get("metric"), str):
            return f"rungs[{i}] lacks name or metric"
        if not isinstance(r.get("value"), (int, float)) or isinstance(r.get("value"), bool):
            return f"rungs[{i}].value is not a number"
        iv = r.get("interval")
        if iv is not None and not (isinstance(iv, list) and len(iv) == 2 and all(isinstance(x, (int, float)) for x in iv)):
            return f"rungs[{i}].interval is not [low, high]"
    v = d.get("verdict")
    if not isinstance(v, dict) or not isinstance(v.get("rung"), str) or not isinstance(v.get("meets_target"), bool):
        return "verdict.rung or verdict.meets_target missing"
    return None


def read_ladder_reports(root: Path) -> tuple[list[dict], list[dict]]:
    """Ladder reports under workspace ``root``, newest first, and the files skipped with their reason.

    Each report comes back as read, plus ``path``. Reading never writes: a workspace that does not exist
    simply has no reports.
    """
    root = Path(root)
    paths: set[Path] = set()
    runs = root / "runs"
    if runs.is_dir():
        paths.update(p.resolve() for p in runs.glob("ladder-*/report.json"))
    if (root / "tunelab.db").is_file():
        try:  # read-only: the advisor must not migrate or create a catalog
            con = sqlite3.connect(f"file:{root / 'tunelab.db'}?mode=ro", uri=True)
            with con:
                rows = con.execute("SELECT dir FROM runs WHERE kind = 'ladder'").fetchall()
            con.close()
            paths.update((Path(r[0]) / "report.json").resolve() for r in rows if r[0])
        except sqlite3.Error:
            pass
    reports, skipped = [], []
    for p in sorted(paths):
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skipped.append({"path": str(p), "reason": f"unreadable: {type(e).__name__}"})
            continue
        d = from_ladder(d)
        why = _check(d)
        if why:
            skipped.append({"path": str(p), "reason": why})
            continue
        reports.append({**d, "path": str(p)})
    reports.sort(key=lambda d: d["created_at"], reverse=True)
    return reports, skipped


def rule_of(rung: dict) -> str | None:
    """The advisor rule a rung measures (None: no rule, e.g. an existing endpoint as a rung)."""
    if isinstance(rung.get("rule"), str):
        return rung["rule"]
    key = re.sub(r"[^a-z0-9]+", "_", str(rung.get("kind") or rung["name"]).lower()).strip("_")
    return next((rule for prefix, rule in RUNG_RULES.items() if key == prefix or key.startswith(prefix + "_")), None)


def _num(x: float) -> str:
    return f"{x:.3g}"


def _target_text(target: object) -> str:
    if isinstance(target, dict) and isinstance(target.get("value"), (int, float)):
        return f"{target.get('metric', '')} {target.get('op', '>=')} {_num(target['value'])}".strip()
    return ""


def _rung_text(r: dict, target_metric: str | None) -> str:
    iv = r.get("interval")
    metric = "" if r["metric"] == target_metric else f" {r['metric']}"
    s = f"{r['name']}{metric} {_num(r['value'])}" + (f" [{_num(iv[0])}, {_num(iv[1])}]" if iv else "")
    met = r.get("meets_target")
    if isinstance(met, bool):
        s += " met the target" if met else " missed it"
    return s


def cite(recommendation: str, task: str, reports: list[dict]) -> dict:
    """The evidence line for one recommendation: the measured rungs of the newest report of ``task``, or why the
    recommendation stands on a rule of thumb."""
    rule = DERIVED.get(recommendation, recommendation)
    mine = [d for d in reports if task_name(d) == task] if task else []
    if not mine:
        if task:
            others = sorted({task_name(d) for d in reports})
            where = f" (measured tasks here: {', '.join(others)})" if others else ""
            why = f"no measured ladder for task '{task}' in this workspace{where}"
        elif reports:
            names = ", ".join(sorted({task_name(d) for d in reports}))
            why = f"no task named; to cite a measured ladder add --set task=NAME ({names})"
        else:
            why = "no measured ladder; measure it on your data with tunelab advise --measure TASK.yaml"
        return {"kind": "rule_of_thumb", "text": f"rule of thumb ({why})"}
    d = mine[0]
    date = d["created_at"][:10]
    rungs = [r for r in d["rungs"] if rule_of(r) == rule]
    verdict = d["verdict"]
    vtext = f"verdict: {verdict['rung']}" + ("" if verdict["meets_target"] else " (best, short of the target)")
    if not rungs:
        return {"kind": "rule_of_thumb", "report": d["path"],
                "text": f"rule of thumb (the ladder measured on {task} {date} has no rung for this; {vtext})"}
    target = _target_text(d.get("target"))
    metric = d["target"].get("metric") if target else None
    return {"kind": "measured", "report": d["path"],
            "text": f"measured on {task} {date}" + (f", target {target}" if target else "") + ": "
                    + "; ".join(_rung_text(r, metric) for r in rungs) + f"; {vtext}"}
