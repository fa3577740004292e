"""Recall and precision of PII detection, by type, on the labelled set the project generates.

    .venv/bin/python bench/pii_recall.py [--n 1500] [--seed 0] [--no-ner] [--missed 5] [--rules-from DIR]

Builds ``tunelab.data.pii_eval.make_set(n, seed)``: short support tickets, CRM notes, chat
messages, forms and shipping notices from templates in five locales (US, UK, DE, FR, IN), with
gold spans for every PII value and unlabelled look-alikes (order and invoice numbers, dates,
prices, versions, times, postcodes, ISBNs). Runs ``tunelab.data.steps.pii.detect`` on each text
twice in the same run: the rules alone (the default step), then the rules plus the spaCy NER
backend of the ``pii`` extra (skipped with a note when it is not installed), and prints:

- per type: gold values, recall (a value counts as found only when findings of its type cover
  every letter and digit of it), findings, precision (a finding is correct when it overlaps a
  gold value of its type);
- structured recall and precision overall (every type but PERSON/LOCATION/ORG/ADDRESS) and per
  locale;
- NER recall for PERSON, LOCATION, ORG, and street addresses (ADDRESS, found by LOCATION findings);
- texts per second for each pass (one process).

``--rules-from DIR`` scores the ``tunelab/data/steps/pii.py`` of another source tree (an older
checkout) instead of this one, rules only: the before/after comparison. ``--missed K`` also
prints up to K missed values and false findings per type (synthetic values, for the
developer's eyes). Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunelab.data import pii_eval  # noqa: E402
from tunelab.data.steps import pii  # noqa: E402


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def _run(examples, detect, types):
    t = time.perf_counter()
    sc = pii_eval.score(examples, detect, types=types, keep_missed=ARGS.missed)
    return sc, len(examples) / (time.perf_counter() - t)


def _table(title: str, sc: pii_eval.Scores, types) -> list[str]:
    rows = [f"\n{title}", "", "| type | gold | recall | findings | precision |", "|---|---:|---:|---:|---:|"]
    for t in types:
        g = sc.gold.get(t, 0)
        if not g and not sc.predicted.get(t):
            continue
        p = sc.predicted.get(t, 0)
        prec = f"{sc.precision([t]):.3f}" if p else "–"
        rows.append(f"| {t} | {g} | {sc.recall([t]):.3f} | {p} | {prec} |")
    return rows


def _rules_from(root: str):
    import importlib.util

    path = Path(root) / "tunelab" / "data" / "steps" / "pii.py"
    spec = importlib.util.spec_from_file_location("tunelab.data.steps._pii_compared", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    global pii
    print(f"machine: {_machine()}")
    if ARGS.rules_from:
        pii = _rules_from(ARGS.rules_from)
        ARGS.no_ner = True
        print(f"rules from {ARGS.rules_from}")
    examples = pii_eval.make_set(ARGS.n, ARGS.seed)
    print(f"labelled set: {len(examples)} texts, seed {ARGS.seed}, locales {', '.join(pii_eval.LOCALES)}; "
          f"{sum(len(e.spans) for e in examples)} gold values")

    rules, rules_tps = _run(examples, pii.detect, pii_eval.STRUCTURED)
    out = _table("rules (the default pii step)", rules, pii_eval.STRUCTURED)
    s_rec, s_prec = rules.recall(pii_eval.STRUCTURED), rules.precision(pii_eval.STRUCTURED)
    out.append(f"| **structured, all types** | {sum(rules.gold.get(t, 0) for t in pii_eval.STRUCTURED)} | "
               f"**{s_rec:.3f}** | {sum(rules.predicted.get(t, 0) for t in pii_eval.STRUCTURED)} | **{s_prec:.3f}** |")
    out.append("\nstructured recall by locale: " + ", ".join(
        f"{loc} {f / g:.3f} ({f}/{g})" for loc, (f, g) in sorted(rules.by_locale.items())))
    out.append(f"rules: {rules_tps:,.0f} texts/s")
    summary = {"n": len(examples), "seed": ARGS.seed, "structured_recall": round(s_rec, 4),
               "structured_precision": round(s_prec, 4), "rules_texts_per_s": round(rules_tps),
               "by_type": {t: round(rules.recall([t]), 4) for t in pii_eval.STRUCTURED}}
    if ARGS.missed:
        out += [f"  missed {k}: {v}" for k, v in sorted(rules.missed.items())]

    have_ner = (not ARGS.no_ner and importlib.util.find_spec("spacy") is not None
                and importlib.util.find_spec(pii.NER_MODEL) is not None)
    if not have_ner:
        out.append("\nNER: skipped (" + ("--no-ner or --rules-from" if ARGS.no_ner else
                   f"not installed: pip install 'tunelab[pii]' brings spaCy and {pii.NER_MODEL}") + ")")
    else:
        backend = pii.SpacyBackend()
        ner, ner_tps = _run(examples, lambda t: pii.detect(t, backend=backend), pii_eval.STRUCTURED + pii_eval.NER)
        out += _table(f"rules + NER (spaCy {pii.NER_MODEL})", ner, pii_eval.NER)
        n_rec, n_prec = ner.recall(pii_eval.STRUCTURED), ner.precision(pii_eval.STRUCTURED)
        out.append(f"\nstructured with NER on: recall {n_rec:.3f}, precision {n_prec:.3f} (rules win where they match)")
        out.append(f"rules + NER: {ner_tps:,.0f} texts/s")
        summary.update({"ner_model": pii.NER_MODEL, "ner_texts_per_s": round(ner_tps),
                        "ner_recall": {t: round(ner.recall([t]), 4) for t in pii_eval.NER},
                        "ner_precision": {t: round(ner.precision([t]), 4) for t in ("PERSON", "LOCATION", "ORG")}})
        if ARGS.missed:
            out += [f"  missed {k}: {v}" for k, v in sorted(ner.missed.items()) if k.split(":")[-1] in pii_eval.NER]
    print("\n".join(out))
    print(json.dumps(summary))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ner", action="store_true", help="rules only")
    ap.add_argument("--missed", type=int, default=0, help="print up to K missed values and false findings per type")
    ap.add_argument("--rules-from", help="score the PII rules of another source tree (rules only)")
    ARGS = ap.parse_args()
    main()
