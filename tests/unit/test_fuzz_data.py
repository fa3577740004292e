"""Property-based fuzzing of the data pipeline (hypothesis): readers, record mapping, steps and the
whole `data prepare` on generated JSONL / CSV / JSON files with random bytes, truncation, deep
nesting, NUL, lone surrogates, huge fields and wrong types.

The properties: nothing raises but a user-facing TunelabError, and every record read is accounted
for: kept + rejected + dropped == read (and read == what the readers yield).

Bounded: derandomized (the same examples on every run, so the suite is stable) and a fixed number
of examples; the file runs in seconds. To explore further, set TUNELAB_FUZZ_EXAMPLES=2000: more
examples, a fresh random seed each run.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tunelab import config as cfglib  # noqa: E402
from tunelab.data.prepare import PrepareConfig, build_steps, run  # noqa: E402
from tunelab.data.readers import read  # noqa: E402
from tunelab.data.records import FORMATS, BadRecord, export, kind, to_canonical  # noqa: E402
from tunelab.data.steps.base import Drop  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.workspace import Workspace  # noqa: E402

_EXPLORE = int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "0"))


def _fuzz(n: int):
    return settings(max_examples=_EXPLORE or n, derandomize=not _EXPLORE, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- strategies

# every character, lone surrogates (category Cs) and NUL included
CHARS = st.characters(exclude_categories=())
TEXT = st.one_of(st.text(CHARS, max_size=30), st.sampled_from(["", " ", "\x00", "\ud800", "NaN", "nan", "\ufeff",
                                                               "\n\nHuman: hi\n\nAssistant: yo", "<b>x</b>",
                                                               "a@b.co 4111 1111 1111 1111"]))
HUGE = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "word ", "\ud800"]), st.integers(10_000, 100_000))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)
KEYS = st.sampled_from(["text", "label", "instruction", "input", "output", "prompt", "completion", "chosen",
                        "rejected", "messages", "conversations", "system", "schemaVersion", "id", "meta"])
ROLE = st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "", None, 3, ["user"]])
TURN = st.one_of(st.fixed_dictionaries({"role": ROLE, "content": st.one_of(TEXT, JSON)}),
                 st.fixed_dictionaries({"from": ROLE, "value": st.one_of(TEXT, JSON)}),
                 st.fixed_dictionaries({"role": ROLE, "content": st.lists(st.fixed_dictionaries({"text": TEXT}),
                                                                          max_size=2)}),
                 JSON)
VALUE = st.one_of(TEXT, JSON, st.lists(TURN, max_size=4), HUGE)
# words with hostile characters mixed in: what mostly valid records carry
WORDS = st.lists(st.one_of(st.sampled_from(["the", "order", "and", "of", "to", "card", "refund", "with", "have"]),
                           TEXT, HUGE.map(lambda s: s[:20_000])), min_size=1, max_size=12).map(" ".join)
PLAUSIBLE = st.one_of(
    st.fixed_dictionaries({"text": WORDS, "label": st.one_of(st.sampled_from(["a", "b", "NaN"]), SCALAR)}),
    st.fixed_dictionaries({"text": WORDS}),
    st.fixed_dictionaries({"instruction": WORDS, "output": WORDS}, optional={"input": WORDS}),
    st.fixed_dictionaries({"prompt": WORDS, "completion": WORDS}),
    st.fixed_dictionaries({"prompt": WORDS, "chosen": WORDS, "rejected": st.one_of(WORDS, st.just("same"))}),
    st.builds(lambda u, a, sys_: {"messages": ([{"role": "system", "content": sys_}] if sys_ else [])
                                  + [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
              WORDS, WORDS, st.one_of(st.none(), WORDS)),
    st.builds(lambda u, a: {"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]}, WORDS, WORDS),
)
RECORD = st.one_of(PLAUSIBLE, PLAUSIBLE, st.dictionaries(KEYS, VALUE, max_size=5),
                   st.fixed_dictionaries({"schemaVersion": st.just("bedrock-conversation-2024"),
                                          "messages": st.one_of(st.lists(TURN, max_size=4), JSON),
                                          "system": st.one_of(JSON, st.lists(st.fixed_dictionaries({"text": TEXT})))}),
                   JSON)


def _deep(n: int) -> str:
    return '{"text": "deep", "x": ' + "[" * n + "]" * n + "}"


def _jsonl_line(rec, ascii_: bool) -> bytes:
    return json.dumps(rec, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")


LINE = st.one_of(
    st.builds(_jsonl_line, PLAUSIBLE, st.booleans()),
    st.builds(_jsonl_line, RECORD, st.booleans()),
    st.binary(max_size=40),  # random bytes: invalid UTF-8, stray NULs, half a JSON value
    st.builds(_deep, st.sampled_from([50, 101, 990, 3000])).map(str.encode),
    st.just(b'{"text": "bom"}').map(lambda b: b"\xef\xbb\xbf" + b),
    st.just(b'{"text": "n\\u0000ul", "label": NaN}'),
    st.just(b'{"big": ' + b"9" * 5000 + b"}"),
)


@st.composite
def jsonl_file(draw) -> bytes:
    body = b"\n".join(draw(st.lists(LINE, min_size=1, max_size=15)))
    return body + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


CELL = st.one_of(TEXT.map(lambda s: s.replace("\ud800", "")), st.sampled_from(['"', '"open', 'a"b', '""', "x\ny", "NaN",
                                                                                ",", "\x00", "\r"]))


@st.composite
def csv_file(draw) -> bytes:
    header = draw(st.sampled_from(["text,label", "text,label,extra", "prompt,completion", "label", ""]))
    rows = draw(st.lists(st.lists(CELL, max_size=4).map(lambda cs: ",".join(cs)), max_size=10))
    text = "\n".join([header, *rows]) + "\n"
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "cp1252"]))
    return text.encode(encoding, "replace")


@st.composite
def input_files(draw) -> list[tuple[str, bytes]]:
    """One to three input files of mixed types; any of them may be cut short."""
    files = []
    for i in range(draw(st.integers(1, 3))):
        kind_ = draw(st.sampled_from(["jsonl", "jsonl.gz", "csv", "json"]))
        if kind_.startswith("jsonl"):
            data = draw(jsonl_file())
        elif kind_ == "csv":
            data = draw(csv_file())
        else:
            data = _jsonl_line(draw(st.lists(RECORD, max_size=6)), True) if draw(st.booleans()) else \
                draw(st.binary(max_size=60))
        if kind_.endswith(".gz"):
            data = gzip.compress(data)
        if data and draw(st.integers(0, 2)) == 0:  # truncation anywhere, gzip trailer included
            data = data[: draw(st.integers(0, len(data) - 1))]
        files.append((f"in{i}.{kind_}", data))
    return files


# ----------------------------------------------------------------------------- readers and records

@_fuzz(100)
@given(files=input_files())
def test_readers_never_raise(files, tmp_path_factory):
    d = tmp_path_factory.mktemp("r")
    for name, data in files:
        (d / name).write_bytes(data)
        prev = 0
        for source, line, item in read(d / name):
            assert source == str(d / name) and isinstance(line, int) and line >= 0
            if name.endswith("csv"):
                assert line >= prev  # rows in file order
                prev = line
            assert isinstance(item, BadRecord) or not isinstance(item, Exception)


@_fuzz(300)
@given(rec=RECORD, fmt=st.sampled_from(["auto", *FORMATS]),
       mapping=st.sampled_from([None, {}, {"label": "id"}, {"text": "messages"}, {"prompt": "text"}]))
def test_record_mapping_raises_only_bad_record(rec, fmt, mapping):
    try:
        canon = to_canonical(rec, fmt, mapping)
    except BadRecord as e:
        assert str(e) and e.kind
        return
    # a canonical record has a known shape, and exports either work or say why
    k = kind(canon)
    assert k in ("chat", "preference", "classification", "text")
    if "label" in canon:
        assert isinstance(canon["label"], str) and canon["label"].strip().lower() != "nan"
    for f in FORMATS:
        try:
            assert isinstance(export(canon, f), dict)
        except BadRecord:
            pass


STEP_SPECS = [{"kind": "normalize"}, {"kind": "control_chars"}, {"kind": "strip_html"},
              {"kind": "length", "min_words": 2, "max_chars": 50_000}, {"kind": "quality", "min_words_to_check": 3},
              {"kind": "exact_dedup"}, {"kind": "near_dedup", "threshold": 0.7}, {"kind": "pii", "style": "mask"},
              {"kind": "pii", "style": "hash"}, {"kind": "pii", "style": "drop"}]


@pytest.fixture(scope="module")
def all_steps():
    from tunelab.data.prepare import StepSpec

    return build_steps([StepSpec(**s) for s in STEP_SPECS])


@_fuzz(100)
@given(recs=st.lists(RECORD, max_size=6))
def test_steps_return_a_record_or_a_drop(recs, all_steps):
    steps = all_steps  # built once: the dedup steps' state grows across examples, as over a real file
    for raw in recs:
        try:
            rec = to_canonical(raw)
        except BadRecord:
            continue
        rec["meta"] = {"source": "f", "line": 1}
        for step in steps:
            out = step(rec)
            assert isinstance(out, (dict, Drop)), type(step).__name__
            if isinstance(out, Drop):
                assert isinstance(out.reason, str) and out.reason
                break
            assert out["meta"] == rec["meta"]
            rec = out


# ----------------------------------------------------------------------------- the whole pipeline

@_fuzz(25)
@given(files=input_files(), steps=st.lists(st.sampled_from(STEP_SPECS[:8]), max_size=3),
       fmt=st.sampled_from(["auto"] * 5 + ["classification", "preference", "messages"]),
       workers=st.sampled_from([0, 0, 0, 0, 2]), export_=st.sampled_from([[], ["text"], ["bedrock_conversation"]]))
def test_prepare_accounts_for_every_record(files, steps, fmt, workers, export_, tmp_path_factory):
    d = tmp_path_factory.mktemp("p")
    for name, data in files:
        (d / name).write_bytes(data)
    expected_read = sum(1 for name, _ in files for _ in read(d / name))
    cfg = cfglib.load(PrepareConfig, data={"recipe": "data", "name": "fuzz", "profile": None, "workers": workers,
                                           "inputs": [{"path": str(d / n), "format": fmt} for n, _ in files],
                                           "steps": steps, "export": export_, "split": {"validation": 0.2, "test": 0.2}})
    ws = Workspace.resolve(d / "ws")
    try:
        m = run(cfg, ws)
    except TunelabError as e:  # nothing survived, or an export none of the records fits: said, never a crash
        msg = str(e)
        hypothesis.event("prepare: " + msg.split(" from ")[0].split(":")[0][:30])
        assert "no record survived" in msg or msg.startswith("export:"), msg
        if "no record survived" in msg:
            kept = Path(msg.rsplit(" are in ", 1)[1])
            assert len(kept.read_text(encoding="utf-8").splitlines()) == expected_read
        return
    c = m["counts"]
    hypothesis.event(f"prepare: kept {'some' if c['kept'] else 'none'}, rejected {'some' if c['rejected'] else 'none'}")
    assert c["read"] == expected_read
    assert c["kept"] + c["rejected"] + c["dropped"] == c["read"]
    assert sum(c["rejected_by_reason"].values()) == c["rejected"]
    assert sum(sum(s["dropped"].values()) for s in m["steps"]) == c["dropped"]
    version = Path(m["path"])
    n = 0
    for split in ("train", "validation", "test"):
        for line in (version / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            assert all(not isinstance(v, float) or math.isfinite(v) for v in rec.values())
            n += 1
    assert n == c["kept"] == sum(m["splits"].values())
    assert len((version / "rejects.jsonl").read_text(encoding="utf-8").splitlines()) == c["rejected"] + c["dropped"]
