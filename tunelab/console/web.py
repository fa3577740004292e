"""The console's frame: sign-in, the in-process API client, page rendering, navigation by role.

A screen is a module of this package with ``NAV`` (its entries in the navigation bar: label, path,
the permission that shows it) and ``routes(router, console)``; ``SCREENS`` lists them in menu order.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from tunelab.platform import auth as A

HERE = Path(__file__).parent
PREFIX = "/console"
# a key is kept in the browser for a working day at most; sign in again after that
SESSION_MAX_AGE_S = 12 * 3600
# pages run only this server's scripts (no inline script, no eval: htmx's allowEval is off) and cannot be framed
HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff", "referrer-policy": "same-origin",
           "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                      "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                                      "form-action 'self'; base-uri 'none'"}


class ApiProblem(Exception):
    """An API answer that is not a success: its status, the message and, for a recipe, every problem."""

    def __init__(self, status: int, body: Any):
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.message = err.get("message") or (body if isinstance(body, str) else f"HTTP {status}")
        self.param = err.get("param")
        self.problems = err.get("problems") or []
        super().__init__(self.message)


class Api:
    """Calls the platform's HTTP API in-process (an ASGI transport: no socket) as the signed-in key."""

    def __init__(self, gate):
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://console.internal",
                                         timeout=120)

    @staticmethod
    def key_of(request: Request) -> Optional[str]:
        return A.key_from_headers(request.headers) or request.cookies.get(A.SESSION_COOKIE)

    async def call(self, request: Request, method: str, path: str, **kw) -> httpx.Response:
        key = self.key_of(request)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await self._client.request(method, path, headers=headers, **kw)

    async def json(self, request: Request, method: str, path: str, **kw) -> Any:
        """The answer's JSON; an ApiProblem for a 4xx/5xx."""
        r = await self.call(request, method, path, **kw)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise ApiProblem(r.status_code, body)
        return body

    async def get(self, request: Request, path: str, **params) -> Any:
        return await self.json(request, "GET", path, params={k: v for k, v in params.items() if v is not None})

    async def post(self, request: Request, path: str, body: Any = None, **kw) -> Any:
        return await self.json(request, "POST", path, json=body, **kw)


@dataclass
class NavItem:
    label: str
    href: str
    permission: Optional[str]  # None: every role


def iso(ts: Optional[float]) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat() if ts else ""


def utc_text(ts: Optional[float]) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ts else "—"


class Console:
    """What every screen uses: the API client, templates, and ``page`` (a full page, or the fragment htmx asked for)."""

    def __init__(self, gate, screens: list):
        self.gate = gate
        self.platform = gate.platform
        self.api = Api(gate)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.globals.update(iso=iso, utc_text=utc_text)
        env.filters["time"] = _time_tag
        self.nav = [NavItem(*n) for s in screens for n in getattr(s, "NAV", ())]

    def principal(self, request: Request) -> A.Principal:
        return request.state.principal

    def can(self, request: Request, permission: Optional[str]) -> bool:
        return permission is None or self.principal(request).can(permission)

    def page(self, request: Request, template: str, status_code: int = 200, **ctx) -> HTMLResponse:
        p = self.principal(request)
        path = request.url.path
        nav = [dict(label=n.label, href=n.href,
                    active=path == n.href or (n.href != PREFIX + "/" and path.startswith(n.href)))
               for n in self.nav if self.can(request, n.permission)]
        ctx.update(request=request, principal=p, nav=nav, open_mode=p.key_id is None,
                   can=lambda perm: self.can(request, perm), htmx=request.headers.get("hx-request") == "true")
        return self.templates.TemplateResponse(request, template, ctx, status_code=status_code, headers=HEADERS)

    def refused(self, request: Request, permission: str) -> HTMLResponse:
        p = self.principal(request)
        return self.page(request, "message.html", 403, title="Not allowed",
                         message=f"Your role ({p.role}) may not do this (it needs '{permission}').")

    def problem(self, request: Request, e: ApiProblem, title: str = "Something went wrong") -> HTMLResponse:
        if e.status == 404:
            title = "Not found"
        return self.page(request, "message.html", e.status, title=title, message=e.message)


def _time_tag(ts: Optional[float]) -> str:
    """A <time> element: the server writes UTC; the page's script rewrites it in the reader's locale and zone."""
    from markupsafe import Markup, escape

    if not ts:
        return Markup("—")
    return Markup(f'<time datetime="{escape(iso(ts))}">{escape(utc_text(ts))}</time>')


def safe_next(target: Optional[str]) -> str:
    """Where to go after signing in: a console path on this server only (never another site)."""
    if target and target.startswith(PREFIX) and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return PREFIX + "/"


def mount(gate, screens: list) -> Console:
    """Add the console's routes and static files to the platform's app; ``screens`` in menu order."""
    P = gate.platform
    P.public_prefixes = tuple(P.public_prefixes) + (PREFIX + "/static/", PREFIX + "/login")
    P.public_paths = tuple(P.public_paths) + ("/",)  # a redirect to the console
    P.login_redirects = {**P.login_redirects, PREFIX: PREFIX + "/login"}
    c = Console(gate, screens)
    api = gate.app
    api.mount(PREFIX + "/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    @router.get("/login")
    async def login_form(request: Request, next: Optional[str] = None, error: Optional[str] = None):
        if P.auth.open_mode():
            return RedirectResponse(safe_next(next), status_code=303)
        return c.templates.TemplateResponse(request, "login.html", {"next": safe_next(next), "error": error},
                                            status_code=401 if error else 200, headers=HEADERS)

    @router.post("/login")
    async def login(request: Request):
        import asyncio

        form = await request.form()
        key = str(form.get("key") or "").strip()
        nxt = safe_next(str(form.get("next") or ""))
        if not A.same_origin(request.headers):
            return Response("cross-site sign-in refused", status_code=403)
        principal = await asyncio.to_thread(P.auth.authenticate, key)
        if principal is None or principal.key_id is None:
            return c.templates.TemplateResponse(request, "login.html", {"next": nxt, "error": "That key is not valid "
                                                "(wrong, revoked, or mistyped)."}, status_code=401)
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(A.SESSION_COOKIE, key, max_age=SESSION_MAX_AGE_S, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
        return resp

    @router.post("/logout")
    async def logout(request: Request):
        resp = RedirectResponse(PREFIX + "/login", status_code=303)
        resp.delete_cookie(A.SESSION_COOKIE, path="/")
        return resp

    for s in screens:
        s.routes(router, c)
    api.include_router(router)

    @api.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse(PREFIX + "/", status_code=307)

    return c
