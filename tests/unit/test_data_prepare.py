"""Readers, format mapping, exports and the prepare pipeline on small files made here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tunelab import config as cfglib
from tunelab.data.formats import BadRecord
from tunelab.data.prepare import PrepareConfig, run
from tunelab.data.readers import detect_encoding, read
from tunelab.data.records import FORMATS, export, to_canonical
from tunelab.errors import ConfigError, TunelabError
from tunelab.workspace import Workspace


def _write_broken_corpus(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    good = [{"instruction": f"Question {i} about order NW-{100000 + i}?", "output": f"Answer {i}."} for i in range(40)]
    lines = [json.dumps(r) for r in good]
    lines += ['{"instruction": "cut', json.dumps({"instruction": "no output"}), json.dumps({"instruction": "", "output": "x"}),
              json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), json.dumps([1, 2])]
    (d / "chat.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "bad \xff utf8", "output": "x"}\n')
    (d / "labels.csv").write_bytes("text,label\r\nCaf\xe9 ouvert,open\r\nferm\xe9,closed\r\n,closed\r\nextra,open,oops\r\n"
                                   .encode("latin-1"))
    return {"chat": d / "chat.jsonl", "csv": d / "labels.csv"}


def test_readers_never_crash_on_broken_files(tmp_path):
    files = _write_broken_corpus(tmp_path / "raw")
    items = list(read(files["chat"]))
    bad = [(line, r) for _, line, r in items if isinstance(r, BadRecord)]
    assert len(items) == 46 and [l for l, _ in bad] == [41, 46]
    assert "invalid JSON" in str(bad[0][1]) and "invalid UTF-8" in str(bad[1][1])
    assert detect_encoding(files["csv"]) in ("cp1252", "latin-1")
    rows = list(read(files["csv"]))
    assert rows[0][2] == {"text": "Café ouvert", "label": "open"}  # latin-1 decoded, CRLF handled
    assert isinstance(rows[-1][2], BadRecord) and "cells" in str(rows[-1][2])
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"text": "a"}\n')
    assert list(read(gz))[0][2] == {"text": "a"}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("para one\n\npara two\n")
    assert [r["text"] for _, _, r in read(tmp_path / "docs", "paragraph")] == ["para one", "para two"]


def test_formats_roundtrip_and_exports():
    chat = to_canonical({"instruction": "Hi", "input": "there", "output": "Hello"})
    assert to_canonical(export(chat, "bedrock_conversation")) == chat
    assert to_canonical(export(chat, "sharegpt")) == chat
    assert to_canonical(export(chat, "messages")) == chat
    assert export(chat, "prompt_completion") == {"prompt": "Hi\n\nthere", "completion": "Hello"}
    assert export({"text": "doc"}, "bedrock_cpt") == {"input": "doc"}
    assert to_canonical({"input": "doc"}) == {"text": "doc"}
    hh = to_canonical({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})
    assert hh == {"prompt": "Human: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}
    with pytest.raises(BadRecord, match="share the prompt"):
        to_canonical({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"})
    with pytest.raises(BadRecord, match="cannot be written"):
        export(hh, "bedrock_cpt")
    assert to_canonical({"q": "x", "cat": "y"}, "classification", {"text": "q", "label": "cat"}) == {"text": "x", "label": "y"}
    assert set(FORMATS) >= {"alpaca", "prompt_completion", "bedrock_cpt", "bedrock_conversation", "messages",
                            "sharegpt", "preference", "classification", "text"}


def _cfg(files, **over) -> PrepareConfig:
    raw = {"recipe": "data", "name": "t",
           "inputs": [{"path": str(files["chat"])}, {"path": str(files["csv"]), "format": "classification"}],
           "steps": [{"kind": "normalize"}, {"kind": "exact_dedup"}, {"kind": "pii", "style": "mask"}],
           "split": {"validation": 0.1, "test": 0.1}, "export": ["bedrock_conversation"]}
    raw.update(over)
    return cfglib.load(PrepareConfig, data=raw)


def test_prepare_counts_rejects_and_is_reproducible(tmp_path):
    files = _write_broken_corpus(tmp_path / "raw")
    ws = Workspace.resolve(tmp_path / "ws")
    m = run(_cfg(files), ws)
    d = Path(m["path"])
    rejects = [json.loads(l) for l in (d / "rejects.jsonl").read_text().splitlines()]
    assert m["counts"]["read"] == 46 + 4 and m["counts"]["rejected"] == len(rejects) == 8
    assert all({"file", "line", "reason"} <= set(r) for r in rejects)
    assert m["counts"]["kept"] == 42 and sum(m["splits"].values()) == 42
    assert m["pii"]["by_type"] == {} or "NW-" not in json.dumps(m["pii"])  # order numbers are not PII
    # content-addressed: same inputs and recipe → same id, reused; a changed step → a new id
    assert run(_cfg(files), ws)["reused"] is True
    m2 = run(_cfg(files, steps=[{"kind": "normalize"}]), ws)
    assert m2["dataset_id"] != m["dataset_id"]
    # exports and the datacard
    for s in ("train", "validation", "test"):
        for line in (d / f"{s}.bedrock_conversation.jsonl").read_text().splitlines():
            assert json.loads(line)["schemaVersion"] == "bedrock-conversation-2024"
    card = (d / "datacard.md").read_text()
    assert "rejected" in card and m["dataset_id"] in card and "## Splits" in card
    assert ws.catalog().get_run(m["dataset_id"])["kind"] == "dataset"
    # no partial folders left behind
    assert not [p for p in (ws.root / "datasets").iterdir() if p.name.startswith(".")]


def test_strict_fails_and_writes_nothing(tmp_path):
    files = _write_broken_corpus(tmp_path / "raw")
    ws = Workspace.resolve(tmp_path / "ws")
    with pytest.raises(TunelabError, match="strict"):
        run(_cfg(files), ws, strict=True)
    assert not any((ws.root / "datasets").iterdir())


def test_pii_is_redacted_and_never_in_rejects(tmp_path):
    p = tmp_path / "pii.jsonl"
    p.write_text(json.dumps({"instruction": "Email me at jane.doe@example.com or call +1 415 555 0132",
                             "output": "Sure, jane.doe@example.com noted."}) + "\n"
                 + json.dumps({"instruction": "card 4111 1111 1111 1111 please", "output": "ok"}) + "\n")
    ws = Workspace.resolve(tmp_path / "ws")
    m = run(cfglib.load(PrepareConfig, data={"recipe": "data", "name": "p", "inputs": [{"path": str(p)}],
                                             "steps": [{"kind": "pii"}], "split": {"validation": 0, "test": 0}}), ws)
    out = (Path(m["path"]) / "train.jsonl").read_text()
    assert "jane.doe@example.com" not in out and "[EMAIL]" in out and "4111" not in out
    assert m["pii"]["by_type"]["EMAIL"] == 2
    with open(p, "a") as f:
        f.write(json.dumps({"instruction": "Where is my parcel?", "output": "On its way."}) + "\n")
    m = run(cfglib.load(PrepareConfig, data={"recipe": "data", "name": "p2", "inputs": [{"path": str(p)}],
                                             "steps": [{"kind": "pii", "style": "drop"}],
                                             "split": {"validation": 0, "test": 0}}), ws)
    assert m["counts"]["kept"] == 1 and m["steps"][0]["dropped"] == {"pii": 2}
    # everything written about the dataset is free of the raw values
    for f in [f for f in Path(m["path"]).iterdir() if f.suffix != ".png"]:
        text = f.read_text()
        assert "jane.doe" not in text and "4111 1111" not in text and "555 0132" not in text


def test_stratified_split(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": f"example {i}", "label": "a" if i % 4 else "b"}) + "\n" for i in range(400)))
    ws = Workspace.resolve(tmp_path / "ws")
    m = run(cfglib.load(PrepareConfig, data={"recipe": "data", "name": "s", "inputs": [{"path": str(p)}],
                                             "split": {"validation": 0.1, "test": 0.2}}), ws)
    assert m["labels"]["test"] == {"a": 60, "b": 20} and m["labels"]["validation"] == {"a": 30, "b": 10}


def test_bad_step_config_is_reported(tmp_path):
    files = _write_broken_corpus(tmp_path / "raw")
    with pytest.raises(ConfigError) as e:
        run(_cfg(files, steps=[{"kind": "nope"}, {"kind": "pii", "style": "mask", "colour": 1}]),
            Workspace.resolve(tmp_path / "ws"))
    assert "steps.0.kind: unknown step 'nope'" in str(e.value) and "steps.1 (pii)" in str(e.value)


def test_training_run_records_the_prepared_dataset_id(tmp_path):
    from tunelab.sections import ChatDataSection
    from tunelab.data.lineage import file_lineage as dataset_lineage

    files = _write_broken_corpus(tmp_path / "raw")
    m = run(_cfg(files), Workspace.resolve(tmp_path / "ws"))
    lin = dataset_lineage(ChatDataSection(train=str(Path(m["path"]) / "train.jsonl")))
    assert lin["dataset_id"] == m["dataset_id"]
    assert {s["sha256"] for s in lin["dataset_sources"]} == {s["sha256"] for s in m["sources"]}


def test_worker_processes_give_the_same_version_as_one_process(tmp_path):
    """The parallel path (pure steps and precompute in workers, stateful steps replayed here in input
    order) must write byte-identical data files, rejects and counts to the one-process reference."""
    import random

    rng = random.Random(7)
    words = [f"w{i}" for i in range(300)]
    lines = []
    for i in range(1500):
        u = rng.random()
        if u < 0.05 and lines:
            lines.append(rng.choice(lines))  # exact duplicate
            continue
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
        if u < 0.15:
            text += f" mail me at user{i}@example.com"
        if 0.15 <= u < 0.2 and lines:  # near duplicate: one word changed
            src = json.loads(rng.choice(lines)).get("text", "a b c d e f g h i j k l")
            ws = src.split()
            ws[len(ws) // 2] = "changed"
            text = " ".join(ws)
        lines.append(json.dumps({"text": text, "label": rng.choice(["a", "b", "c"])}))
    lines.insert(10, '{"text": "broken')
    lines.insert(20, json.dumps({"label": "a"}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    steps = [{"kind": "normalize"}, {"kind": "control_chars"}, {"kind": "length", "min_words": 4},
             {"kind": "exact_dedup"}, {"kind": "near_dedup", "threshold": 0.8}, {"kind": "pii", "style": "mask"},
             {"kind": "quality", "min_words_to_check": 5, "min_stop_words": 0}]
    out = {}
    for workers in (0, 2):
        cfg = cfglib.load(PrepareConfig, data={"recipe": "data", "name": "par", "inputs": [{"path": str(tmp_path / "in.jsonl")}],
                                               "steps": steps, "workers": workers, "profile": None})
        m = run(cfg, Workspace.resolve(tmp_path / f"ws{workers}"))
        d = Path(m["path"])
        out[workers] = ({f: (d / f).read_bytes() for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "rejects.jsonl")},
                        m["counts"], [s["dropped"] for s in m["steps"]], m["pii"], m["splits"], m["labels"])
    assert out[0] == out[2]
    counts, dropped, pii = out[0][1], out[0][2], out[0][3]
    assert counts["rejected"] == 2 and dropped[3].get("duplicate", 0) > 20 and dropped[4].get("near_duplicate", 0) > 10
    assert pii["by_type"].get("EMAIL", 0) > 50
