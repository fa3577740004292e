"""The native endpoint: any job recipe as YAML, validated like `tunelab validate` (422 with field paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, write_color_data


def _post(srv, body):
    import httpx2 as httpx

    return httpx.post(srv.url + "/v1/tunelab/jobs", json=body, timeout=60)


def test_recipe_errors_all_at_once_with_field_paths(make_server, tiny_model):
    srv = make_server(worker=False)
    bad = """
recipe: sft
model: {name: %s}
data: {train: x.jsonl, max_lenght: 64}
train: {learning_rate: -1, epochs: 1}
""" % tiny_model
    r = _post(srv, {"recipe": bad})
    assert r.status_code == 422
    err = r.json()["error"]
    locs = {p["loc"] for p in err["problems"]}
    assert {"data.max_lenght", "train.learning_rate"} <= locs
    assert "data.max_lenght: unknown key; did you mean 'max_length'?" in err["message"]
    assert err["message"].startswith("2 problem(s) in the recipe")
    r = _post(srv, {"recipe": "recipe: sft\nmodel: [unclosed"})
    assert r.status_code == 422 and "not valid YAML" in r.json()["error"]["message"]
    r = _post(srv, {"recipe": {"recipe": "nope"}})
    assert r.status_code == 422 and "'nope' cannot run as a job" in r.json()["error"]["message"]
    r = _post(srv, {"recipe": {"recipe": "advise"}})
    assert r.status_code == 422 and "cannot run as a job" in r.json()["error"]["message"]
    r = _post(srv, {"recipe": "- a list"})
    assert r.status_code == 422
    r = _post(srv, {"recipe": {"recipe": "sft", "model": {"name": "m"}, "data": {"train": "t.jsonl"}},
                    "set": ["train.batch_size=0"]})
    assert r.status_code == 422 and r.json()["error"]["problems"][0]["loc"] == "train.batch_size"
    r = _post(srv, {"command": "eval"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "run"
    r = _post(srv, {"command": "export", "run": "sft-missing"})
    assert r.status_code == 404


JOB_RECIPES = {"sft": "train", "dpo": "train", "cpt": "train", "distill": "train", "classify": "train",
               "pretrain": "train", "reward": "train", "rlhf": "train", "pipeline": "train", "data": "data_prepare",
               "suite": "compare"}


def test_every_example_job_recipe_is_accepted(make_server):
    """Each recipe kind that runs as a job: the repository's examples validate through the endpoint."""
    srv = make_server(worker=False)
    seen = set()
    for p in sorted((ROOT / "examples").glob("*.yaml")):
        raw = yaml.safe_load(p.read_text())
        name = raw.get("recipe")
        if name not in JOB_RECIPES:
            continue
        if name in ("pipeline",):
            raw["base_dir"] = str(p.parent)
        r = _post(srv, {"recipe": raw})
        assert r.status_code == 200, (p.name, r.text)
        assert r.json()["command"] == JOB_RECIPES[name] and r.json()["status"] == "queued"
        seen.add(name)
    assert seen == set(JOB_RECIPES)


def test_data_train_and_export_jobs_with_uploaded_files(make_server, tiny_model, tmp_path):
    import httpx2 as httpx

    srv = make_server()
    raw = write_color_data(tmp_path / "colors.jsonl", 40, seed=4)
    up = httpx.post(srv.url + "/v1/files", files={"file": ("colors.jsonl", raw.read_bytes())},
                    data={"purpose": "tunelab-data"}).json()
    data_job = _post(srv, {"recipe": {"recipe": "data", "name": "colors", "inputs": [{"path": up["id"]}],
                                      "profile": None, "workers": 0}}).json()
    train = {"recipe": "sft", "name": "native", "model": {"name": str(tiny_model)},
             "data": {"train": up["id"], "max_length": 64},
             "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": {"max_steps": 3, "batch_size": 4}}
    train_job = _post(srv, {"recipe": yaml.safe_dump(train), "set": ["train.learning_rate=0.001"]}).json()
    assert train_job["run_id"].startswith("sft-job-")
    assert f"train: {Path(srv.store.get_file(up['id'], 'default')['path'])}" in train_job["recipe"]
    assert "learning_rate: 0.001" in train_job["recipe"]
    for jid in (data_job["id"], train_job["id"]):
        job = srv.wait(jid, timeout=180)
        assert job["status"] == "succeeded", (job["error"], (srv.ws.root / "platform/jobs" / jid / "log.txt").read_text()[-2000:])
    assert (srv.ws.runs_dir / train_job["run_id"] / "adapter" / "adapter_config.json").is_file()
    assert list(srv.ws.root.glob("datasets/*/manifest.json"))
    metrics = httpx.get(f"{srv.url}/v1/tunelab/jobs/{train_job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]

    ex = _post(srv, {"command": "export", "run": train_job["run_id"]}).json()
    job = srv.wait(ex["id"], timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert (srv.ws.root / "platform" / "jobs" / ex["id"] / "export" / "adapter_model.safetensors").is_file()


def test_command_lines_for_each_job_kind(tmp_path):
    from tunelab.platform.jobs import argv_for
    from tunelab.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    w = ["--workspace", str(ws.root)]
    d = ws.root / "platform" / "jobs" / "job-1"

    def job(command, spec=None, resume=0, run_id="sft-job-1"):
        return {"id": "job-1", "command": command, "spec": spec or {}, "resume": resume, "run_id": run_id}

    assert argv_for(job("train"), ws) == ["train", str(d / "recipe.yaml"), *w]
    assert argv_for(job("train", {"options": {"nproc": 2}}), ws)[-2:] == ["--nproc", "2"]
    assert argv_for(job("train", resume=1), ws) == ["train", str(d / "recipe.yaml"), *w]  # no run folder yet
    (ws.runs_dir / "sft-job-1").mkdir(parents=True)
    (ws.runs_dir / "sft-job-1" / "config.yaml").write_text("recipe: sft\n")
    assert argv_for(job("train", resume=1), ws) == ["train", "--resume", "sft-job-1", *w]
    assert argv_for(job("data_prepare"), ws) == ["data", "prepare", str(d / "recipe.yaml"), "--result-json",
                                                 str(d / "result.json"), *w]
    assert argv_for(job("compare"), ws) == ["compare", str(d / "recipe.yaml"), "--out", str(d / "compare"), *w]
    assert argv_for(job("eval", {"run": "r", "options": {"limit": 5, "no_base": True}}), ws) == [
        "eval", "r", *w, "--limit", "5", "--no-base"]
    assert argv_for(job("export", {"run": "r", "options": {"merge": True}}), ws) == [
        "export", "r", "--out", str(d / "export"), *w, "--merge", "--dtype", "fp32"]
