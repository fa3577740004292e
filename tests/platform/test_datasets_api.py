"""A project's datasets over the API: registered when a data job succeeds; detail, rejects, records; roles."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_color_data
from tests.platform.test_feedback import _call, _keys

D = "/v1/tunelab/datasets"


@pytest.fixture
def raw_with_rejects(tmp_path):
    raw = write_color_data(tmp_path / "colors.jsonl", 40, seed=3)
    lines = raw.read_text().splitlines()
    lines.insert(5, "{not json")  # line 6: unreadable
    lines.insert(9, json.dumps({"instruction": "", "input": "", "output": ""}))  # line 10: empty
    lines.insert(14, json.dumps({"instruction": "What color is it?", "input": "", "output": "x" * 2}))  # line 15
    raw.write_text("\n".join(lines) + "\n")
    return raw


def test_a_data_jobs_dataset_over_the_api(make_server, raw_with_rejects):
    srv = make_server()
    k = _keys(srv)
    # a raw file on the server, broken lines and all (uploads refuse broken records; a data job rejects them)
    jsonl = str(raw_with_rejects)
    recipe = {"recipe": "data", "name": "colors", "inputs": [{"path": jsonl}], "workers": 0,
              "steps": [{"kind": "length", "min_chars": 20}], "split": {"validation": 0.1, "test": 0.1}}
    assert _call(srv, k["trainer"], "GET", D).json()["data"] == []
    job = _call(srv, k["trainer"], "POST", "/v1/tunelab/jobs", json={"recipe": recipe})
    assert job.status_code == 200, job.text
    done = srv.wait(job.json()["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    ds_id = done["result"]["dataset_id"]

    listing = _call(srv, k["viewer"], "GET", D).json()["data"]
    assert [d["id"] for d in listing] == [ds_id]
    d = listing[0]
    assert d["source"] == {"kind": "job", "id": job.json()["id"]}
    assert d["counts"]["read"] == 43 and d["counts"]["rejected"] == 2 and d["counts"]["dropped"] == 1
    assert sum(d["splits"].values()) == 40 and set(d["files"]) == {"train", "validation", "test"}

    full = _call(srv, k["viewer"], "GET", f"{D}/{ds_id}").json()
    assert full["datacard"].startswith("# Dataset card: colors")
    assert full["profile"] is not None and "path" not in full["manifest"]

    rej = _call(srv, k["viewer"], "GET", f"{D}/{ds_id}/rejects").json()
    assert rej["total"] == 3 and [r["line"] for r in rej["data"]] == [6, 10, 15]
    assert all(r["file"].endswith(".jsonl") and r["reason"] for r in rej["data"])
    assert sum(x["count"] for x in rej["by_kind"]) == 3 and len(rej["by_kind"]) >= 2
    short = _call(srv, k["viewer"], "GET", f"{D}/{ds_id}/rejects", params={"reason": "SHORT"}).json()
    assert [r["line"] for r in short["data"]] == [15] and short["matched"] == 1 and short["total"] == 3
    page2 = _call(srv, k["viewer"], "GET", f"{D}/{ds_id}/rejects", params={"offset": 1, "limit": 1}).json()
    assert [r["line"] for r in page2["data"]] == [10] and page2["has_more"] is True

    recs = _call(srv, k["viewer"], "GET", f"{D}/{ds_id}/records", params={"split": "train", "limit": 5}).json()
    assert len(recs["data"]) == 5 and recs["total"] == d["splits"]["train"] and recs["has_more"] is True
    assert all("messages" in r or "instruction" in r or "prompt" in r for r in recs["data"])
    rest = _call(srv, k["viewer"], "GET", f"{D}/{ds_id}/records",
                 params={"split": "train", "offset": 5, "limit": 200}).json()
    assert len(rest["data"]) == d["splits"]["train"] - 5 and rest["has_more"] is False
    assert _call(srv, k["viewer"], "GET", f"{D}/{ds_id}/records", params={"split": "dev"}).status_code == 400

    # roles and projects: a labeler cannot read datasets; another project gets 404 for every route
    for path in ("", "/rejects", "/records"):
        assert _call(srv, k["l1"], "GET", f"{D}/{ds_id}{path}").status_code == 403
        r = _call(srv, k["other"], "GET", f"{D}/{ds_id}{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "dataset_not_found"
    assert _call(srv, k["other"], "GET", D).json()["data"] == []

    # the split's file id names the version in a recipe; deleting the id leaves the version's file in place
    train_id = d["files"]["train"]
    assert _call(srv, k["trainer"], "GET", f"/v1/files/{train_id}").json()["purpose"] == "tunelab-dataset"
    assert _call(srv, k["trainer"], "DELETE", f"/v1/files/{train_id}").status_code == 200
    assert (srv.ws.root / "datasets" / ds_id / "train.jsonl").is_file()


def test_fuzzed_feedback_and_dataset_requests_never_get_a_server_error(make_server):
    """The new routes' request bodies and parameters fuzzed from the OpenAPI schema: no 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    srv = make_server(worker=False)
    import httpx2 as httpx

    cid = httpx.post(srv.url + "/v1/tunelab/feedback/campaigns", json={
        "kind": "ab", "items": [{"prompt": "p", "a": "x", "b": "y"}]}).json()["id"]
    schema = schemathesis.openapi.from_dict(srv.app.app.openapi())
    failures, calls = [], [0]
    for result in schema.get_all_operations():
        op = result.ok()
        if not op.path.startswith(("/v1/tunelab/feedback", "/v1/tunelab/datasets")):
            continue

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            if case.path_parameters and "campaign_id" in case.path_parameters and calls[0] % 2:
                case.path_parameters["campaign_id"] = cid  # half the calls reach a real campaign
            resp = case.call(base_url=srv.url, timeout=60)
            calls[0] += 1
            if resp.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200}: {resp.status_code} "
                                f"{resp.text[:300]}")

        fuzz()
    assert calls[0] > 200
    assert not failures, "\n".join(failures[:10])
