"""The console in a real browser (Debian's chromium through Playwright): every screen renders without a console
error, a job created from the form runs to completion while its curve gains points (and survives a reload),
a live page grows by only what is new, a viewer cannot start a job, the pages work on a narrow window, by keyboard, and in the reader's locale."""

from __future__ import annotations

import re
import time

import pytest

from tests.console.conftest import write_chat_data


def _upload(srv, path):
    with open(path, "rb") as f:
        return srv.client().files.create(file=f, purpose="fine-tune")


SCREENS = [("overview", "/console/"), ("jobs", "/console/jobs"), ("job-new-form", "/console/jobs/new"),
           ("job-new-yaml", "/console/jobs/new?tab=yaml"), ("admin", "/console/admin")]


def test_every_screen_renders_without_errors(console_server, tab_factory):
    srv = console_server(worker=False)
    t = tab_factory()
    for name, path in SCREENS:
        resp = t.goto(srv.url + path)
        assert resp.status == 200, (path, resp.status)
        assert t.page.locator("main h1").count() == 1, path
        t.shot(name)
    # the recipe selector rebuilds the form for that recipe and keeps what was typed
    t.goto(srv.url + "/console/jobs/new")
    t.page.fill("#f-model", "my-model")
    t.page.select_option("#f-recipe", "classify")
    t.page.wait_for_selector("#f-text_field")
    assert t.page.input_value("#f-model") == "my-model"
    assert "linear_probe" in t.page.inner_text("#f-method")
    # empty states say what to do next
    t.goto(srv.url + "/console/jobs")
    assert "No jobs yet" in t.page.inner_text("main") and t.page.locator("main a[href='/console/jobs/new']").count()


def test_job_from_the_form_runs_while_its_curve_gains_points(console_server, tab_factory, tiny_model, tmp_path):
    srv = console_server()
    f = _upload(srv, write_chat_data(tmp_path / "chats.jsonl", 48))
    t = tab_factory()
    page = t.page
    t.goto(srv.url + "/console/jobs/new")
    page.fill("#f-model", str(tiny_model))
    page.select_option("#f-train_file", f.id)
    page.fill("#f-batch_size", "2")
    page.fill("#f-max_steps", "120")
    page.fill("#f-learning_rate", "abc")  # a bad value: the API's validation answers inline, as you type
    page.wait_for_selector("#problems .problems a[href='#f-learning_rate']")
    page.fill("#f-learning_rate", "1e-3")
    page.wait_for_selector("#problems .problems.ok")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r".*/console/jobs/job-[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    t.shot("job-running")
    # the curve gains points while the job runs: several distinct counts seen before it ends
    seen, deadline = [], time.time() + 240
    while time.time() < deadline:
        state = srv.store.get_job(job_id)["status"]
        try:
            n = int(page.inner_text("[data-points]", timeout=2000))
        except Exception:  # the page reloads itself when the job ends
            n = None
        if n is not None and (not seen or n != seen[-1]):
            seen.append(n)
        if state in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.3)
    job = srv.wait(job_id)
    assert job["status"] == "succeeded", job
    assert len([n for n in seen if n > 0]) >= 2, f"the curve did not grow while the job ran: {seen}"
    # state and curve survive a reload: every logged step is drawn
    steps = {r["step"] for r in _metrics(srv, job_id) if "loss" in r or "eval_loss" in r}
    page.reload()
    page.wait_for_selector("#job-state.succeeded")
    assert int(page.inner_text("[data-points]")) == len(steps) == 120
    assert page.evaluate("() => document.querySelectorAll('.u-legend .u-series').length") == 3  # step, train, valid
    drawn = page.evaluate("() => document.querySelector('.chart .u-over') !== null")
    assert drawn
    t.shot("job-succeeded")
    # the queue lists it with its state
    t.goto(srv.url + "/console/jobs")
    assert page.locator(f"a[href='/console/jobs/{job_id}']").count() == 1
    assert "succeeded" in page.inner_text("#job-rows")


