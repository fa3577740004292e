"""The platform's state in the workspace catalog (tunelab.db; tables from catalog migrations 3 and 4).

The catalog stays the one source of truth: a job row says what was asked, who holds it (a lease
that the worker's heartbeat renews) and how it ended; the run it started is the ``runs`` row and
folder of the run lifecycle. Every write is a short transaction; taking a job is one
``BEGIN IMMEDIATE`` transaction, so of two workers (or two servers) on one catalog exactly one gets it.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

from tunelab.catalog import Catalog

TERMINAL = ("succeeded", "failed", "cancelled")
# a job a worker may take: waiting in the queue, or "running" under a lease that nobody renewed (its worker died)
CLAIMABLE = "status = 'queued' OR (status = 'running' AND lease_until < ?)"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    def __init__(self, db_path: str | Path):
        self.path = Path(db_path)
        Catalog(self.path)  # applies pending migrations
        con = sqlite3.connect(self.path, timeout=60)
        try:  # WAL: readers (API polls) never wait for the worker's writes; persistent for the file
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60)
        con.row_factory = sqlite3.Row
        return con

    def _one(self, q: str, args: tuple = ()) -> dict | None:
        con = self._connect()
        try:
            row = con.execute(q, args).fetchone()
        finally:
            con.close()
        return dict(row) if row else None

    def _all(self, q: str, args: tuple = ()) -> list[dict]:
        con = self._connect()
        try:
            return [dict(r) for r in con.execute(q, args).fetchall()]
        finally:
            con.close()

    def _write(self, q: str, args: tuple = ()) -> int:
        con = self._connect()
        try:
            with con:
                return con.execute(q, args).rowcount
        finally:
            con.close()

    # ------------------------------------------------------------------ keys

    def add_key(self, *, id: str, name: str | None, role: str, project: str, salt: str, hash: str) -> None:
        self._write("INSERT INTO api_keys (id, name, role, project, salt, hash, created_at) VALUES (?,?,?,?,?,?,?)",
                    (id, name, role, project, salt, hash, time.time()))

    def get_key(self, id: str) -> dict | None:
        return self._one("SELECT * FROM api_keys WHERE id = ?", (id,))

    def list_keys(self) -> list[dict]:
        return self._all("SELECT id, name, role, project, created_at, revoked_at, last_used_at FROM api_keys "
                         "ORDER BY created_at")

    def active_keys(self) -> int:
        return self._one("SELECT COUNT(*) AS n FROM api_keys WHERE revoked_at IS NULL")["n"]

    def revoke_key(self, id: str) -> bool:
        return self._write("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                           (time.time(), id)) > 0

    def touch_key(self, id: str) -> None:
        self._write("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (time.time(), id))

    # ------------------------------------------------------------------ audit (append-only: triggers refuse changes)

    def audit(self, *, key_id: str | None, role: str | None, project: str | None, action: str, target: str | None,
              status: int | None, outcome: str, client: str | None = None) -> None:
        self._write("INSERT INTO audit (at, key_id, role, project, action, target, status, outcome, client) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (time.time(), key_id, role, project, action, target, status, outcome, client))

    def audit_log(self, limit: int = 100, after: int | None = None, project: str | None = None) -> list[dict]:
        q, args = "SELECT * FROM audit WHERE 1=1", []
        if after is not None:
            q += " AND seq < ?"
            args.append(after)
        if project:
            q += " AND project = ?"
            args.append(project)
        return self._all(q + " ORDER BY seq DESC LIMIT ?", (*args, limit))

    # ------------------------------------------------------------------ files

    def add_file(self, **f: Any) -> None:
        cols = ", ".join(f)
        self._write(f"INSERT INTO files ({cols}) VALUES ({', '.join('?' * len(f))})", tuple(f.values()))

    def get_file(self, id: str, project: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ? AND project = ? AND deleted_at IS NULL", (id, project))

    def list_files(self, project: str, purpose: str | None = None, limit: int = 100, after: str | None = None,
                   order: str = "desc") -> list[dict]:
        q, args = "SELECT * FROM files WHERE project = ? AND deleted_at IS NULL", [project]
        if purpose:
            q += " AND purpose = ?"
            args.append(purpose)
        if after:
            anchor = self._one("SELECT created_at FROM files WHERE id = ?", (after,))
            if anchor:
                q += " AND (created_at, id) < (?, ?)" if order == "desc" else " AND (created_at, id) > (?, ?)"
                args += [anchor["created_at"], after]
        direction = "DESC" if order == "desc" else "ASC"
        return self._all(q + f" ORDER BY created_at {direction}, id {direction} LIMIT ?", (*args, limit))

    def delete_file(self, id: str, project: str) -> bool:
        return self._write("UPDATE files SET deleted_at = ? WHERE id = ? AND project = ? AND deleted_at IS NULL",
                           (time.time(), id, project)) > 0

    # ------------------------------------------------------------------ jobs

    def add_job(self, *, id: str, project: str, api: str, command: str, spec: dict, recipe_yaml: str | None,
                run_id: str | None, created_by: str | None, status: str = "queued",
                fine_tuned_model: str | None = None) -> None:
        now = time.time()
        self._write("INSERT INTO jobs (id, project, api, command, status, spec_json, recipe_yaml, run_id, "
                    "fine_tuned_model, created_by, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (id, project, api, command, status, json.dumps(spec), recipe_yaml, run_id, fine_tuned_model,
                     created_by, now, now))

    def get_job(self, id: str, project: str | None = None) -> dict | None:
        if project is None:
            return _job(self._one("SELECT * FROM jobs WHERE id = ?", (id,)))
        return _job(self._one("SELECT * FROM jobs WHERE id = ? AND project = ?", (id, project)))

    def job_by_model(self, name: str, project: str) -> dict | None:
        return _job(self._one("SELECT * FROM jobs WHERE fine_tuned_model = ? AND project = ?", (name, project)))

    def list_jobs(self, project: str, *, api: str | None = None, limit: int = 20, after: str | None = None,
                  status: str | None = None) -> list[dict]:
        """Newest first; ``after`` is the id of the last job of the previous page (a cursor, stable under inserts)."""
        q, args = "SELECT * FROM jobs WHERE project = ?", [project]
        if api:
            q += " AND api = ?"
            args.append(api)
        if status:
            q += " AND status = ?"
            args.append(status)
        if after:
            anchor = self._one("SELECT created_at FROM jobs WHERE id = ?", (after,))
            if anchor:
                q += " AND (created_at, id) < (?, ?)"
                args += [anchor["created_at"], after]
        return [_job(r) for r in self._all(q + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))]

    def set_job(self, id: str, *, owner: str | None = None, **fields: Any) -> bool:
        """Update a job; with ``owner``, only while that worker still holds its lease."""
        for k in ("error", "result"):
            if k in fields:
                value = fields.pop(k)
                fields[f"{k}_json"] = None if value is None else json.dumps(value, default=str)
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        q, args = f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), id]
        if owner is not None:
            q += " AND lease_owner = ?"
            args.append(owner)
        return self._write(q, tuple(args)) > 0

    def request(self, id: str, what: str) -> None:
        """Ask the worker running a job to cancel or pause it (it checks at its next heartbeat)."""
        self._write("UPDATE jobs SET requested = ?, updated_at = ? WHERE id = ?", (what, time.time(), id))

    def claim(self, owner: str, ttl_s: float) -> dict | None:
        """Take the oldest claimable job under a lease of ``ttl_s`` seconds, or None. One transaction."""
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                row = con.execute(f"SELECT * FROM jobs WHERE {CLAIMABLE} ORDER BY created_at, id LIMIT 1",
                                  (now,)).fetchone()
                if row is None:
                    con.execute("COMMIT")
                    return None
                # a job whose worker died mid-run was running: continue its run rather than start over
                resume = 1 if row["status"] == "running" or row["resume"] else 0
                con.execute("UPDATE jobs SET status = 'running', lease_owner = ?, lease_until = ?, "
                            "attempts = attempts + 1, started_at = COALESCE(started_at, ?), updated_at = ?, "
                            "resume = ? WHERE id = ?", (owner, now + ttl_s, now, now, resume, row["id"]))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()
        return self.get_job(row["id"])

    def heartbeat(self, id: str, owner: str, ttl_s: float) -> dict | None:
        """Renew the lease; None when this worker lost it (another took the job over)."""
        n = self._write("UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ? AND status = 'running'",
                        (time.time() + ttl_s, id, owner))
        return self.get_job(id) if n else None

    # ------------------------------------------------------------------ events

    def event(self, job_id: str, message: str, level: str = "info") -> None:
        self._write("INSERT INTO job_events (job_id, created_at, level, message) VALUES (?,?,?,?)",
                    (job_id, time.time(), level, message))

    def events(self, job_id: str) -> list[dict]:
        return self._all("SELECT * FROM job_events WHERE job_id = ? ORDER BY seq", (job_id,))

    # ------------------------------------------------------------------ datasets (migration 4)

    def link_dataset(self, *, project: str, id: str, source_kind: str, source_id: str, files: dict) -> bool:
        """Record that dataset version ``id`` belongs to ``project``; False when it already did (the first source
        is kept: an identical version prepared again is the same dataset)."""
        return self._write("INSERT OR IGNORE INTO datasets (id, project, source_kind, source_id, files_json, "
                           "created_at) VALUES (?,?,?,?,?,?)",
                           (id, project, source_kind, source_id, json.dumps(files), time.time())) > 0

    def get_dataset(self, id: str, project: str) -> dict | None:
        return _json_cols(self._one("SELECT * FROM datasets WHERE id = ? AND project = ?", (id, project)), "files")

    def list_datasets(self, project: str, source_id: str | None = None) -> list[dict]:
        """Newest first."""
        q, args = "SELECT * FROM datasets WHERE project = ?", [project]
        if source_id:
            q += " AND source_id = ?"
            args.append(source_id)
        return [_json_cols(r, "files") for r in self._all(q + " ORDER BY created_at DESC, id DESC", tuple(args))]

    # ------------------------------------------------------------------ feedback campaigns (migration 4)

    def add_campaign(self, *, id: str, project: str, kind: str, name: str | None, instructions: str | None,
                     labelers_per_item: int, status: str, spec: dict, created_by: str | None) -> None:
        now = time.time()
        self._write("INSERT INTO feedback_campaigns (id, project, kind, name, instructions, labelers_per_item, status, "
                    "spec_json, created_by, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (id, project, kind, name, instructions, labelers_per_item, status, json.dumps(spec), created_by,
                     now, now))

    def get_campaign(self, id: str, project: str) -> dict | None:
        return _json_cols(self._one("SELECT * FROM feedback_campaigns WHERE id = ? AND project = ?", (id, project)),
                          "spec")

    def list_campaigns(self, project: str) -> list[dict]:
        return [_json_cols(r, "spec") for r in self._all(
            "SELECT * FROM feedback_campaigns WHERE project = ? ORDER BY created_at DESC, id DESC", (project,))]

    def set_campaign(self, id: str, **fields: Any) -> None:
        if "spec" in fields:
            fields["spec_json"] = json.dumps(fields.pop("spec"))
        fields["updated_at"] = time.time()
        self._write(f"UPDATE feedback_campaigns SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                    (*fields.values(), id))

    def fail_generating(self, message: str) -> int:
        """Campaigns left 'generating' by a server that stopped: failed, with the reason."""
        return self._write("UPDATE feedback_campaigns SET status = 'failed', error = ?, updated_at = ? "
                           "WHERE status = 'generating'", (message, time.time()))

    def add_items(self, campaign_id: str, items: list[tuple[str, dict]]) -> None:
        """``items``: (item id, data) in order."""
        con = self._connect()
        try:
            with con:
                con.executemany("INSERT INTO feedback_items (id, campaign_id, seq, data_json) VALUES (?,?,?,?)",
                                [(iid, campaign_id, i, json.dumps(d)) for i, (iid, d) in enumerate(items)])
        finally:
            con.close()

    def items(self, campaign_id: str) -> list[dict]:
        return [_json_cols(r, "data") for r in self._all(
            "SELECT * FROM feedback_items WHERE campaign_id = ? ORDER BY seq", (campaign_id,))]

    def get_item(self, campaign_id: str, item_id: str) -> dict | None:
        return _json_cols(self._one("SELECT * FROM feedback_items WHERE id = ? AND campaign_id = ?",
                                    (item_id, campaign_id)), "data")

    def next_item(self, campaign_id: str, labeler: str, per_item: int) -> dict | None:
        """The item this labeler has not answered that still needs answers (skips do not count), fewest first."""
        return _json_cols(self._one(
            "SELECT i.*, (SELECT COUNT(*) FROM feedback_answers a WHERE a.item_id = i.id AND a.answer != 'skip') AS n "
            "FROM feedback_items i WHERE i.campaign_id = ? AND NOT EXISTS "
            "(SELECT 1 FROM feedback_answers a WHERE a.item_id = i.id AND a.labeler = ?) AND n < ? "
            "ORDER BY n, i.seq LIMIT 1", (campaign_id, labeler, per_item)), "data")

    def answer(self, *, campaign_id: str, item_id: str, labeler: str, answer: str, left_side: str | None,
               reason: str | None) -> bool:
        """Record a labeler's answer to an item; a second answer replaces the first. True when it replaced one."""
        now = time.time()
        con = self._connect()
        try:
            with con:
                old = con.execute("SELECT 1 FROM feedback_answers WHERE item_id = ? AND labeler = ?",
                                  (item_id, labeler)).fetchone()
                con.execute("INSERT INTO feedback_answers (campaign_id, item_id, labeler, answer, left_side, reason, "
                            "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (item_id, labeler) DO UPDATE "
                            "SET answer = excluded.answer, left_side = excluded.left_side, reason = excluded.reason, "
                            "updated_at = excluded.updated_at", (campaign_id, item_id, labeler, answer, left_side,
                                                                 reason, now, now))
        finally:
            con.close()
        return old is not None

    def answers(self, campaign_id: str) -> list[dict]:
        return self._all("SELECT * FROM feedback_answers WHERE campaign_id = ? ORDER BY created_at", (campaign_id,))



def _job(row: dict | None) -> dict | None:
    if row is None:
        return None
    row["spec"] = json.loads(row.pop("spec_json"))
    row["error"] = json.loads(row.pop("error_json") or "null")
    row["result"] = json.loads(row.pop("result_json") or "null")
    return row


def _json_cols(row: dict | None, *names: str) -> dict | None:
    if row is None:
        return None
    for n in names:
        row[n] = json.loads(row.pop(f"{n}_json") or "null")
    return row
