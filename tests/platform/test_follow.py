"""Following a job: incremental reads of its metrics and log (``?offset=``), for a live page that should cost what
is new each second rather than the whole run. Without an offset the answers are what they always were."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest

pytest.importorskip("fastapi")


def _job(srv, jid="job-f", run="sft-f"):
    srv.store.add_job(id=jid, project="default", api="native", command="train", spec={}, recipe_yaml="recipe: sft\n",
                      run_id=run, created_by=None)
    srv.store.set_job(jid, status="running")
    d = srv.ws.runs_dir / run
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text("recipe: sft\n")  # a run folder the run lifecycle made
    return d / "metrics.jsonl"


def _rows(path, steps):
    with open(path, "a", encoding="utf-8") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 1.0 / s}) + "\n")


@pytest.mark.parametrize("route", ["/v1/tunelab/jobs/job-f/metrics", "/v1/tunelab/runs/sft-f/metrics"])
def test_metrics_from_an_offset(make_server, route):
    srv = make_server(worker=False)
    path = _job(srv)  # the job's run belongs to the project: both routes read its metrics.jsonl
    url = srv.url + route

    def get(**params):
        return httpx.get(url, params=params)

    # no file yet: nothing, from the start
    assert get().json() == {"object": "list", "data": [], "next_offset": 0}
    assert get(offset=0).json()["data"] == []
    _rows(path, range(1, 101))
    full = get().json()
    assert [r["step"] for r in full["data"]] == list(range(1, 101))  # no offset: every row, as before
    assert full["next_offset"] == path.stat().st_size
    at = full["next_offset"]
    assert get(offset=at).json() == {"object": "list", "data": [], "next_offset": at}  # nothing new yet
    _rows(path, [101, 102])
    new = get(offset=at).json()
    assert [r["step"] for r in new["data"]] == [101, 102] and new["next_offset"] == path.stat().st_size
    # a row still being written (no newline yet) waits for the next read; a read without offset shows it
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 103, "loss": 0.5}))
    part = get(offset=new["next_offset"]).json()
    assert part["data"] == [] and part["next_offset"] == new["next_offset"]
    assert get().json()["data"][-1]["step"] == 103 and get().json()["next_offset"] == new["next_offset"]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")
    assert [r["step"] for r in get(offset=new["next_offset"]).json()["data"]] == [103]
    # an offset inside a row, a negative one, or not a number: 400 with what to send instead
    r = get(offset=at + 3)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_offset"
    assert "not the start of a row" in r.json()["error"]["message"] and "next_offset" in r.json()["error"]["message"]
    for bad in (-1, "abc"):
        r = get(offset=bad)
        assert r.status_code == 400 and "offset" in r.json()["error"]["message"], r.text
    # past the end: no rows, and the cursor stays where it was
    end = path.stat().st_size
    assert get(offset=end + 500).json() == {"object": "list", "data": [], "next_offset": end + 500}


def test_log_from_an_offset(make_server):
    srv = make_server(worker=False)
    _job(srv)
    log = srv.ws.root / "platform" / "jobs" / "job-f" / "log.txt"
    url = srv.url + "/v1/tunelab/jobs/job-f/log"

    def get(**params):
        r = httpx.get(url, params=params)
        assert r.status_code == 200, r.text
        return r.text, int(r.headers["x-tunelab-offset"]), int(r.headers["x-tunelab-next-offset"])

    assert get() == ("", 0, 0)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"line one\nline two\n")
    assert get() == ("line one\nline two\n", 0, 18)  # no offset: the tail, as before
    assert get(tail=9) == ("line two\n", 9, 18)
    assert get(offset=18) == ("", 18, 18)
    with open(log, "ab") as f:
        f.write("d\u00e9j\u00e0 vu\n".encode())
    text, start, nxt = get(offset=18)
    assert text == "d\u00e9j\u00e0 vu\n" and start == 18 and nxt == log.stat().st_size
    # half of a two-byte character at the end waits for its second half
    with open(log, "ab") as f:
        f.write("\u00e9".encode()[:1])
    assert get(offset=nxt) == ("", nxt, nxt)
    with open(log, "ab") as f:
        f.write("\u00e9".encode()[1:] + b"!\n")
    assert get(offset=nxt) == ("\u00e9!\n", nxt, log.stat().st_size)
    # more than `tail` bytes since the offset: the last `tail` bytes, and the start says text was skipped
    end = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b"x" * 1000 + b"\n")
    text, start, nxt = get(offset=end, tail=100)
    assert len(text) == 100 and start == end + 901 and nxt == end + 1001
    # past the end: nothing
    assert get(offset=nxt + 50) == ("", nxt + 50, nxt + 50)
    r = httpx.get(url, params={"offset": -5})
    assert r.status_code == 400 and "offset" in r.json()["error"]["message"]
