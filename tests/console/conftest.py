"""A real browser against the console: Playwright for Python driving Debian's chromium.

Playwright cannot download its own browsers here, so the tests launch the system chromium
(``executable_path``; `.ci/run` installs Debian's package when it is missing). Without a browser or
without the playwright package the browser tests skip and say why.

Set ``TUNELAB_CONSOLE_SHOTS=DIR`` to save a screenshot of each screen (docs/console/ holds the committed ones).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.platform.conftest import JOB_ENV, Server, free_port, make_server, recipe_defaults, write_chat_data  # noqa: F401

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str | None:
    for cand in (os.environ.get("TUNELAB_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                 "/usr/bin/chromium"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture
def console_server(make_server):
    """A platform server (with its worker) serving the console, on a fresh workspace."""
    from tunelab.console import create_app

    def make(**kw) -> Server:
        return make_server(app_factory=create_app, **kw)

    return make


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium browser found (apt-get install chromium, or set TUNELAB_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """A browser page that records console errors and uncaught exceptions; the test fails on any."""

    def __init__(self, context):
        self.context = context
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

    def goto(self, url: str):
        resp = self.page.goto(url)
        self.page.wait_for_load_state("load")
        return resp

    def shot(self, name: str) -> None:
        out = os.environ.get("TUNELAB_CONSOLE_SHOTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(out) / f"{name}.png"), full_page=True)


def benign_aborts_removed(errors: list[str]) -> list[str]:
    """The browser's errors less one kind: htmx logs a request that the browser aborted because the page was left
    (a list's 3-second refresh in flight while the test navigates away) as two console errors, ``htmx:afterRequest``
    and ``htmx:sendAbort``. That is the browser leaving a page, not a page failing; every other message counts."""
    aborts = sum("htmx:sendAbort" in e for e in errors)
    out, dropped = [], 0
    for e in errors:
        if "htmx:sendAbort" in e or ("htmx:afterRequest" in e and dropped < aborts):
            dropped += "htmx:afterRequest" in e
            continue
        out.append(e)
    return out


@pytest.fixture
def tab_factory(browser):
    made = []

    def make(width: int = 1280, height: int = 800, **kw) -> Tab:
        ctx = browser.new_context(viewport={"width": width, "height": height}, **kw)
        t = Tab(ctx)
        made.append(t)
        return t

    yield make
    errors = [e for t in made for e in benign_aborts_removed(t.errors)]
    for t in made:
        t.context.close()
    assert not errors, "the browser reported errors:\n" + "\n".join(errors)
