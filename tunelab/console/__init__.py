"""The web console: the platform in a browser (docs/console.md).

Server-rendered pages (Jinja2) made live with htmx (fragments swapped in place) and server-sent events
(a running job's curve and log), charts drawn by uPlot. htmx and uPlot are vendored in ``static/``
(licences in ``static/THIRD_PARTY_LICENSES.txt``): nothing is built at install and nothing is
fetched from a CDN, so the console works offline.

The console is a client of the platform's own HTTP API: every page reads and every button changes
state through an in-process call to ``/v1/...`` (:class:`tunelab.console.web.Api`) with the signed-in
key, so a page can do exactly what that key's role may do through the API (same validation, same
errors, same project scoping, same audit log). Pages hide what the role may not do; the API refuses it
anyway.

``create_app(ws, settings)`` is the platform app with the console mounted at ``/console``; ``tunelab
server`` serves it.
"""

from __future__ import annotations

from typing import Optional

from tunelab.platform.app import create_app as platform_app
from tunelab.platform.settings import PlatformSettings
from tunelab.workspace import Workspace


def create_app(ws: Workspace, settings: Optional[PlatformSettings] = None):
    """The platform's app (tunelab.platform.app.create_app) with the console's pages added."""
    from tunelab.console import admin, datasets, evaluations, feedback, home, jobs, playground, runs
    from tunelab.console.web import mount

    gate = platform_app(ws, settings)
    # the screens in menu order: each is a module of this package with NAV and routes(router, console)
    gate.console = mount(gate, [home, datasets, jobs, runs, evaluations, playground, feedback, admin])
    return gate
