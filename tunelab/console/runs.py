"""Runs and models: the project's runs, and a run's page with its summary, its curves (every logged point) and
its lineage drawn as a graph (raw files → dataset version → run → exports → the endpoint name that serves it).

The graph is an SVG written here on the server (boxes in columns, arrows between them; each box a link to its
page): a few rectangles and paths need no graph library in the browser, and the page stays complete without
JavaScript.
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from markupsafe import Markup, escape

from tunelab.console.jobs import chart_spec
from tunelab.console.web import ApiProblem, Console

NAV = [("Runs", "/console/runs", "read")]
# the figures a run's list row shows first (what the recipes record in the catalog), then any other number
FIRST = ("best_eval_loss", "final_train_loss", "test_accuracy", "implicit_reward_accuracy",
         "domain_perplexity_after", "heldout_perplexity_after", "rougeL_retained")
TYPE_LABEL = {"file": "raw file", "dataset": "dataset version", "base_model": "base model", "run": "run",
              "export": "export", "evaluation": "evaluation", "endpoint": "endpoint (model name)"}
BOX_W, BOX_H, COL_GAP, ROW_GAP, PAD = 190, 56, 44, 18, 12


def key_metrics(metrics: dict, n: int = 3) -> list[tuple[str, float]]:
    nums = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in FIRST if k in nums] + [k for k in nums if k not in FIRST]
    return [(k, nums[k]) for k in keys[:n]]


def node_href(n: dict) -> Optional[str]:
    t = n["type"]
    if t == "file" and n.get("file_id"):
        return f"/v1/files/{quote(n['file_id'])}/content"
    if t == "dataset":
        return f"/console/datasets/{quote(n['dataset_id'])}"
    if t == "base_model":
        return f"/console/playground?a={quote(n['model'], safe='')}"
    if t == "run" and n.get("run_id"):
        return f"/console/runs/{quote(n['run_id'])}"
    if t == "export":
        return f"/console/jobs/{quote(n['job_id'])}" if n.get("job_id") else f"/console/runs/{quote(n['run_id'])}#exports"
    if t == "evaluation":
        return f"/console/evaluations/{quote(n['run_id'])}"
    if t == "endpoint":
        return f"/console/playground?b={quote(n['model'], safe='')}"
    return None


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def lineage_svg(graph: dict) -> Markup:
    """The lineage graph as an SVG: one column per stage (empty stages closed up), one box per node, a curved
    arrow per edge. Every label is escaped; boxes with a page are links (focusable, so the keyboard reaches them)."""
    nodes = graph["nodes"]
    if not nodes:
        return Markup("")
    cols = sorted({n["column"] for n in nodes})
    place = {}
    heights = []
    for ci, c in enumerate(cols):
        members = [n for n in nodes if n["column"] == c]
        heights.append(len(members))
        for ri, n in enumerate(members):
            place[n["id"]] = (PAD + ci * (BOX_W + COL_GAP), PAD + ri * (BOX_H + ROW_GAP))
    width = PAD * 2 + len(cols) * BOX_W + (len(cols) - 1) * COL_GAP
    height = PAD * 2 + max(heights) * BOX_H + (max(heights) - 1) * ROW_GAP
    out = [f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="group" aria-label="lineage of run {escape(graph["run_id"])}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>']
    for e in graph["edges"]:
        if e["from"] not in place or e["to"] not in place:
            continue
        (x1, y1), (x2, y2) = place[e["from"]], place[e["to"]]
        x1, y1, x2, y2 = x1 + BOX_W, y1 + BOX_H / 2, x2, y2 + BOX_H / 2
        mid = (x1 + x2) / 2
        out.append(f'<path class="edge" d="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2 - 2},{y2}" marker-end="url(#arrow)">'
                   f'<title>{escape(e.get("label") or "")}</title></path>')
    for n in nodes:
        x, y = place[n["id"]]
        label = str(n["label"])
        box = (f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" class="node {escape(n["type"])}"/>'
               f'<text x="{x + 10}" y="{y + 20}" class="ntype">{escape(TYPE_LABEL.get(n["type"], n["type"]))}</text>'
               f'<text x="{x + 10}" y="{y + 40}" class="nlabel">{escape(_short(label))}</text>')
        title = f"<title>{escape(TYPE_LABEL.get(n['type'], n['type']))}: {escape(label)}</title>"
        href = node_href(n)
        attrs = f'data-node="{escape(n["id"])}" data-type="{escape(n["type"])}"'
        if href:
            out.append(f'<a href="{escape(href)}" {attrs} aria-label="{escape(TYPE_LABEL.get(n["type"], n["type"]))}: '
                       f'{escape(label)}">{title}{box}</a>')
        else:
            out.append(f'<g {attrs}>{title}{box}</g>')
    out.append("</svg>")
    return Markup("".join(out))


def routes(router: APIRouter, c: Console) -> None:
    api = c.api

    @router.get("/runs")
    async def runs(request: Request, kind: Optional[str] = None):
        if not c.can(request, "read"):
            return c.refused(request, "read")
        try:
            rows = (await api.get(request, "/v1/tunelab/runs", limit=1000, kind=kind or None))["data"]
        except ApiProblem as e:
            return c.problem(request, e)
        return c.page(request, "runs.html", title="Runs and models", runs=rows, kind=kind, key_metrics=key_metrics)

    @router.get("/runs/{run_id}")
    async def run_page(request: Request, run_id: str):
        if not c.can(request, "read"):
            return c.refused(request, "read")
        try:
            run = await api.get(request, f"/v1/tunelab/runs/{quote(run_id)}")
            rows = (await api.get(request, f"/v1/tunelab/runs/{quote(run['id'])}/metrics"))["data"]
            graph = await api.get(request, f"/v1/tunelab/runs/{quote(run['id'])}/lineage")
        except ApiProblem as e:
            return c.problem(request, e)
        return c.page(request, "run.html", title=f"Run {run['id']}", run=run, chart=chart_spec(rows),
                      graph=graph, svg=lineage_svg(graph), node_href=node_href, type_label=TYPE_LABEL,
                      key_metrics=key_metrics)

    @router.post("/runs/{run_id}/export")
    async def export(request: Request, run_id: str):
        if not c.can(request, "write"):
            return c.refused(request, "write")
        try:
            job = await api.post(request, "/v1/tunelab/jobs", {"command": "export", "run": run_id})
        except ApiProblem as e:
            return c.problem(request, e, "Could not start the export")
        return RedirectResponse(f"/console/jobs/{job['id']}", status_code=303)
