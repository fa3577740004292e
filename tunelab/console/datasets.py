"""Datasets: the project's versions (list), upload a raw file and prepare it (a data job from a short form),
and a version's page: counts, length profile chart, labels, data card, the rejects browser (file:line:reason,
filtered by reason) and a preview of its records."""

from __future__ import annotations

import re
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from tunelab.console.web import ApiProblem, Console

NAV = [("Datasets", "/console/datasets", "read")]
SPLITS = ("train", "validation", "test")
PCTS = (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("max", 100))


def datacard_html(text: Optional[str]) -> str:
    """The data card's markdown as HTML (markdown-it, raw HTML in the card escaped, not rendered)."""
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    if not text:
        return Markup("")
    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    # the card's headings sit under the page's "Data card" heading (h2): its h1 becomes h3, and so on
    return Markup(re.sub(r"<(/?)h([1-6])>", lambda m: f"<{m.group(1)}h{min(6, int(m.group(2)) + 2)}>", html))


def length_chart(profile: Optional[dict]) -> Optional[dict]:
    """Length percentiles per split (p50 … max), every split one line: the profile's length distribution."""
    splits = (profile or {}).get("splits") or {}
    series = [s for s in SPLITS if isinstance(splits.get(s), dict) and splits[s].get("records")]
    if not series:
        return None
    rows = [{"pct": pct, **{s: splits[s].get(key) for s in series}} for key, pct in PCTS]
    return {"x": "pct", "xlabel": "percentile", "ylabel": f"length ({profile.get('unit') or 'words'})",
            "series": [{"key": s, "label": s} for s in series], "rows": rows, "height": 240}


def label_bars(manifest: dict) -> list[dict]:
    """Records per label over all splits, with the share of the largest (drawn as bars in HTML)."""
    totals: dict[str, int] = {}
    for counts in (manifest.get("labels") or {}).values():
        for label, n in counts.items():
            totals[label] = totals.get(label, 0) + n
    top = max(totals.values(), default=0)
    return [{"label": k, "n": v, "pct": round(100 * v / top) if top else 0}
            for k, v in sorted(totals.items(), key=lambda x: -x[1])]


def routes(router: APIRouter, c: Console) -> None:
    api = c.api

    async def uploads(request: Request) -> list[dict]:
        try:
            return [f for f in (await api.get(request, "/v1/files", limit=1000))["data"]
                    if f["purpose"] != "tunelab-dataset"]
        except ApiProblem:
            return []

    async def list_page(request: Request, error: Optional[str] = None, note: Optional[str] = None,
                        status_code: int = 200, form: Optional[dict] = None):
        data = (await api.get(request, "/v1/tunelab/datasets", limit=1000))["data"]
        return c.page(request, "datasets.html", status_code, title="Datasets", datasets=data,
                      files=await uploads(request), error=error, note=note, form=form or {})

    @router.get("/datasets")
    async def datasets(request: Request):
        if not c.can(request, "read"):
            return c.refused(request, "read")
        try:
            return await list_page(request)
        except ApiProblem as e:
            return c.problem(request, e)

    @router.post("/datasets/upload")
    async def upload(request: Request):
        if not c.can(request, "write"):
            return c.refused(request, "write")
        form = await request.form()
        f = form.get("file")
        if f is None or not getattr(f, "filename", None):
            return await list_page(request, error="Choose a file to upload.", status_code=400)
        content = await f.read()
        r = await api.call(request, "POST", "/v1/files", files={"file": (f.filename, content)},
                           data={"purpose": "tunelab-data"})
        if r.status_code >= 400:
            msg = ApiProblem(r.status_code, r.json() if r.headers.get("content-type", "").startswith(
                "application/json") else r.text).message
            return await list_page(request, error=f"Upload refused: {msg}", status_code=r.status_code)
        up = r.json()
        return await list_page(request, note=f"Uploaded {up['filename']} as {up['id']} ({up['records']} "
                                             f"{up['kind']} records). Prepare it below.", form={"file": up["id"]})

    @router.post("/datasets/prepare")
    async def prepare(request: Request):
        """A data job from the form: the uploaded file, a name, the split shares and the usual cleaning steps."""
        if not c.can(request, "write"):
            return c.refused(request, "write")
        f = {k: str(v) for k, v in (await request.form()).items()}
        steps = [{"kind": k} for k in ("normalize", "exact_dedup") if f.get(k)]
        try:
            val, test = float(f.get("validation") or 0.05), float(f.get("test") or 0.05)
        except ValueError:
            return await list_page(request, error="Validation and test shares are numbers such as 0.05.",
                                   status_code=400, form=f)
        recipe = {"recipe": "data", "name": (f.get("name") or "").strip() or "dataset",
                  "inputs": [{"path": f.get("file") or ""}], "steps": steps,
                  "split": {"validation": val, "test": test}}
        try:
            job = await api.post(request, "/v1/tunelab/jobs", {"recipe": recipe})
        except ApiProblem as e:
            problems = "; ".join(f"{p['loc']}: {p['msg']}" if isinstance(p, dict) else str(p)
                                 for p in e.problems) or e.message
            return await list_page(request, error=f"The data recipe was refused: {problems}", status_code=e.status,
                                   form=f)
        return RedirectResponse(f"/console/jobs/{job['id']}", status_code=303)

    @router.get("/datasets/{dataset_id}")
    async def dataset(request: Request, dataset_id: str):
        if not c.can(request, "read"):
            return c.refused(request, "read")
        try:
            d = await api.get(request, f"/v1/tunelab/datasets/{dataset_id}")
            rejects = await api.get(request, f"/v1/tunelab/datasets/{dataset_id}/rejects", limit=25)
            records = await api.get(request, f"/v1/tunelab/datasets/{dataset_id}/records", split="train", limit=10)
        except ApiProblem as e:
            return c.problem(request, e)
        return c.page(request, "dataset.html", title=f"Dataset {d.get('name') or dataset_id}", d=d,
                      card=datacard_html(d.get("datacard")), chart=length_chart(d.get("profile")),
                      labels=label_bars(d.get("manifest") or {}), rejects=rejects, reason="", records=records,
                      split="train", splits=SPLITS)

    @router.get("/datasets/{dataset_id}/rejects")
    async def rejects(request: Request, dataset_id: str, reason: str = "", offset: int = 0):
        try:
            r = await api.get(request, f"/v1/tunelab/datasets/{dataset_id}/rejects", reason=reason or None,
                              offset=max(0, offset), limit=25)
        except ApiProblem as e:
            return c.problem(request, e)
        return c.page(request, "dataset_rejects.html", d={"id": dataset_id}, rejects=r, reason=reason)

    @router.get("/datasets/{dataset_id}/records")
    async def records(request: Request, dataset_id: str, split: str = "train", offset: int = 0):
        try:
            r = await api.get(request, f"/v1/tunelab/datasets/{dataset_id}/records", split=split,
                              offset=max(0, offset), limit=10)
        except ApiProblem as e:
            return c.problem(request, e)
        return c.page(request, "dataset_records.html", d={"id": dataset_id}, records=r, split=split, splits=SPLITS)
