"""Robustness: the OpenAPI schema fuzzed (no 5xx), and a bounded loopback load test (8 clients)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.platform.conftest import write_chat_data


def test_fuzzed_requests_never_get_a_server_error(make_server, tiny_model, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    srv = make_server(worker=False)
    import httpx2 as httpx

    httpx.post(srv.url + "/v1/files", files={"file": ("t.jsonl", write_chat_data(tmp_path / "t.jsonl", 4).read_bytes())},
               data={"purpose": "fine-tune"})
    schema = schemathesis.openapi.from_dict(srv.app.app.openapi())
    failures, calls = [], [0]
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=12, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            resp = case.call(base_url=srv.url, timeout=60)
            calls[0] += 1
            if resp.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {resp.status_code} {resp.text[:300]}")

        fuzz()
    assert calls[0] > 200
    assert not failures, "\n".join(failures[:10])


def test_eight_clients_polling_and_creating_jobs(make_server, tiny_model, tmp_path):
    """8 threads for 6 s: each uploads, creates jobs and polls lists and jobs. No error; every job is there."""
    import httpx2 as httpx

    srv = make_server(worker=False)
    data = write_chat_data(tmp_path / "t.jsonl", 8).read_bytes()
    fid = httpx.post(srv.url + "/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}).json()["id"]
    created: list[str] = []
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.time() + 6

    def client(i):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            n = 0
            while time.time() < stop:
                n += 1
                t0 = time.perf_counter()
                if n % 3 == 1:
                    r = c.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model), "training_file": fid,
                                                             "metadata": {"client": str(i)}})
                    if r.status_code == 200:
                        with lock:
                            created.append(r.json()["id"])
                elif n % 3 == 2:
                    r = c.get("/v1/fine_tuning/jobs", params={"limit": 10})
                else:
                    r = c.get("/v1/files")
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        errors.append(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert len(created) >= 8 and len(set(created)) == len(created)
    stored = {j["id"] for j in srv.store.list_jobs("default", limit=100000)}
    assert set(created) <= stored  # no job lost
    assert all(srv.store.get_job(j)["status"] == "queued" for j in created)
    latencies.sort()
    print(f"\nload: {len(latencies)} requests from 8 clients in 6 s, {len(created)} jobs; "
          f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p95 {latencies[int(len(latencies) * .95)] * 1000:.0f} ms")
