"""Several processes opening and writing one new workspace catalog at once (parallel tuning trials,
DDP ranks): the migration runs once, every row lands, and run directories never collide."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

N_PROC, N_ROWS = 4, 15


def _writer(root: str, barrier, i: int, q) -> None:
    from tunelab.workspace import Workspace

    ws = Workspace(Path(root))
    barrier.wait()  # all processes open the fresh database together
    try:
        cat = ws.catalog()
        ids = []
        for k in range(N_ROWS):
            run_id, d = ws.new_run_dir("sft", "same-name")
            cat.add_run(id=run_id, kind="sft", dir=d, name=f"w{i}-{k}")
            cat.update_run(run_id, status="completed", metrics={"worker": i, "k": k})
            ids.append(run_id)
        q.put(("ok", ids))
    except Exception as e:  # reported to the test, which fails with it
        q.put(("error", repr(e)))


def test_concurrent_processes_share_a_new_catalog(tmp_path):
    from tunelab.catalog import MIGRATIONS
    from tunelab.workspace import Workspace

    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(N_PROC), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), barrier, i, q)) for i in range(N_PROC)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    assert [r for r in results if r[0] == "error"] == []
    ids = [i for _, got in results for i in got]
    assert len(set(ids)) == N_PROC * N_ROWS  # no run id handed out twice
    ws = Workspace(tmp_path)
    rows = ws.catalog().list_runs()
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert all(r["status"] == "completed" for r in rows)
    assert sorted(p.name for p in ws.runs_dir.iterdir()) == sorted(ids)
    import sqlite3

    assert sqlite3.connect(ws.db_path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_migration_statements_split_whole():
    from tunelab.catalog import MIGRATIONS, _statements

    stmts = _statements(MIGRATIONS[0])
    assert [s.split()[0:2] for s in stmts] == [["CREATE", "TABLE"], ["CREATE", "INDEX"], ["CREATE", "INDEX"]]
