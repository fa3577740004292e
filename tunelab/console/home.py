"""The overview: what is running, what finished lately, and where to start."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tunelab.console.web import ApiProblem, Console

NAV = [("Overview", "/console/", None)]


def routes(router: APIRouter, c: Console) -> None:
    @router.get("/")
    async def home(request: Request):
        jobs, files, models = [], [], []
        if c.can(request, "read"):
            try:
                jobs = (await c.api.get(request, "/v1/tunelab/jobs", limit=100))["data"]
                files = (await c.api.get(request, "/v1/files", limit=1000))["data"]
                models = (await c.api.get(request, "/v1/models"))["data"]
            except ApiProblem as e:
                return c.problem(request, e)
        counts: dict[str, int] = {}
        for j in jobs:
            counts[j["status"]] = counts.get(j["status"], 0) + 1
        return c.page(request, "home.html", title="Overview", jobs=jobs[:10], counts=counts, files=files,
                      models=models)
