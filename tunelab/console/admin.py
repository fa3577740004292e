"""Admin: API keys (create, shown once; revoke) and the audit log. Admins only."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from tunelab.console.web import ApiProblem, Console
from tunelab.platform.auth import ROLES

NAV = [("Admin", "/console/admin", "admin")]


def routes(router: APIRouter, c: Console) -> None:
    async def render(request: Request, new_key: Optional[dict] = None, error: Optional[str] = None,
                     status_code: int = 200):
        keys = (await c.api.get(request, "/v1/tunelab/admin/keys"))["data"]
        audit = (await c.api.get(request, "/v1/tunelab/admin/audit", limit=200))["data"]
        return c.page(request, "admin.html", status_code, title="Admin", keys=keys, audit=audit, roles=ROLES,
                      new_key=new_key, error=error)

    @router.get("/admin")
    async def admin(request: Request):
        if not c.can(request, "admin"):
            return c.refused(request, "admin")
        return await render(request)

    @router.post("/admin/keys")
    async def create_key(request: Request):
        if not c.can(request, "admin"):
            return c.refused(request, "admin")
        form = await request.form()
        body = {"role": str(form.get("role") or ""), "project": str(form.get("project") or "default").strip(),
                "name": str(form.get("name") or "").strip() or None}
        try:
            new_key = await c.api.post(request, "/v1/tunelab/admin/keys", body)
        except ApiProblem as e:
            return await render(request, error=e.message, status_code=e.status)
        return await render(request, new_key=new_key)

    @router.post("/admin/keys/{key_id}/revoke")
    async def revoke(request: Request, key_id: str):
        if not c.can(request, "admin"):
            return c.refused(request, "admin")
        try:
            await c.api.json(request, "DELETE", f"/v1/tunelab/admin/keys/{key_id}")
        except ApiProblem as e:
            return await render(request, error=e.message, status_code=e.status)
        return RedirectResponse("/console/admin", status_code=303)
