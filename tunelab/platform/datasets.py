"""A project's datasets over the API: the versions its data jobs and feedback exports made.

A dataset version is a folder ``<workspace>/datasets/<ds-id>/`` written by ``tunelab data prepare``
(manifest.json, datacard.md, profile.json, train/validation/test.jsonl, rejects.jsonl). Which
versions belong to which project is recorded in the catalog (table ``datasets``, migration 4) when
a data job succeeds (the worker) or a feedback campaign is exported (tunelab.platform.feedback),
never guessed from the folder names: the same content prepared by two projects is one folder and
two links, and another project's dataset answers 404.

Each split of a registered version is also registered as a file (purpose ``tunelab-dataset``), so a
native recipe names it by its ``file-…`` id like an upload (``data: {train: file-…}``) and the run's
lineage continues through the version's manifest to its raw files. Deleting such a file id
forgets the id; the version's files stay.

    GET /v1/tunelab/datasets                         newest first: id, created_at, counts, splits, source, files
    GET /v1/tunelab/datasets/{id}                    + manifest, data card (markdown), profile
    GET /v1/tunelab/datasets/{id}/rejects            file, line, reason; ?reason= substring, offset, limit
    GET /v1/tunelab/datasets/{id}/records?split=     a page of records
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at definition time.
import json
import time
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

from tunelab.platform.store import Store, new_id
from tunelab.workspace import Workspace, sha256_file

SPLITS = ("train", "validation", "test")
PURPOSE = "tunelab-dataset"


def version_dir(ws: Workspace, dataset_id: str) -> Path:
    return ws.root / "datasets" / dataset_id


def register(ws: Workspace, store: Store, project: str, dataset_id: str, source_kind: str, source_id: str) -> dict:
    """Make a prepared version one of ``project``'s datasets (its splits get file ids); returns the link row.
    Registering a version the project already has changes nothing (the first source is kept)."""
    have = store.get_dataset(dataset_id, project)
    if have is not None:
        return have
    d = version_dir(ws, dataset_id)
    manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    kind = next(iter(manifest.get("kinds") or {"": 0}), None) or None
    files = {}
    for split in SPLITS:
        path = d / f"{split}.jsonl"
        n = (manifest.get("splits") or {}).get(split, 0)
        if not n or not path.is_file():
            continue
        fid = new_id("file")
        store.add_file(id=fid, project=project, filename=f"{dataset_id}/{split}.jsonl", purpose=PURPOSE,
                       bytes=path.stat().st_size, path=str(path), records=n, kind=kind, sha256=sha256_file(path),
                       created_at=time.time())
        files[split] = fid
    store.link_dataset(project=project, id=dataset_id, source_kind=source_kind, source_id=source_id, files=files)
    return store.get_dataset(dataset_id, project)


def _manifest(ws: Workspace, dataset_id: str) -> dict:
    p = version_dir(ws, dataset_id) / "manifest.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def summary(ws: Workspace, row: dict) -> dict:
    m = _manifest(ws, row["id"])
    return {"id": row["id"], "object": "tunelab.dataset", "name": m.get("name"), "created_at": int(row["created_at"]),
            "prepared_at": m.get("created_at"), "counts": m.get("counts"), "splits": m.get("splits"),
            "kinds": m.get("kinds"), "source": {"kind": row["source_kind"], "id": row["source_id"]},
            "files": row["files"], "missing": not m}


def reject_kind(r: dict) -> str:
    """What a reject counts under: the reader's kind of problem, or the step and its reason."""
    if r.get("kind"):
        return str(r["kind"])
    return f"{r.get('stage') or 'step'}: {r.get('reason')}"


def routes(api, P, need, APIError) -> None:
    from fastapi import Query

    ws, store = P.ws, P.store

    def get(dataset_id: str, p) -> dict:
        row = store.get_dataset(dataset_id, p.project)
        if row is None:
            raise APIError(404, f"no dataset '{dataset_id}' in this project", param="dataset_id",
                           code="dataset_not_found")
        return row

    @api.get("/v1/tunelab/datasets")
    async def list_datasets(limit: int = Query(100, ge=1, le=1000), after: Optional[str] = Query(None, max_length=200),
                            p=need("read")):
        rows = store.list_datasets(p.project)
        ids = [r["id"] for r in rows]
        if after:  # a cursor: the id of the last dataset of the previous page
            rows = rows[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": [summary(ws, r) for r in rows[:limit]], "has_more": len(rows) > limit}

    @api.get("/v1/tunelab/datasets/{dataset_id}")
    async def retrieve_dataset(dataset_id: str, p=need("read")):
        row = get(dataset_id, p)
        d = version_dir(ws, dataset_id)
        out = summary(ws, row)
        manifest = _manifest(ws, dataset_id)
        manifest.pop("path", None)  # a server path
        card = d / "datacard.md"
        prof = d / "profile.json"
        out.update(manifest=manifest, datacard=card.read_text(encoding="utf-8") if card.is_file() else None,
                   profile=json.loads(prof.read_text(encoding="utf-8")) if prof.is_file() else None)
        return out

    @api.get("/v1/tunelab/datasets/{dataset_id}/rejects")
    async def dataset_rejects(dataset_id: str, offset: int = Query(0, ge=0, le=2 ** 31),
                              limit: int = Query(50, ge=1, le=1000),
                              reason: Optional[str] = Query(None, max_length=500, description="substring of the reason"),
                              p=need("read")):
        get(dataset_id, p)
        path = version_dir(ws, dataset_id) / "rejects.jsonl"
        by_kind, shown, total, matched = Counter(), [], 0, 0
        needle = reason.lower() if reason else None
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(r, dict):
                        continue
                    total += 1
                    k = reject_kind(r)
                    by_kind[k] += 1
                    text = f"{r.get('reason')} {k} {r.get('detail') or ''}".lower()
                    if needle and needle not in text:
                        continue
                    if offset <= matched < offset + limit:
                        shown.append({"file": r.get("file"), "line": r.get("line"), "reason": r.get("reason"),
                                      "kind": k, "stage": r.get("stage"), "detail": r.get("detail")})
                    matched += 1
        return {"object": "list", "data": shown, "offset": offset, "limit": limit, "total": total,
                "matched": matched, "has_more": offset + limit < matched,
                "by_kind": [{"kind": k, "count": n} for k, n in by_kind.most_common()]}

    @api.get("/v1/tunelab/datasets/{dataset_id}/records")
    async def dataset_records(dataset_id: str, split: Literal["train", "validation", "test"] = "train",
                              offset: int = Query(0, ge=0, le=2 ** 31), limit: int = Query(20, ge=1, le=200),
                              p=need("read")):
        get(dataset_id, p)
        path = version_dir(ws, dataset_id) / f"{split}.jsonl"
        out, n = [], 0
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip():
                        continue
                    if offset <= n < offset + limit:
                        try:
                            out.append(json.loads(line))
                        except ValueError:
                            out.append({"unreadable": line[:200]})
                    n += 1
                    if n >= offset + limit:  # a page reads no further than it shows
                        break
        total = (_manifest(ws, dataset_id).get("splits") or {}).get(split, n)
        return {"object": "list", "split": split, "data": out, "offset": offset, "limit": limit, "total": total,
                "has_more": offset + limit < total}
