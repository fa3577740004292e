"""The embedded SQLite catalog: one row per run (training, evaluation, ...), with lineage.

Schema changes are numbered migrations applied in order; ``PRAGMA user_version`` records
how far a database has come, so an old workspace upgrades itself on open.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

# A running run records its heartbeat every HEARTBEAT_S seconds (tunelab/train/_run.py); one whose
# heartbeat is older than STALE_S, or whose process is gone from this host, is shown as interrupted.
HEARTBEAT_S = 15.0
STALE_S = 120.0
STATES = ("queued", "running", "completed", "failed", "interrupted", "cancelled")

MIGRATIONS: list[str] = [
    # 1: runs
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        dir TEXT NOT NULL,
        parent_id TEXT,
        base_model TEXT,
        dataset_id TEXT,
        config_json TEXT,
        metrics_json TEXT
    );
    CREATE INDEX runs_kind ON runs(kind);
    CREATE INDEX runs_parent ON runs(parent_id);
    """,
    # 2: the run lifecycle (tunelab/train/_run.py): which process runs it and when it last
    # showed life, so a run whose process died reads "interrupted", not "running"; the error
    # message of a failed run
    """
    ALTER TABLE runs ADD COLUMN pid INTEGER;
    ALTER TABLE runs ADD COLUMN host TEXT;
    ALTER TABLE runs ADD COLUMN heartbeat_at REAL;
    ALTER TABLE runs ADD COLUMN error TEXT;
    """,
    # 3: the platform (tunelab/platform): projects, hashed API keys, uploaded files, the job queue (a job is
    # taken by lease: lease_owner/lease_until, renewed by the worker's heartbeat), job events, and an
    # append-only audit log (triggers refuse UPDATE and DELETE)
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT,
        role TEXT NOT NULL,
        project TEXT NOT NULL,
        salt TEXT NOT NULL,
        hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL,
        last_used_at REAL
    );
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        path TEXT NOT NULL,
        records INTEGER,
        kind TEXT,
        sha256 TEXT,
        created_at REAL NOT NULL,
        deleted_at REAL
    );
    CREATE INDEX files_project ON files(project, created_at);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        api TEXT NOT NULL,
        command TEXT NOT NULL,
        status TEXT NOT NULL,
        spec_json TEXT NOT NULL,
        recipe_yaml TEXT,
        run_id TEXT,
        fine_tuned_model TEXT,
        created_by TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        lease_owner TEXT,
        lease_until REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        requested TEXT,
        resume INTEGER NOT NULL DEFAULT 0,
        error_json TEXT,
        result_json TEXT
    );
    CREATE INDEX jobs_queue ON jobs(status, created_at);
    CREATE INDEX jobs_project ON jobs(project, created_at);
    CREATE UNIQUE INDEX jobs_model ON jobs(fine_tuned_model);
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX job_events_job ON job_events(job_id, seq);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        key_id TEXT,
        role TEXT,
        project TEXT,
        action TEXT NOT NULL,
        target TEXT,
        status INTEGER,
        outcome TEXT NOT NULL,
        client TEXT
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    # 4: the platform's datasets and human feedback (tunelab/platform/datasets.py, feedback.py): which dataset
    # versions belong to a project and where each came from (a data job or a feedback export), with the file ids
    # its splits are registered under; feedback campaigns, their items, and one answer per (item, labeler)
    """
    CREATE TABLE datasets (
        id TEXT NOT NULL,
        project TEXT NOT NULL,
        source_kind TEXT NOT NULL,
        source_id TEXT NOT NULL,
        files_json TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (project, id)
    );
    CREATE INDEX datasets_project ON datasets(project, created_at);
    CREATE TABLE feedback_campaigns (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT,
        instructions TEXT,
        labelers_per_item INTEGER NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        spec_json TEXT NOT NULL,
        created_by TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX feedback_campaigns_project ON feedback_campaigns(project, created_at);
    CREATE TABLE feedback_items (
        id TEXT PRIMARY KEY,
        campaign_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data_json TEXT NOT NULL
    );
    CREATE INDEX feedback_items_campaign ON feedback_items(campaign_id, seq);
    CREATE TABLE feedback_answers (
        campaign_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        labeler TEXT NOT NULL,
        answer TEXT NOT NULL,
        left_side TEXT,
        reason TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (item_id, labeler)
    );
    CREATE INDEX feedback_answers_campaign ON feedback_answers(campaign_id, labeler);
    """,
]


