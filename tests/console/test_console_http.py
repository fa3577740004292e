"""The console's HTTP side without a browser: sign-in, the cookie's cross-site guard, redirects, dry-run
validation and the native pause/resume endpoints the job page uses."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx2 as httpx

from tunelab.platform.auth import create_key


def _run_async(make_coro):
    """asyncio.run in a thread of its own: the browser tests' Playwright (sync API) keeps an event loop running in
    the main thread for the rest of the session, and asyncio.run refuses to start inside a running loop."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


def test_sign_in_cookie_and_cross_site_guard(console_server):
    srv = console_server(worker=False)
    _, admin = create_key(srv.store, "admin")
    # no key: pages redirect to the sign-in page (with where to come back), the API answers 401
    r = httpx.get(srv.url + "/console/jobs?status=failed")
    assert r.status_code == 303 and r.headers["location"] == "/console/login?next=%2Fconsole%2Fjobs%3Fstatus%3Dfailed"
    assert httpx.get(srv.url + "/v1/tunelab/jobs").status_code == 401
    assert httpx.get(srv.url + "/console/static/console.js").status_code == 200  # public
    # a wrong key is refused; the sign-in never redirects off this server
    r = httpx.post(srv.url + "/console/login", data={"key": "tlk-x", "next": "/console/"},
                   headers={"origin": srv.url})
    assert r.status_code == 401 and "not valid" in r.text
    for evil in ("//evil.example/x", "https://evil.example/console", "/v1/files"):
        r = httpx.post(srv.url + "/console/login", data={"key": admin, "next": evil}, headers={"origin": srv.url})
        assert r.status_code == 303 and r.headers["location"] == "/console/", evil
    cookie = r.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    jar = {"tunelab_key": admin}
    assert httpx.get(srv.url + "/console/jobs", cookies=jar).status_code == 200
    body = {"recipe": "recipe: sft\nmodel: {name: m}\ndata: {train: t.jsonl}\n", "dry_run": True}
    # a change authenticated by the cookie must come from this server's pages
    assert httpx.post(srv.url + "/v1/tunelab/jobs", json=body, cookies=jar).status_code == 403
    assert httpx.post(srv.url + "/v1/tunelab/jobs", json=body, cookies=jar,
                      headers={"origin": "https://evil.example"}).status_code == 403
    assert httpx.post(srv.url + "/v1/tunelab/jobs", json=body, cookies=jar,
                      headers={"sec-fetch-site": "cross-site", "origin": srv.url}).status_code == 403
    assert httpx.post(srv.url + "/v1/tunelab/jobs", json=body, cookies=jar,
                      headers={"origin": srv.url}).status_code == 200
    # the same request with the key in the header (an API client) needs no Origin
    assert httpx.post(srv.url + "/v1/tunelab/jobs", json=body,
                      headers={"authorization": f"Bearer {admin}"}).status_code == 200
    refusals = [a for a in srv.store.audit_log(100) if a["outcome"] == "refused: cross-site request"]
    assert len(refusals) == 3


