"""Runs and models, evaluations and the playground: the API (tunelab/platform/runs.py) and the console's screens
in a real browser, on ONE run made by real jobs (a data job, a training job reading its version, an export job)
and evaluated once, shared by every test of this module."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import write_color_data
from tests.console.conftest import Server

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")


def _h(key):
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model):
    """A server with keys of each role, and a run with its whole lineage: uploaded raw file → data job → dataset
    version → sft job → run → export job; the run evaluated (tunelab eval, in this process: no job start-up)."""
    from tunelab.console import create_app
    from tunelab.eval.run import evaluate_run
    from tunelab.platform.auth import create_key

    tmp = tmp_path_factory.mktemp("runs")
    srv = Server(tmp / "ws", app_factory=create_app)
    try:
        keys = {role: create_key(srv.store, role)[1] for role in ("admin", "trainer", "viewer", "labeler")}
        keys["other"] = create_key(srv.store, "trainer", "other")[1]
        admin = _h(keys["admin"])
        raw = write_color_data(tmp / "colors.jsonl", 80, seed=5)
        up = httpx.post(srv.url + "/v1/files", headers=admin, files={"file": ("colors.jsonl", raw.read_bytes())},
                        data={"purpose": "tunelab-data"}).json()
        data_job = httpx.post(srv.url + "/v1/tunelab/jobs", headers=admin, json={"recipe": {
            "recipe": "data", "name": "colors", "inputs": [{"path": up["id"]}], "profile": None, "workers": 0,
            "split": {"validation": 0.1, "test": 0.15}}}).json()
        job = srv.wait(data_job["id"], timeout=120)
        assert job["status"] == "succeeded", job["error"]
        (version,) = [p.parent for p in srv.ws.root.glob("datasets/*/manifest.json")]
        train = {"recipe": "sft", "name": "colors", "model": {"name": str(tiny_model)},
                 "data": {"train": str(version / "train.jsonl"), "validation": str(version / "validation.jsonl"),
                          "test": str(version / "test.jsonl"), "max_length": 64},
                 "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                 "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "eval_every": 6},
                 "eval": {"max_new_tokens": 6}}
        train_job = httpx.post(srv.url + "/v1/tunelab/jobs", headers=admin, json={"recipe": train}).json()
        assert "run_id" in train_job, train_job
        job = srv.wait(train_job["id"], timeout=180)
        assert job["status"] == "succeeded", job["error"]
        run_id = train_job["run_id"]
        export_job = httpx.post(srv.url + "/v1/tunelab/jobs", headers=admin,
                                json={"command": "export", "run": run_id}).json()
        evaluate_run(run_id, srv.ws, limit=8, business=False, forgetting=False, n_resamples=200)
        job = srv.wait(export_job["id"], timeout=120)
        assert job["status"] == "succeeded", job["error"]
        yield {"srv": srv, "keys": keys, "run": run_id, "file": up, "version": version, "train_job": train_job["id"],
               "export_job": export_job["id"], "data_job": data_job["id"]}
    finally:
        srv.close()


def _get(m, path, role="admin", **params):
    return httpx.get(m["srv"].url + path, headers=_h(m["keys"][role]), params=params, timeout=60)


# ------------------------------------------------------------------ the API


def test_runs_are_listed_and_scoped_to_their_project(made):
    m = made
    runs = _get(m, "/v1/tunelab/runs").json()["data"]
    assert [r["id"] for r in runs] == [m["run"]]
    r = runs[0]
    assert r["kind"] == "sft" and r["status"] == "completed" and r["evaluated"] and r["model"] == m["run"]
    assert r["job_id"] == m["train_job"] and isinstance(r["metrics"].get("final_train_loss"), float)
    one = _get(m, f"/v1/tunelab/runs/{m['run']}").json()
    assert one["summary"]["steps"] == 6 and one["exports"][0]["job_id"] == m["export_job"]
    rows = _get(m, f"/v1/tunelab/runs/{m['run']}/metrics").json()["data"]
    assert [x["step"] for x in rows if "loss" in x] == list(range(1, 7))
    # another project's key: the run does not exist for it
    assert _get(m, "/v1/tunelab/runs", "other").json()["data"] == []
    for path in (f"/v1/tunelab/runs/{m['run']}", f"/v1/tunelab/runs/{m['run']}/lineage",
                 f"/v1/tunelab/runs/{m['run']}/metrics", f"/v1/tunelab/evaluations/{m['run']}",
                 f"/v1/tunelab/runs/{m['run']}/evaluation/examples"):
        r = _get(m, path, "other")
        assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found", (path, r.text)
    assert _get(m, "/v1/tunelab/evaluations", "other").json()["data"] == []
    assert _get(m, "/v1/tunelab/runs", "labeler").status_code == 403
    assert _get(m, "/v1/tunelab/runs", "viewer").status_code == 200


def test_lineage_runs_from_the_raw_file_to_the_endpoint(made):
    m = made
    g = _get(m, f"/v1/tunelab/runs/{m['run']}/lineage").json()
    by_type = {}
    for n in g["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    manifest = json.loads((m["version"] / "manifest.json").read_text())
    (f,) = by_type["file"]
    assert f["file_id"] == m["file"]["id"] and f["label"] == "colors.jsonl"
    assert f["sha256"] == manifest["sources"][0]["sha256"]
    (ds,) = by_type["dataset"]
    assert ds["dataset_id"] == manifest["dataset_id"] == m["version"].name and ds["prepared"]
    (exp,) = by_type["export"]
    assert exp["job_id"] == m["export_job"]
    (ep,) = by_type["endpoint"]
    assert ep["model"] == m["run"]
    assert len(by_type["evaluation"]) == 1 and len(by_type["base_model"]) == 1
    edges = {(e["from"], e["to"]) for e in g["edges"]}
    run = f"run:{m['run']}"
    assert {(f["id"], ds["id"]), (ds["id"], run), (run, exp["id"]), (run, ep["id"])} <= edges
    assert [n["column"] for n in (f, ds, by_type["run"][0], exp, ep)] == [0, 1, 2, 3, 4]


def test_evaluation_table_and_examples(made):
    m = made
    ev = _get(m, f"/v1/tunelab/evaluations/{m['run']}").json()
    assert ev["models"] == ["base", "tuned"] and ev["baseline"] == "base"
    rows = {r["metric"]: r for r in ev["tasks"]["heldout"]["rows"]}
    res = json.loads((m["srv"].ws.runs_dir / m["run"] / "eval" / "metrics.json").read_text())
    rl = rows["rougeL"]
    assert rl["values"]["tuned"]["value"] == res["models"]["tuned"]["rougeL"]
    assert [rl["values"]["base"]["ci_low"], rl["values"]["base"]["ci_high"]] == res["models"]["base"]["ci"]["rougeL"]
    d = rl["differences"]["tuned"]
    assert d["p_value_adjusted"] == res["differences"]["rougeL"]["p_value_adjusted"] and d["verdict"]
    assert _get(m, f"/v1/tunelab/runs/{m['run']}/evaluation").json() == ev
    # the examples: every one, side by side; the filters split them
    url = f"/v1/tunelab/evaluations/{m['run']}/examples"
    every = _get(m, url, limit=100).json()
    assert every["total"] == every["matched"] == 8 and len(every["data"]) == 8
    base = [json.loads(x) for x in (m["srv"].ws.runs_dir / m["run"] / "eval" / "base.jsonl").read_text().splitlines()]
    assert [x["outputs"]["base"]["text"] for x in every["data"]] == [b["prediction"] for b in base]
    differ = _get(m, url, filter="differ", limit=100).json()
    same = _get(m, url, filter="same", limit=100).json()
    assert differ["matched"] + same["matched"] == 8 and differ["matched"] == every["counts"]["differ"]
    assert all(x["outputs"]["base"]["text"] != x["outputs"]["tuned"]["text"] for x in differ["data"])
    wins = _get(m, url, filter="wins", model="tuned", limit=100).json()
    assert all(x["outputs"]["tuned"]["score"] > x["outputs"]["base"]["score"] for x in wins["data"])
    page = _get(m, url, limit=3, offset=3).json()
    assert [x["index"] for x in page["data"]] == [x["index"] for x in every["data"][3:6]] and page["has_more"]
    word = every["data"][0]["prompt"].split()[-1].strip("?.").lower()
    found = _get(m, url, q=word, limit=100).json()
    assert 0 < found["matched"] <= 8 and all(word in json.dumps(x).lower() for x in found["data"])
    assert _get(m, url, filter="wins").status_code == 400  # which model's wins?
    assert _get(m, url, filter="bogus").status_code == 400


@pytest.fixture(scope="module")
def compared(made, tmp_path_factory):
    """A comparison job of three models (the base, the run, and the run again under another name: greedy decoding
    must repeat itself) on two tasks. The job's process
    is the CLI's ``tunelab compare``; here its function runs in this process (no second start-up), writing where
    the job writes, under a job row of the project."""
    from tunelab.eval.compare import run_compare
    from tunelab.eval.suites import SuiteConfig
    from tunelab.platform import jobs as J
    from tunelab.platform.store import new_id

    srv, tmp = made["srv"], tmp_path_factory.mktemp("suite")
    rows = [json.loads(x) for x in write_color_data(tmp / "q.jsonl", 12, seed=9).read_text().splitlines()]
    (tmp / "gen.jsonl").write_text("".join(json.dumps({"prompt": r["instruction"], "reference": r["output"]}) + "\n"
                                           for r in rows))
    (tmp / "text.txt").write_text(" ".join(r["output"] for r in rows))
    cfg = SuiteConfig(name="colors", tasks=[
        {"name": "colors", "type": "generation", "data": str(tmp / "gen.jsonl"), "metrics": ["rougeL", "exact_match"]},
        {"name": "text", "type": "perplexity", "data": str(tmp / "text.txt"), "block_size": 16}],
        decoding={"max_new_tokens": 6}, bootstrap={"n_resamples": 200}, forgetting={"enabled": False})
    base = json.loads((srv.ws.runs_dir / made["run"] / "lineage.json").read_text())["base_model_path"]
    jid = new_id("job")
    srv.store.add_job(id=jid, project="default", api="native", command="compare", spec={"recipe": "suite"},
                      recipe_yaml="recipe: suite\n", run_id=None, created_by=None, status="succeeded")
    run_compare(cfg, srv.ws, models=[f"base={base}", f"tuned={made['run']}", f"again={made['run']}"],
                out=J.job_dir(srv.ws, jid) / "compare", business=False)
    return jid


def test_a_comparison_of_three_models(made, compared):
    m = made
    listed = {e["id"]: e for e in _get(m, "/v1/tunelab/evaluations").json()["data"]}
    assert listed[compared]["kind"] == "compare" and listed[compared]["models"] == ["base", "tuned", "again"]
    assert listed[m["run"]]["kind"] == "eval"
    ev = _get(m, f"/v1/tunelab/evaluations/{compared}").json()
    assert ev["baseline"] == "base" and list(ev["tasks"]) == ["colors", "text"]
    res = json.loads((m["srv"].ws.root / "platform" / "jobs" / compared / "compare" / "results.json").read_text())
    for task in ("colors", "text"):
        for row in ev["tasks"][task]["rows"]:
            k = row["metric"]
            for model in ("base", "tuned", "again"):
                assert row["values"][model]["value"] == res["scores"][model][task][k]["value"]
            assert set(row["differences"]) == {"tuned", "again"}
            d = res["differences"]["again"][task][k]
            assert row["differences"]["again"]["p_value_adjusted"] == d["p_value_adjusted"]
    ex = _get(m, f"/v1/tunelab/evaluations/{compared}/examples", task="colors", limit=100).json()
    assert ex["total"] == 12 and set(ex["data"][0]["outputs"]) == {"base", "tuned", "again"}
    # the same run twice, greedy: the same answers; the filters see it
    assert all(x["outputs"]["tuned"]["text"] == x["outputs"]["again"]["text"] for x in ex["data"])
    wins = _get(m, f"/v1/tunelab/evaluations/{compared}/examples", task="colors", filter="wins", model="again").json()
    assert wins["matched"] == 0  # never strictly above "tuned", its twin
    text = _get(m, f"/v1/tunelab/evaluations/{compared}/examples", task="text").json()
    assert text["data"] and "perplexity" in text["data"][0]["outputs"]["base"]["text"]
    assert _get(m, f"/v1/tunelab/evaluations/{compared}/examples", task="nope").status_code == 404
    assert _get(m, f"/v1/tunelab/evaluations/{compared}", "other").status_code == 404


# ------------------------------------------------------------------ the screens


def _tab(tab_factory, m, role="admin", **kw):
    from tunelab.platform.auth import SESSION_COOKIE

    t = tab_factory(**kw)
    t.context.add_cookies([{"name": SESSION_COOKIE, "value": m["keys"][role], "url": m["srv"].url}])
    return t


def test_runs_screens_and_the_lineage_graph(made, tab_factory):
    m = made
    url = m["srv"].url
    t = _tab(tab_factory, m)
    page = t.page
    assert t.goto(url + "/console/runs").status == 200
    assert page.locator(f"#runs a[href='/console/runs/{m['run']}']").count() == 1
    t.shot("runs")
    assert t.goto(url + f"/console/runs/{m['run']}").status == 200
    svg = page.locator("svg.lineage")
    types = svg.locator("[data-type]").evaluate_all("els => els.map(e => e.dataset.type)")
    assert sorted(types) == sorted(["file", "dataset", "base_model", "run", "export", "evaluation", "endpoint"])
    assert svg.locator("path.edge").count() == 6
    # each node links to its page
    assert svg.locator(f"a[data-type='export'][href='/console/jobs/{m['export_job']}']").count() == 1
    assert svg.locator(f"a[data-type='file'][href='/v1/files/{m['file']['id']}/content']").count() == 1
    assert svg.locator("a[data-type='endpoint'][href*='playground']").count() == 1
    assert int(page.inner_text("[data-points]")) == 6  # every training step drawn
    page.wait_for_selector(".chart .u-over")
    t.shot("run")
    # the evaluation node opens the evaluation
    svg.locator("a[data-type='evaluation']").click()
    page.wait_for_url(re.compile(rf".*/console/evaluations/{m['run']}$"))


def test_evaluation_browser_filters_the_rows(made, tab_factory):
    m = made
    url = m["srv"].url
    t = _tab(tab_factory, m)
    page = t.page
    assert t.goto(url + "/console/evaluations").status == 200
    assert page.locator(f"#evaluations a[href='/console/evaluations/{m['run']}']").count() == 1
    assert page.locator("#ev-run option").count() == 1  # a trainer/admin may start an evaluation job
    t.shot("evaluations")
    t.goto(url + f"/console/evaluations/{m['run']}")
    assert page.locator("table.metrics tbody tr").count() >= 5
    assert page.locator("table.examples tbody tr").count() == 8  # a page of 10, 8 examples
    t.shot("evaluation")
    ex = _get(m, f"/v1/tunelab/evaluations/{m['run']}/examples", filter="wins", model="base", limit=100).json()
    page.select_option("#ex-filter", "wins:base")
    page.wait_for_function(f"() => document.querySelector('[data-matched]').textContent === '{ex['matched']}'")
    assert page.locator("table.examples tbody tr").count() == min(ex["matched"], 10)
    # text search: a word of the first prompt keeps only the examples that mention it
    every = _get(m, f"/v1/tunelab/evaluations/{m['run']}/examples", limit=100).json()["data"]
    word = next(w for w in (x.strip("?.").lower() for x in every[0]["prompt"].split())
                if 0 < sum(w in json.dumps(e).lower() for e in every) < len(every))
    found = _get(m, f"/v1/tunelab/evaluations/{m['run']}/examples", q=word, limit=100).json()
    page.select_option("#ex-filter", "all")
    page.fill("#ex-q", word)
    page.wait_for_function(f"() => document.querySelector('[data-matched]').textContent === '{found['matched']}'")
    assert page.locator("table.examples tbody tr").count() == found["matched"] < 8
    page.fill("#ex-q", "zzzz-no-such-text")
    page.wait_for_selector("#examples .empty")
    assert page.locator("table.examples").count() == 0


def test_playground_answers_side_by_side(made, tab_factory):
    m = made
    url = m["srv"].url
    t = _tab(tab_factory, m, "viewer")  # a viewer may chat (infer) but not start jobs
    page = t.page
    assert t.goto(url + "/console/playground").status == 200
    assert page.input_value("#pg-b") == m["run"]
    assert page.input_value("#pg-a").endswith("model")  # the run's base: the tiny model's folder
    page.fill("#pg-prompt", "What color is the small cat?")
    page.fill("#pg-max", "6")
    page.press("#pg-prompt", "Control+Enter")
    page.wait_for_selector("#answers section[data-side='b'] pre.answer", timeout=60000)
    sides = page.locator("#answers section.side")
    assert sides.count() == 2
    texts = [sides.nth(i).locator("pre.answer").inner_text() for i in range(2)]
    assert all(texts)
    for i in range(2):
        assert int(sides.nth(i).locator("[data-completion-tokens]").inner_text()) >= 1
        assert sides.nth(i).locator("[data-latency]").inner_text().endswith(" s")
    # the two boxes are side by side at 1280 px
    a, b = (sides.nth(i).bounding_box() for i in range(2))
    assert abs(a["y"] - b["y"]) < 2 and b["x"] > a["x"] + a["width"] - 1
    t.shot("playground")
    # the right side is the run's adapter: the same answer the API gives for that model
    r = httpx.post(url + "/v1/chat/completions", headers=_h(m["keys"]["viewer"]), timeout=60, json={
        "model": m["run"], "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": "What color is the small cat?"}]}).json()
    assert texts[1] == (r["choices"][0]["message"]["content"] or "(empty answer)")
    # a viewer sees no job buttons on a run
    t.goto(url + f"/console/runs/{m['run']}")
    assert page.locator("form[action='/console/evaluations/start']").count() == 0
    t.goto(url + "/console/evaluations")
    assert page.locator("#ev-run").count() == 0


def test_roles_narrow_window_and_empty_states(made, tab_factory, console_server):
    m = made
    url = m["srv"].url
    t = _tab(tab_factory, m, "labeler")
    for path in ("/console/runs", f"/console/runs/{m['run']}", "/console/evaluations", "/console/playground"):
        assert t.goto(url + path).status == 403, path
    assert t.page.locator("nav a[href='/console/runs']").count() == 0
    t.errors.clear()  # the refusals are logged by the browser as failed loads, as they should be
    n = _tab(tab_factory, m, width=390, height=800)
    for path in ("/console/runs", f"/console/runs/{m['run']}", f"/console/evaluations/{m['run']}",
                 "/console/playground"):
        n.goto(url + path)
        overflow = n.page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than a 390px window"
        if path.startswith("/console/runs/"):
            n.shot("run-narrow")
    # a project with nothing yet: say what to do
    srv = console_server(worker=False)
    e = tab_factory()
    e.goto(srv.url + "/console/runs")
    assert "No runs yet" in e.page.inner_text("main")
    e.goto(srv.url + "/console/evaluations")
    assert "No evaluations yet" in e.page.inner_text("main")
    e.goto(srv.url + "/console/playground")
    assert e.page.locator("#no-tuned").count() == 1


def test_comparison_page_has_every_model_and_switches_tasks(made, compared, tab_factory):
    t = _tab(tab_factory, made)
    page = t.page
    assert t.goto(made["srv"].url + f"/console/evaluations/{compared}").status == 200
    heads = page.locator("table.metrics[data-task='colors'] thead th").all_inner_texts()
    assert heads[:4] == ["Metric", "base", "tuned", "again"] and "again − base" in heads
    assert page.locator("table.examples thead th").all_inner_texts()[-3:] == ["base", "tuned", "again"]
    assert page.locator("table.examples tbody tr").count() == 10 and "12 of 12" in page.inner_text("#ex-count")
    page.select_option("#ex-task", "text")
    page.wait_for_function("() => document.querySelector('table.examples tbody td.text:nth-child(4)')"
                           " && document.querySelector('table.examples tbody').innerText.includes('perplexity')")
    t.shot("evaluation-compare")
