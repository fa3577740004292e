"""datacard.md: what a dataset version is, where it came from and what was done to it."""

from __future__ import annotations

import json


def _table(rows: list[tuple], head: tuple) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_datacard(m: dict, profile: dict | None = None) -> str:
    c = m["counts"]
    parts = [
        f"# Dataset card: {m['name']}",
        f"`{m['dataset_id']}` — made {m['created_at']} by tunelab {m['tunelab_version']}. "
        f"The id is a hash of the input files' contents, the step settings, the split and the tunelab version: "
        f"the same inputs and recipe give the same id on any machine.",
        "## Intended use\n\n" + (m.get("intended_use") or "Not stated in the recipe (set `intended_use:`)."),
        "## License\n\n" + (m.get("license") or "Not stated in the recipe (set `license:` per input or overall)."),
        "## Sources\n\n" + _table([(s["path"], s["sha256"][:16] + "…", f"{s['bytes']:,}") for s in m["sources"]],
                                  ("file", "sha256", "bytes")),
        "## Lineage and steps\n\n"
        f"{c['read']:,} records read → {c['rejected']:,} rejected as unusable → "
        f"{c['dropped']:,} dropped by steps → **{c['kept']:,} kept**.\n\n"
        + _table([(i + 1, s["kind"], ", ".join(f"{k}={v}" for k, v in s["config"].items()) or "defaults",
                   ", ".join(f"{r}: {n:,}" for r, n in s["dropped"].items()) or "0")
                  for i, s in enumerate(m["steps"])], ("#", "step", "settings", "dropped")),
    ]
    if m.get("lineage"):  # upstream of the input files (e.g. a human-feedback campaign)
        parts.append("## Upstream lineage\n\n" + _table([(k, json.dumps(v, ensure_ascii=False, default=str)[:500]
                                                            .replace("|", "\\|"))
                                                           for k, v in m["lineage"].items()], ("field", "value")))
    sel = m.get("selection")
    if sel:
        lines = []
        if sel.get("dsir"):
            d = sel["dsir"]
            lines.append(f"DSIR importance resampling toward {d['target_records']:,} target examples kept "
                         f"{d['kept']:,} of {d['of']:,} records; KL(target‖data) over hashed n-grams went from "
                         f"{d['kl_target_raw']} to {d['kl_target_selected']} (lower is closer to the target).")
        if sel.get("capped_to") is not None:
            lines.append(f"Per-label cap {sel['config']['max_per_label']}: {sel['capped_to']:,} records kept.")
        parts.append("## Selection\n\n" + "\n\n".join(lines))
    if c["rejected_by_reason"]:
        parts.append("### Rejected records by reason\n\n" + _table(
            sorted(c["rejected_by_reason"].items(), key=lambda x: -x[1]), ("reason", "records")) +
            "\n\nEach reject is listed in `rejects.jsonl` with file, line and reason (no record text).")
    parts.append("## Splits\n\n" + _table([(s, f"{n:,}") for s, n in m["splits"].items()], ("split", "records")) +
                 "\n\nSplits are decided by a hash of each record's content (stable across runs and machines)"
                 + (", per label (stratified)." if m["labels"] else "."))
    if m["labels"]:
        labels = sorted({l for c in m["labels"].values() for l in c})
        rows = [(l, *(m["labels"].get(s, {}).get(l, 0) for s in ("train", "validation", "test"))) for l in labels]
        parts.append(f"## Labels ({len(labels)})\n\n" + _table(rows, ("label", "train", "validation", "test")))
    if m.get("pii"):
        p = m["pii"]
        parts.append("## PII\n\n" + f"Style: {p.get('style')}. Records with PII: {p.get('records_with_pii')}.\n\n"
                     + (_table(sorted(p["by_type"].items()), ("type", "found")) if p.get("by_type") else "None found."))
    if profile:
        parts.append(_profile_section(profile))
    parts.append("## Files\n\n" + ", ".join(f"`{f}`" for f in m["files"]))
    return "\n\n".join(parts) + "\n"


def _profile_section(p: dict) -> str:
    unit = p.get("unit", "tokens")
    rows = [(s, f"{v.get('records', 0):,}", f"{v.get('total', 0):,}", v.get("p50"), v.get("p95"), v.get("max"),
             f"{v.get('over_max_length_share', 0):.1%}") for s, v in (p.get("splits") or {}).items()]
    out = ["## Profile",
           f"Lengths in {unit}" + (f" ({p['tokenizer']})" if p.get("tokenizer") else " (no tokenizer given: "
                                   "set profile.tokenizer to count the target model's tokens)") + ".",
           _table(rows, ("split", "records", unit, "p50", "p95", "max", f"over {p.get('max_length')}"))]
    est = p.get("training_estimate") or {}
    if est:
        out.append(f"Estimated training {unit} for {p.get('epochs')} epoch(s): {int(est.get('total', 0)):,} "
                   f"({int(est.get('total_after_truncation', 0)):,} after truncation).")
    rep = p.get("representativeness") or {}
    clusters = rep.get("clusters") or {}
    if clusters.get("rows"):
        crow = [(r["cluster"], ", ".join(r.get("terms") or [])[:60], f"{r.get('train_share', 0):.1%}",
                 f"{r.get('test_share', 0):.1%}", "yes" if r.get("under_represented") else "")
                for r in clusters["rows"]]
        out.append("### Representativeness (MiniLM clusters of train; where test falls)\n\n"
                   + _table(crow, ("cluster", "top terms", "train", "test", "under-represented")))
    elif rep.get("clusters_note") or clusters.get("note"):
        out.append("Cluster coverage: " + str(rep.get("clusters_note") or clusters.get("note")))
    if p.get("warnings"):
        out.append("### Warnings\n\n" + "\n".join(f"- {w}" for w in p["warnings"]))
    if rep.get("note"):
        out.append(f"_{rep['note']}_")
    return "\n\n".join(out)