def _metrics(srv, job_id):
    import json

    run = srv.store.get_job(job_id)["run_id"]
    p = srv.ws.runs_dir / run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def test_live_page_appends_new_rows_and_log_lines(console_server, tab_factory):
    """The stream sends only what is new: the page's curve and log grow by what was appended (the log keeps what it
    showed), and the page reloads to the whole result when the job ends."""
    import json

    srv = console_server(worker=False)
    srv.store.add_job(id="job-live", project="default", api="native", command="train", spec={},
                      recipe_yaml="recipe: sft\n", run_id="sft-live", created_by=None)
    srv.store.set_job("job-live", status="running")
    metrics = srv.ws.runs_dir / "sft-live" / "metrics.jsonl"
    log = srv.ws.root / "platform" / "jobs" / "job-live" / "log.txt"
    metrics.parent.mkdir(parents=True)
    log.parent.mkdir(parents=True)

    def append(path, text):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)

    def rows(steps):
        return "".join(json.dumps({"step": s, "loss": 2.0 - s / 100}) + "\n" for s in steps)

    append(metrics, rows(range(1, 51)))
    t = tab_factory()
    page = t.page
    t.goto(srv.url + "/console/jobs/job-live")
    assert page.inner_text("[data-points]") == "50" and page.text_content("#job-log") == "(nothing logged yet)"
    append(log, "first line\n")
    page.wait_for_function("() => document.getElementById('job-log').textContent === 'first line\\n'", timeout=15000)
    append(metrics, rows([51, 52, 53]))
    append(log, "second line\n")
    page.wait_for_function("() => document.querySelector('[data-points]').textContent === '53'", timeout=15000)
    page.wait_for_function("() => document.getElementById('job-log').textContent.includes('second line')",
                           timeout=15000)
    assert page.text_content("#job-log") == "first line\nsecond line\n"
    srv.store.set_job("job-live", status="succeeded")
    page.wait_for_selector("#job-live", state="detached", timeout=15000)  # reloaded: no longer live
    page.wait_for_load_state("load")
    assert "succeeded" in page.inner_text("#job-state") and page.inner_text("[data-points]") == "53"


def test_viewer_cannot_start_a_job(console_server, tab_factory):
    from tunelab.platform.auth import create_key

    srv = console_server(worker=False)
    create_key(srv.store, "admin")
    _, viewer = create_key(srv.store, "viewer")
    t = tab_factory()
    page = t.page
    t.goto(srv.url + "/console/jobs")  # no key yet: the sign-in page
    assert "/console/login" in page.url
    page.fill("#key", "tlk-000000000000-wrongwrongwrongwrongwrong")
    page.click("button[type=submit]")
    assert "not valid" in page.inner_text("#key-error")
    page.fill("#key", viewer)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/console/jobs$"))
    assert "viewer" in page.inner_text(".who")
    assert page.locator("a[href='/console/jobs/new']").count() == 0  # hidden
    assert page.locator("nav a[href='/console/admin']").count() == 0
    resp = page.goto(srv.url + "/console/jobs/new")
    assert resp.status == 403 and "may not" in page.inner_text("main")
    # refused by the server too, not only hidden: a POST from the page itself
    status = page.evaluate("""async () => (await fetch('/console/jobs', {method: 'POST',
        body: new URLSearchParams({tab: 'yaml', yaml: 'recipe: sft'})})).status""")
    assert status == 403
    status = page.evaluate("""async () => (await fetch('/v1/tunelab/jobs', {method: 'POST',
        headers: {'content-type': 'application/json'}, body: JSON.stringify({recipe: 'recipe: sft'})})).status""")
    assert status == 403
    assert srv.store.list_jobs("default", limit=10) == []
    t.errors.clear()  # the two refusals above are logged by the browser as failed requests, as they should be


def test_narrow_window_keyboard_and_locale(console_server, tab_factory):
    srv = console_server(worker=False)
    srv.store.add_job(id="job-0123456789abcdef01234567", project="default", api="native", command="train",
                      spec={}, recipe_yaml="recipe: sft\n", run_id=None, created_by=None)
    t = tab_factory(width=390, height=800, locale="de-DE", timezone_id="Europe/Berlin")
    page = t.page
    t.goto(srv.url + "/console/jobs")
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a 390px window"
    t.shot("jobs-narrow")
    # times are shown in the reader's locale (de-DE writes 6.12.2026, 12:00:00), the UTC text kept as the title
    tm = page.locator("#job-rows time").first
    assert re.match(r"\d{1,2}\.\d{1,2}\.\d{4}", tm.inner_text()), tm.inner_text()
    assert tm.get_attribute("title").endswith("UTC")
    # keyboard: the skip link comes first, then the navigation; "n" opens the new-job form
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip"
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.getAttribute('href')") == "/console/"
    page.keyboard.press("n")
    page.wait_for_url(re.compile(r".*/console/jobs/new$"))
