"""datacard.md: what a dataset version is, where it came from and what was done to it."""

from __future__ import annotations


def _table(rows: list[tuple], head: tuple) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_datacard(m: dict) -> str:
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
    parts.append("## Files\n\n" + ", ".join(f"`{f}`" for f in m["files"]))
    return "\n\n".join(parts) + "\n"