def test_open_server_refuses_cross_site_browser_changes(console_server):
    srv = console_server(worker=False)
    body = {"recipe": {"recipe": "sft", "model": {"name": "m"}, "data": {"train": "t.jsonl"}}, "dry_run": True}
    assert httpx.post(srv.url + "/v1/tunelab/jobs", json=body).status_code == 200  # API clients send no Origin
    r = httpx.post(srv.url + "/v1/tunelab/jobs", json=body, headers={"origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf"
    r = httpx.post(srv.url + "/console/jobs", data={"tab": "yaml", "yaml": "recipe: sft"},
                   headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    assert srv.store.list_jobs("default", limit=10) == []
    assert httpx.get(srv.url + "/", follow_redirects=False).headers["location"] == "/console/"


def test_dry_run_validates_and_queues_nothing(console_server):
    srv = console_server(worker=False)
    ok = httpx.post(srv.url + "/v1/tunelab/jobs", json={"recipe": {"recipe": "sft", "model": {"name": "m"},
                                                                     "data": {"train": "t.jsonl"}}, "dry_run": True})
    assert ok.status_code == 200 and ok.json() == {"object": "tunelab.job.validation", "valid": True,
                                                    "command": "train", "recipe": "sft"}
    bad = httpx.post(srv.url + "/v1/tunelab/jobs", json={"recipe": "recipe: sft\ntrain: {learning_rate: x}\n",
                                                         "dry_run": True})
    assert bad.status_code == 422 and "train.learning_rate" in {p["loc"] for p in bad.json()["error"]["problems"]}
    assert srv.store.list_jobs("default", limit=10) == []
    # the console's form fragment shows the same problems
    r = httpx.post(srv.url + "/console/jobs/validate", data={"tab": "form", "recipe": "sft", "model": "m",
                                                              "learning_rate": "abc"}, headers={"origin": srv.url})
    assert r.status_code == 200 and 'href="#f-learning_rate"' in r.text
    r = httpx.post(srv.url + "/console/jobs", data={"tab": "yaml", "yaml": "recipe: sft\nmodel: [x"},
                   headers={"origin": srv.url})
    assert r.status_code == 422 and "not valid YAML" in r.text


def test_native_pause_and_resume_rules(console_server):
    srv = console_server(worker=False)
    st = srv.store

    def job(jid, status, command="train", run="sft-x"):
        st.add_job(id=jid, project="default", api="native", command=command, spec={}, recipe_yaml="recipe: sft\n",
                   run_id=run, created_by=None)
        st.set_job(jid, status=status)

    def post(jid, what):
        return httpx.post(f"{srv.url}/v1/tunelab/jobs/{jid}/{what}")

    job("job-a", "queued")
    assert post("job-a", "resume").status_code == 400
    job("job-b", "cancelled", run="sft-b")
    assert post("job-b", "resume").status_code == 400  # no checkpoint: nothing to continue from
    ck = srv.ws.runs_dir / "sft-b" / "checkpoints" / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    r = post("job-b", "resume")
    assert r.status_code == 200 and r.json()["status"] == "queued" and st.get_job("job-b")["resume"] == 1
    job("job-c", "running", command="data_prepare", run=None)
    assert post("job-c", "pause").status_code == 400  # only training jobs stop at a step
    job("job-d", "running")
    assert post("job-d", "pause").status_code == 200 and st.get_job("job-d")["requested"] == "pause"


def _job(srv, jid="job-s", run="sft-s", status="running"):
    srv.store.add_job(id=jid, project="default", api="native", command="train", spec={}, recipe_yaml="recipe: sft\n",
                      run_id=run, created_by=None)
    srv.store.set_job(jid, status=status)
    (srv.ws.runs_dir / run).mkdir(parents=True, exist_ok=True)
    (srv.ws.root / "platform" / "jobs" / jid).mkdir(parents=True, exist_ok=True)
    return srv.ws.runs_dir / run / "metrics.jsonl", srv.ws.root / "platform" / "jobs" / jid / "log.txt"


def _append(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _rows(steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s, "learning_rate": 1e-4, "tokens_seen": s * 512}) + "\n"
                   for s in steps)


def test_job_stream_sends_only_what_is_new(console_server):
    """A long run's page: the stream reads the metrics and the log from where the page's own answers ended, so
    each second costs the rows and lines written since, not the whole metrics.jsonl (here 3000 rows)."""
    srv = console_server(worker=False)
    metrics, log = _job(srv)
    _append(metrics, _rows(range(1, 3001)))
    _append(log, "step 3000\n")
    # every API answer the console reads while the stream runs, with its size
    reads = []

    async def record(response):
        await response.aread()
        reads.append((str(response.request.url), len(response.content)))

    srv.app.console.api._client.event_hooks["response"].append(record)
    page = httpx.get(f"{srv.url}/console/jobs/job-s").text
    frm = int(re.search(r'data-from="(\d+)"', page).group(1))
    log_from = int(re.search(r'data-log-from="(\d+)"', page).group(1))
    assert frm == metrics.stat().st_size and log_from == log.stat().st_size and 'data-points>3000<' in page
    reads.clear()
    with httpx.stream("GET", f"{srv.url}/console/jobs/job-s/stream", params={"from": frm, "log_from": log_from},
                      timeout=30) as r:
        events = _sse(r.iter_lines())
        assert next(events) == ("state", None, {"status": "running", "error": None})
        _append(metrics, _rows([3001, 3002]))
        _append(log, "step 3002\n")
        got = _until(events, {"metrics", "log"})
        assert got["metrics"][1] == [{"step": 3001, "loss": 1 / 3001}, {"step": 3002, "loss": 1 / 3002}]
        assert got["log"][1] == {"text": "step 3002\n", "reset": False}
        assert got["log"][0] == f"{metrics.stat().st_size}:{log.stat().st_size}"  # where a reconnect resumes
        _append(metrics, _rows([3003]))
        assert _until(events, {"metrics"})["metrics"][1] == [{"step": 3003, "loss": 1 / 3003}]
        srv.store.set_job("job-s", status="succeeded")
        assert _until(events, {"end"})
    metric_reads = [(u, n) for u, n in reads if "/metrics" in u]
    assert len(metric_reads) >= 3 and all("offset=" in u for u, _ in metric_reads), metric_reads
    # no tick read the whole file again: each answer holds at most the two rows written since the previous one
    assert max(n for _, n in metric_reads) < 600 < metrics.stat().st_size / 100, metric_reads
    # a reconnecting browser (Last-Event-ID) gets only what came after that id
    _append(metrics, _rows([3004]))
    with httpx.stream("GET", f"{srv.url}/console/jobs/job-s/stream", params={"from": 0},
                      headers={"last-event-id": f"{frm}:{log_from}"}, timeout=30) as r:
        got = _until(_sse(r.iter_lines()), {"end"})
    assert [x["step"] for x in got["metrics"][1]] == [3001, 3002, 3003, 3004]
    assert got["log"][1] == {"text": "step 3002\n", "reset": False}


def _sse(lines):
    """(event, id, data) for each server-sent event."""
    name, eid, data = None, None, []
    for line in lines:
        if not line:
            if name:
                yield name, eid, json.loads("\n".join(data))
            name, eid, data = None, None, []
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("id: "):
            eid = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])


