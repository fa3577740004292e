"""Raw PII never reaches a file tunelab writes, nor its output: `tunelab data prepare` with a PII step
on records carrying known values, then every byte in the workspace (data files, rejects, manifest,
data card, profile, the SQLite catalog) and stdout/stderr is searched for each value."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tunelab.data.steps import pii

# One of each type the rules find, written the ways people write them.
VALUES = {
    "EMAIL": "harriet.vance@quillmail.com",
    "PHONE": "(0113) 496 7723",
    "PHONE_US": "312.847.2290",
    "PHONE_IN": "98452 17730",
    "CREDIT_CARD": "2131 0000 0000 001",
    "IBAN": "de89 3704 0044 0532 0130 00",
    "SSN": "219-09-9999",
    "IP_ADDRESS": "81.169.145.92",
    "URL": "https://harriet-vance-portfolio.com/cv",
    "DRIVER_LICENSE": "D4827719",
    "PASSPORT": "533380006",
    "URL_CREDENTIALS": "svc_backup:Wq7!pZ2x@db.quillmail.com",
    "API_KEY": "AKIAZ7Q3XKDF2M4PLW9B",
}
NAMES = {"PERSON": "Harriet Vance", "ORG": "Siemens", "LOCATION": "Leeds"}


def _records(values: dict[str, str], names: bool) -> list[str]:
    v = values
    who = f"{NAMES['PERSON']} of {NAMES['ORG']} in {NAMES['LOCATION']}" if names else "The customer"
    good = [
        {"prompt": f"{who} wrote from {v['EMAIL']} and asked us to call {v['PHONE']} or {v['PHONE_US']}.",
         "completion": f"Noted. We will also try {v['PHONE_IN']} and reply to {v['EMAIL']}."},
        {"prompt": f"Refund to IBAN {v['IBAN']}; card on file {v['CREDIT_CARD']}.", "completion": "Refund issued."},
        {"prompt": f"Verify SSN {v['SSN']}, driver's license number {v['DRIVER_LICENSE']} and passport number "
                   f"{v['PASSPORT']}.", "completion": f"Verified for login from {v['IP_ADDRESS']}."},
        {"prompt": f"Portfolio at {v['URL']}, backups at postgres://{v['URL_CREDENTIALS']}/prod",
         "completion": f"Rotate key {v['API_KEY']} today."},
    ]
    good += [{"prompt": f"Plain question number {i} about order 2021-{690290 + i}?", "completion": f"Answer {i}."}
             for i in range(8)]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    # rejects that carry PII: broken JSON, a missing field, a wrong type
    lines += ['{"prompt": "my card ' + v["CREDIT_CARD"] + ' and mail ' + v["EMAIL"] + '", "completion": ',
              json.dumps({"prompt": f"call me on {v['PHONE']} ({v['SSN']})"}),
              json.dumps({"prompt": f"{v['IBAN']}", "completion": 12345})]
    return lines


def _scan(ws: Path, out: str, needles: list[str]) -> list[tuple[str, str]]:
    leaks = []
    blobs = [("stdout/stderr", out.encode())] + [(str(p.relative_to(ws)), p.read_bytes())
                                                  for p in ws.rglob("*") if p.is_file()]
    for where, blob in blobs:
        for needle in needles:
            for form in {needle, needle.upper(), needle.replace(" ", "")}:
                if form.encode() in blob or json.dumps(form)[1:-1].encode() in blob:
                    leaks.append((where, needle))
    return leaks


@pytest.mark.parametrize("style,ner", [
    ("mask", False), ("hash", False), ("drop", False),
    pytest.param("mask", True, marks=pytest.mark.skipif(
        importlib.util.find_spec("spacy") is None or importlib.util.find_spec(pii.NER_MODEL) is None,
        reason=f"the NER extra is not installed (pip install 'tunelab[pii]' brings {pii.NER_MODEL})")),
])
def test_prepare_never_writes_raw_pii(tmp_path, style, ner):
    raw = tmp_path / "in" / "support.jsonl"
    raw.parent.mkdir()
    raw.write_text("\n".join(_records(VALUES, names=ner)) + "\n", encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": "data", "name": "support", "workers": 0,
        "inputs": [{"path": str(raw), "format": "prompt_completion"}],
        "steps": [{"kind": "normalize"}, {"kind": "pii", "style": style, "salt": "pepper-3141", "ner": ner}],
        "split": {"validation": 0.25, "test": 0}, "export": ["messages"]}))
    ws = tmp_path / "ws"
    r = run_cli("data", "prepare", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    version = next((ws / "datasets").iterdir())
    written = {p.name for p in version.iterdir()}
    assert {"train.jsonl", "rejects.jsonl", "manifest.json"} <= written and any(ws.glob("*.db")), written
    m = json.loads((version / "manifest.json").read_text())
    assert m["counts"]["rejected"] == 3
    if style == "drop":
        assert m["counts"]["kept"] == 8
    else:
        kept = (version / "train.jsonl").read_text() + (version / "validation.jsonl").read_text()
        assert "[EMAIL" in kept and "[PASSPORT" in kept and "[DRIVER_LICENSE" in kept
    needles = list(VALUES.values()) + ["pepper-3141", "Wq7!pZ2x"] + (list(NAMES.values()) if ner else [])
    assert _scan(ws, out, needles) == []


def test_the_scan_finds_what_is_there(tmp_path):
    """The search above would see a leak: run without the PII step and every value is found."""
    raw = tmp_path / "in" / "support.jsonl"
    raw.parent.mkdir()
    raw.write_text("\n".join(_records(VALUES, names=False)) + "\n", encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"recipe": "data", "name": "support", "workers": 0,
                                      "inputs": [{"path": str(raw), "format": "prompt_completion"}],
                                      "steps": [{"kind": "normalize"}], "split": {"validation": 0, "test": 0}}))
    ws = tmp_path / "ws"
    r = run_cli("data", "prepare", str(recipe), "-w", str(ws))
    assert r.returncode == 0, r.stdout + r.stderr
    leaked = {needle for _, needle in _scan(ws, r.stdout + r.stderr, list(VALUES.values()))}
    assert leaked == set(VALUES.values())
