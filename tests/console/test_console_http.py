"""The console's HTTP side without a browser: sign-in, the cookie's cross-site guard, redirects, dry-run
validation and the native pause/resume endpoints the job page uses."""

from __future__ import annotations

import httpx2 as httpx

from tunelab.platform.auth import create_key


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