def _until(events, names: set) -> dict:
    """Read events until each of ``names`` came (a metrics event must come once: the test appends, then waits)."""
    got = {}
    for name, eid, data in events:
        assert name not in got or name == "state", f"a second {name} event: {data}"
        got[name] = (eid, data)
        if names <= set(got):
            return got
    raise AssertionError(f"the stream ended before {names - set(got)}")


def test_a_console_action_is_audited_once_with_the_browsers_address(console_server):
    """The console's POST and the API call it makes in-process are one action: one audit row, the API's, with the
    browser's address (not the in-process transport's)."""

    import httpx as real_httpx  # an ASGI transport that claims a browser's address (a TEST-NET one)

    srv = console_server(worker=False)
    kid, key = create_key(srv.store, "trainer")
    _job(srv, "job-c", "sft-c", status="queued")
    _job(srv, "job-d", "sft-d", status="queued")

    async def run():
        browser = real_httpx.AsyncClient(transport=real_httpx.ASGITransport(app=srv.app, client=("198.51.100.7", 5555)),
                                         base_url="http://tunelab.test", cookies={"tunelab_key": key})
        hdr = {"origin": "http://tunelab.test"}
        r1 = await browser.post("/console/jobs/job-c/cancel", headers=hdr)
        r2 = await browser.post("/console/jobs/validate", data={"tab": "yaml", "yaml": "recipe: sft"}, headers=hdr)
        r3 = await browser.post("/console/jobs/job-x/cancel", headers=hdr)  # the API answers 404
        # an API client: still one row each, its own address
        api = real_httpx.AsyncClient(transport=real_httpx.ASGITransport(app=srv.app, client=("192.0.2.1", 1)),
                                     base_url="http://tunelab.test", headers={"authorization": f"Bearer {key}"})
        r4 = await api.post("/v1/tunelab/jobs/job-d/cancel")
        return r1, r2, r3, r4

    r1, r2, r3, r4 = _run_async(run)
    assert r1.status_code == 303 and srv.store.get_job("job-c")["status"] == "cancelled"
    assert r2.status_code == 200 and r3.status_code == 404 and r4.status_code == 200
    rows = sorted(srv.store.audit_log(100), key=lambda a: a["seq"])
    assert [(a["action"], a["status"], a["client"], a["key_id"]) for a in rows] == [
        ("POST /v1/tunelab/jobs/job-c/cancel", 200, "198.51.100.7", kid),
        ("POST /v1/tunelab/jobs", 422, "198.51.100.7", kid),  # the dry run that validated the form
        ("POST /v1/tunelab/jobs/job-x/cancel", 404, "198.51.100.7", kid),
        ("POST /v1/tunelab/jobs/job-d/cancel", 200, "192.0.2.1", kid)]
    # a console request that makes no API call (the page refuses it itself) is audited once, as itself
    viewer = create_key(srv.store, "viewer")[1]
    r = httpx.post(f"{srv.url}/console/jobs/job-d/pause", cookies={"tunelab_key": viewer}, headers={"origin": srv.url})
    assert r.status_code == 403
    for _ in range(100):  # the server writes the row once the answer is sent
        if len(srv.store.audit_log(100)) > 4:
            break
        time.sleep(0.05)
    rows = srv.store.audit_log(100)
    assert len(rows) == 5
    assert (rows[0]["action"], rows[0]["status"], rows[0]["role"]) == ("POST /console/jobs/job-d/pause", 403, "viewer")


def test_a_claimed_client_address_is_not_recorded(console_server):
    """Only this process can say that a call acts for another address: a header from an HTTP client claiming one
    (X-Forwarded-For and kin) changes nothing in the audit log, on the API or on the console."""

    import httpx as real_httpx

    srv = console_server(worker=False)
    _, key = create_key(srv.store, "trainer")
    _job(srv, "job-e", "sft-e", status="queued")
    claims = {"x-forwarded-for": "203.0.113.9", "x-real-ip": "203.0.113.9", "forwarded": "for=203.0.113.9",
              "x-tunelab-client": "203.0.113.9", "x-client-ip": "203.0.113.9"}

    async def run():
        c = real_httpx.AsyncClient(transport=real_httpx.ASGITransport(app=srv.app, client=("198.51.100.7", 5555)),
                                   base_url="http://tunelab.test")
        await c.post("/v1/tunelab/jobs/job-e/pause", headers={**claims, "authorization": f"Bearer {key}"})
        await c.post("/console/jobs/job-e/cancel", cookies={"tunelab_key": key},
                     headers={**claims, "origin": "http://tunelab.test"})
        await c.post("/v1/tunelab/jobs/job-e/cancel", headers=claims)  # no key: refused, and audited

    _run_async(run)
    rows = srv.store.audit_log(100)
    assert len(rows) == 3 and {a["client"] for a in rows} == {"198.51.100.7"}, rows