class Catalog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def _migrate(self) -> None:
        """Apply the pending migrations in one write transaction.

        Several processes may open a new workspace at once (parallel tuning trials, DDP ranks): the
        version is read after ``BEGIN IMMEDIATE`` takes the database's write lock, so exactly one of
        them migrates and the others wait (``timeout``) and then see the new version.
        """
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # transactions by hand
        try:
            if con.execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
                return  # the common case: no write lock taken
            con.execute("BEGIN IMMEDIATE")
            try:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    # statement by statement: executescript would commit the open transaction first
                    for stmt in _statements(script):
                        con.execute(stmt)
                    con.execute(f"PRAGMA user_version = {i}")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    def add_run(self, *, id: str, kind: str, dir: Path, name: str | None = None, status: str = "running",
                parent_id: str | None = None, base_model: str | None = None, dataset_id: str | None = None,
                config: dict | None = None) -> None:
        now = time.time()
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO runs (id, kind, name, status, created_at, updated_at, dir, parent_id,"
                " base_model, dataset_id, config_json, metrics_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (id, kind, name, status, now, now, str(dir), parent_id, base_model, dataset_id,
                 json.dumps(config or {}, default=str), None),
            )

    def update_run(self, id: str, *, status: str | None = None, metrics: dict | None = None,
                   pid: int | None = None, host: str | None = None, heartbeat_at: float | None = None,
                   error: str | None = None) -> None:
        sets, args = ["updated_at = ?"], [time.time()]
        if status is not None:
            sets.append("status = ?")
            args.append(status)
        if metrics is not None:
            sets.append("metrics_json = ?")
            args.append(json.dumps(metrics, default=str))
        for col, val in (("pid", pid), ("host", host), ("heartbeat_at", heartbeat_at), ("error", error)):
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(val)
        with self._connect() as con:
            con.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id = ?", (*args, id))

    def get_run(self, id: str) -> dict[str, Any] | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM runs WHERE id = ?", (id,)).fetchone()
        return _row(row) if row else None

    def list_runs(self, kind: str | None = None, parent_id: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM runs WHERE 1=1", []
        if kind:
            q += " AND kind = ?"
            args.append(kind)
        if parent_id:
            q += " AND parent_id = ?"
            args.append(parent_id)
        with self._connect() as con:
            rows = con.execute(q + " ORDER BY created_at", args).fetchall()
        return [_row(r) for r in rows]


def _statements(script: str) -> list[str]:
    """Split a migration script into complete SQL statements (sqlite3.complete_statement knows triggers)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {buf.strip()[:80]}")
    return out


def _row(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["config"] = json.loads(d.pop("config_json") or "{}")
    d["metrics"] = json.loads(d.pop("metrics_json") or "null")
    if d["status"] == "running" and not alive(d):
        d["status"] = "interrupted"  # its process died without a word (SIGKILL, power loss)
    return d


def alive(row: dict, now: float | None = None) -> bool:
    """Whether a run recorded as running still has a live process: its pid on this host, or (another
    host) a recent heartbeat. A row without a heartbeat (older workspaces) is taken at its word."""
    hb = row.get("heartbeat_at")
    if hb is None:
        return True
    if row.get("host") == socket.gethostname() and row.get("pid"):
        try:
            os.kill(int(row["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OSError):
            pass  # exists, owned by someone else
    return (now or time.time()) - float(hb) < STALE_S
