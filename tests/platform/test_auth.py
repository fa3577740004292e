"""Keys, roles, projects and the audit log; the bind rule of `tunelab server`."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.conftest import run_cli
from tests.platform.conftest import JOB_ENV, write_chat_data

openai = pytest.importorskip("openai")


def _keys(srv):
    from tunelab.platform.auth import create_key

    out = {}
    for role, project in (("admin", "alpha"), ("trainer", "alpha"), ("labeler", "alpha"), ("viewer", "alpha"),
                          ("trainer", "beta")):
        out[f"{role}@{project}"] = create_key(srv.store, role, project, name=f"{role} of {project}")[1]
    return out


def _call(srv, key, method, path, **kw):
    import httpx2 as httpx

    return httpx.request(method, srv.url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, **kw)


def test_roles_projects_and_audit(make_server, tiny_model, tmp_path):
    srv = make_server(worker=False)
    keys = _keys(srv)
    data = write_chat_data(tmp_path / "t.jsonl", 8).read_bytes()

    # no key, a wrong key, a well-formed key with a wrong secret: 401
    assert _call(srv, None, "GET", "/v1/files").status_code == 401
    assert _call(srv, "sk-nope", "GET", "/v1/files").status_code == 401
    kid = keys["viewer@alpha"].split("-")[1]
    assert _call(srv, f"tlk-{kid}-{'x' * 43}", "GET", "/v1/files").status_code == 401
    assert _call(srv, None, "GET", "/health").status_code == 200  # public

    def upload(key):
        return _call(srv, key, "POST", "/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})

    def create_job(key, fid):
        return _call(srv, key, "POST", "/v1/fine_tuning/jobs", json={"model": str(tiny_model), "training_file": fid})

    # trainer: files and jobs; viewer: read only; labeler: none of it
    r = upload(keys["trainer@alpha"])
    assert r.status_code == 200, r.text
    fid = r.json()["id"]
    r = create_job(keys["trainer@alpha"], fid)
    assert r.status_code == 200, r.text
    jid = r.json()["id"]
    for role in ("viewer", "labeler"):
        assert upload(keys[f"{role}@alpha"]).status_code == 403
        assert create_job(keys[f"{role}@alpha"], fid).status_code == 403
        assert _call(srv, keys[f"{role}@alpha"], "POST", f"/v1/fine_tuning/jobs/{jid}/cancel").status_code == 403
        assert _call(srv, keys[f"{role}@alpha"], "DELETE", f"/v1/files/{fid}").status_code == 403
    for path in (f"/v1/files/{fid}", "/v1/files", f"/v1/fine_tuning/jobs/{jid}", f"/v1/fine_tuning/jobs/{jid}/events",
                 "/v1/models", f"/v1/files/{fid}/content"):
        assert _call(srv, keys["viewer@alpha"], "GET", path).status_code == 200, path
        assert _call(srv, keys["labeler@alpha"], "GET", path).status_code == 403, path
    r = _call(srv, keys["labeler@alpha"], "POST", "/v1/chat/completions",
              json={"model": str(tiny_model), "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 403
    # admin endpoints: admin only
    for role in ("trainer", "viewer", "labeler"):
        assert _call(srv, keys[f"{role}@alpha"], "GET", "/v1/tunelab/admin/audit").status_code == 403
        assert _call(srv, keys[f"{role}@alpha"], "POST", "/v1/tunelab/admin/keys",
                     json={"role": "admin"}).status_code == 403

    # another project's ids answer 404, its lists are empty
    other = keys["trainer@beta"]
    assert _call(srv, other, "GET", f"/v1/files/{fid}").status_code == 404
    assert _call(srv, other, "GET", f"/v1/files/{fid}/content").status_code == 404
    assert _call(srv, other, "GET", f"/v1/fine_tuning/jobs/{jid}").status_code == 404
    assert _call(srv, other, "POST", f"/v1/fine_tuning/jobs/{jid}/cancel").status_code == 404
    assert _call(srv, other, "DELETE", f"/v1/files/{fid}").status_code == 404
    assert _call(srv, other, "GET", "/v1/files").json()["data"] == []
    assert _call(srv, other, "GET", "/v1/fine_tuning/jobs").json()["data"] == []
    assert create_job(other, fid).status_code == 400  # the file does not exist for beta
    r = _call(srv, other, "POST", "/v1/tunelab/jobs", json={"command": "export", "run": f"sft-{jid}"})
    assert r.status_code == 404

    # admin: create a key over HTTP (shown once), list (no secrets), revoke (refused at once)
    r = _call(srv, keys["admin@alpha"], "POST", "/v1/tunelab/admin/keys", json={"role": "viewer", "project": "alpha"})
    new = r.json()
    assert r.status_code == 200 and new["key"].startswith("tlk-")
    assert _call(srv, new["key"], "GET", "/v1/files").status_code == 200
    listed = _call(srv, keys["admin@alpha"], "GET", "/v1/tunelab/admin/keys").json()["data"]
    assert new["id"] in {k["id"] for k in listed} and all("hash" not in k and "salt" not in k for k in listed)
    assert _call(srv, keys["admin@alpha"], "DELETE", f"/v1/tunelab/admin/keys/{new['id']}").status_code == 200
    assert _call(srv, new["key"], "GET", "/v1/files").status_code == 401

    # the audit log: who did what and the outcome; refusals too; never a secret
    audit = _call(srv, keys["admin@alpha"], "GET", "/v1/tunelab/admin/audit", params={"limit": 1000}).json()["data"]
    actions = {(a["role"], a["action"], a["status"]) for a in audit}
    assert ("trainer", "POST /v1/files", 200) in actions
    assert ("viewer", "POST /v1/files", 403) in actions
    assert (None, "GET /v1/files", 401) in actions
    assert ("admin", f"DELETE /v1/tunelab/admin/keys/{new['id']}", 200) in actions
    dump = "\n".join(sqlite3.connect(srv.ws.db_path).iterdump())
    for key in [*keys.values(), new["key"]]:
        assert key not in dump and key.split("-", 2)[2] not in dump  # neither the key nor its secret is stored
    assert all(key not in json.dumps(audit) for key in keys.values())

    # append-only: the database refuses changes to the audit table
    con = sqlite3.connect(srv.ws.db_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE audit SET outcome = 'ok'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM audit")


def test_open_server_and_bind_rule(tmp_path):
    ws = tmp_path / "ws"
    r = run_cli("server", "--host", "0.0.0.0", "--port", "1", "-w", str(ws), env=JOB_ENV, timeout=120)
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0 with no API key" in r.stderr
    assert "Traceback" not in r.stderr

    r = run_cli("admin", "keys", "create", "--role", "admin", "--project", "ops", "-w", str(ws), timeout=120)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("tlk-") and "not shown again" in r.stderr
    r = run_cli("admin", "keys", "list", "-w", str(ws), timeout=120)
    assert key.split("-")[1] in r.stdout and key not in r.stdout and "ops" in r.stdout
    r = run_cli("admin", "keys", "create", "--role", "boss", "-w", str(ws), timeout=120)
    assert r.returncode == 2 and "unknown role 'boss'" in r.stderr
    r = run_cli("admin", "keys", "revoke", key.split("-")[1], "-w", str(ws), timeout=120)
    assert r.returncode == 0
    r = run_cli("admin", "audit", "--json", "-w", str(ws), timeout=120)
    rows = json.loads(r.stdout)
    assert [x["action"].split()[1] for x in rows[:2]] == ["revoke", "create"] and key not in r.stdout
    # with the only key revoked, binding beyond loopback is refused again
    r = run_cli("server", "--host", "0.0.0.0", "--port", "1", "-w", str(ws), env=JOB_ENV, timeout=120)
    assert r.returncode == 2 and "refusing" in r.stderr


def test_open_mode_only_without_keys(make_server):
    srv = make_server(worker=False)
    assert _call(srv, None, "GET", "/v1/files").status_code == 200  # no key configured: open (loopback)
    from tunelab.platform.auth import create_key

    create_key(srv.store, "viewer", "default")
    assert _call(srv, None, "GET", "/v1/files").status_code == 401  # the first key closes it
