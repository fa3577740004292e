"""Record formats → chat messages; bad records give reasons, never crashes."""

from __future__ import annotations

import gzip
import json

import pytest

from tunelab.data.formats import BadRecord, to_messages
from tunelab.data.readers import read
from tunelab.data.split import content_fraction


def test_alpaca_prompt_completion_messages():
    a = to_messages({"instruction": "Sum", "input": "1 2", "output": "3", "id": 9})
    assert a == [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    pc = to_messages({"prompt": "Hi", "completion": "Hello"}, system_prompt="Be kind.")
    assert pc[0] == {"role": "system", "content": "Be kind."} and pc[-1]["content"] == "Hello"
    conv = to_messages({"prompt": [{"role": "user", "content": "Hi"}],
                        "completion": [{"role": "assistant", "content": "Yo"}]})
    assert [m["role"] for m in conv] == ["user", "assistant"]
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert to_messages({"messages": msgs}, system_prompt="ignored: has one") == msgs


@pytest.mark.parametrize("rec,reason", [
    ({"foo": 1}, "unknown format"),
    ({"instruction": "x", "output": ""}, "'output' is missing or empty"),
    ({"instruction": 3, "output": "y"}, "must be a string"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}]}, "end with an assistant"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "role"),
    ({"messages": "hello"}, "non-empty list"),
    ("just a string", "JSON object"),
])
def test_bad_records_have_reasons(rec, reason):
    with pytest.raises(BadRecord, match=reason):
        to_messages(rec)


def test_readers(tmp_path):
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "x.jsonl").write_text(json.dumps(recs[0]) + "\n\n{not json\n" + json.dumps(recs[1]) + "\n")
    got = [(line, r) for _, line, r in read(tmp_path / "x.jsonl")]
    assert got[0] == (1, recs[0]) and isinstance(got[1][1], BadRecord) and got[1][0] == 3 and got[2] == (4, recs[1])
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write(json.dumps(recs[0]) + "\n")
    assert [r for _, _, r in read(tmp_path / "x.jsonl.gz")] == [recs[0]]
    (tmp_path / "x.json").write_text(json.dumps(recs))
    assert [r for _, _, r in read(tmp_path / "x.json")] == recs
    (tmp_path / "x.csv").write_text("instruction,output\r\na,b\r\n")
    assert [r for _, _, r in read(tmp_path / "x.csv")] == [recs[0]]


def test_content_split_is_stable():
    assert content_fraction({"a": 1}) == content_fraction({"a": 1})
    assert content_fraction({"a": 1}) != content_fraction({"a": 2})
    assert 0 <= content_fraction([1, 2]) < 1
