"""The OpenAI fine-tuning API, driven by the official ``openai`` client against a live server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.platform.conftest import write_chat_data

openai = pytest.importorskip("openai")


def _generate(base: Path, adapter: Path | None, question: str, n: int) -> str:
    """Greedy answer of base (+ adapter) with plain transformers/peft and the adapter's own chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.serve.adapters import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tok = load_tokenizer(adapter or base)
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        g = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    out = [t for t in g[0, ids.shape[1]:].tolist() if t not in (tok.eos_token_id,)]
    return tok.decode(out, skip_special_tokens=True)


def test_upload_job_events_checkpoints_and_chat(make_server, tiny_model, tmp_path):
    srv = make_server()
    client = srv.client()
    train = client.files.create(file=write_chat_data(tmp_path / "train.jsonl", 48, seed=1).open("rb"),
                                purpose="fine-tune")
    val = client.files.create(file=write_chat_data(tmp_path / "val.jsonl", 8, seed=2).open("rb"),
                              purpose="fine-tune")
    assert train.bytes > 0 and train.filename == "train.jsonl" and train.purpose == "fine-tune"
    assert client.files.retrieve(train.id).id == train.id
    assert client.files.content(train.id).content == (tmp_path / "train.jsonl").read_bytes()
    assert {f.id for f in client.files.list()} == {train.id, val.id}

    job = client.fine_tuning.jobs.create(
        model=str(tiny_model), training_file=train.id, validation_file=val.id, suffix="colors", seed=7,
        metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 20}}})
    assert job.status in ("queued", "running") and job.fine_tuned_model is None  # a free worker may have claimed it
    assert job.hyperparameters.n_epochs == 1 and job.metadata == {"team": "a"}
    done = srv.wait(job.id)
    assert done["status"] == "succeeded", done["error"]

    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model.startswith("ft:model:default:colors:")
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 6  # 48 records / batch 8, one epoch: every step logged
    assert [e.data["step"] for e in metrics] == [6, 5, 4, 3, 2, 1]  # newest first, as OpenAI lists them
    assert all(e.data["train_loss"] > 0 and "valid_loss" in e.data for e in metrics)
    assert metrics[0].data["train_loss"] < metrics[-1].data["train_loss"]  # it learned
    assert any("queued" in e.message for e in events if e.type == "message")
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    nxt = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert nxt.data[0].id != page.data[-1].id and nxt.data[0].created_at <= page.data[-1].created_at

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and all(c.step_number > 0 and c.metrics.train_loss is not None for c in ckpts)

    # the tuned model answers at once through the same server, the base model too
    names = {m.id for m in client.models.list()}
    assert job.fine_tuned_model in names
    out = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0,
                                         messages=[{"role": "user", "content": "What color is the small cat?"}])
    assert out.choices[0].message.content and out.model == job.fine_tuned_model
    assert out.choices[0].message.content == _generate(tiny_model, srv.ws.runs_dir / done["run_id"] / "adapter",
                                                       "What color is the small cat?", 8)  # the run's adapter
    base = client.chat.completions.create(model=str(tiny_model), max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "What color is the small cat?"}])
    assert base.choices[0].message.content == _generate(tiny_model, None, "What color is the small cat?", 8)

    # list with a cursor
    jobs = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in jobs.data] == [job.id] and not jobs.has_more

    client.files.delete(val.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(val.id)


def test_upload_refusals(make_server, tmp_path):
    import httpx2 as httpx

    srv = make_server(worker=False, max_upload_bytes=4000)
    client = srv.client()
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad.write_text("\n".join([good, "{not json", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                              good]) + "\n")
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    msg = e.value.body["message"]
    assert "line 2: invalid JSON" in msg and "line 3: the conversation must end with an assistant message" in msg
    assert "2 of 4 records" in msg

    # a path in the filename is only a label: the file is stored under its id
    tricky = tmp_path / "t.jsonl"
    tricky.write_text(good + "\n")
    r = httpx.post(srv.url + "/v1/files", files={"file": ("../../../etc/passwd.jsonl", tricky.read_bytes())},
                   data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["filename"] == "passwd.jsonl"
    stored = srv.store.get_file(r.json()["id"], "default")["path"]
    assert Path(stored).parent == srv.ws.root / "platform" / "files" / "default"
    assert not (srv.ws.root.parent / "etc").exists()

    r = httpx.post(srv.url + "/v1/files", json={"file": "x", "purpose": "fine-tune"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/files", files={"file": ("x.exe", b"MZ")}, data={"purpose": "fine-tune"})
    assert r.status_code == 415 and "not supported" in r.json()["error"]["message"]
    big = tmp_path / "big.jsonl"
    big.write_text((good + "\n") * 100)
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=big.open("rb"), purpose="fine-tune")
    assert e.value.status_code == 413
    r = httpx.post(srv.url + "/v1/files", files={"file": ("a.jsonl", good.encode())}, data={"purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    text = tmp_path / "plain.jsonl"
    text.write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(openai.BadRequestError, match="needs chat records"):
        client.files.create(file=text.open("rb"), purpose="fine-tune")
    assert len(client.files.list().data) == 1  # only the good upload was kept


def test_job_refusals_and_cancel_queued(make_server, tiny_model, chat_file):
    srv = make_server(worker=False)  # nothing runs: the job stays queued
    client = srv.client()
    f = client.files.create(file=chat_file.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="not available"):
        client.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.fine_tuning.jobs.create(model=str(tiny_model), training_file="file-" + "0" * 24)
    with pytest.raises(openai.BadRequestError, match="holds chat records"):
        client.fine_tuning.jobs.create(model=str(tiny_model), training_file=f.id, method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="malformed request"):
        client.fine_tuning.jobs.create(model=str(tiny_model), training_file=f.id,
                                       hyperparameters={"n_epochs": "many"})
    jobs = [client.fine_tuning.jobs.create(model=str(tiny_model), training_file=f.id) for _ in range(3)]
    page1 = client.fine_tuning.jobs.list(limit=2)
    page2 = client.fine_tuning.jobs.list(limit=2, after=page1.data[-1].id)
    assert [j.id for j in page1.data + page2.data] == [j.id for j in reversed(jobs)]
    assert page1.has_more and not page2.has_more
    c = client.fine_tuning.jobs.cancel(jobs[0].id)
    assert c.status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(jobs[0].id)
    with pytest.raises(openai.BadRequestError, match="only a running job"):
        client.fine_tuning.jobs.pause(jobs[1].id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft:nope", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.slow  # ~23 s: a job paused mid-training and resumed; make test-slow (CI runs it)
def test_pause_then_resume_continues_from_the_checkpoint(make_server, tiny_model, tmp_path):
    import time

    srv = make_server()
    client = srv.client()
    f = client.files.create(file=write_chat_data(tmp_path / "t.jsonl", 200, seed=3).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=str(tiny_model), training_file=f.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}})
    run_dir = srv.ws.runs_dir / srv.store.get_job(job.id)["run_id"]
    deadline = time.time() + 120
    while time.time() < deadline and not list(run_dir.glob("checkpoints/checkpoint-*/trainer_state.json")):
        time.sleep(0.1)
    assert client.fine_tuning.jobs.pause(job.id).status == "running"  # asked; it stops at the step's end
    paused = srv.wait(job.id, states=("paused", "failed", "succeeded"), timeout=120)
    assert paused["status"] == "paused", paused["error"]
    steps_at_pause = max(int(c.name.split("-")[1]) for c in run_dir.glob("checkpoints/checkpoint-*"))
    assert steps_at_pause < 100  # 200 records / 4 x 2 epochs: it stopped early
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = srv.wait(job.id)
    assert done["status"] == "succeeded", done["error"]
    log = (srv.ws.root / "platform" / "jobs" / job.id / "log.txt").read_text()
    assert f"resuming from checkpoint-{steps_at_pause}" in log and done["attempts"] == 2
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000) if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 101))  # every step once: none lost, none logged twice


def test_dpo_job_from_openai_preference_records(make_server, tiny_model, tmp_path):
    import yaml

    srv = make_server()
    client = srv.client()
    rec = {"input": {"messages": [{"role": "user", "content": "What color is the cat?"}]},
           "preferred_output": [{"role": "assistant", "content": "The cat is red."}],
           "non_preferred_output": [{"role": "assistant", "content": "The cat is blue."}]}
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join([json.dumps(rec)] * 6 + [json.dumps({**rec, "preferred_output": []})]) + "\n")
    with pytest.raises(openai.BadRequestError, match="line 7: preferred_output must be a list"):
        client.files.create(file=p.open("rb"), purpose="fine-tune")
    p.write_text("\n".join([json.dumps(rec)] * 6) + "\n")
    f = client.files.create(file=p.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="holds openai_dpo records"):
        client.fine_tuning.jobs.create(model=str(tiny_model), training_file=f.id)  # supervised needs chats
    job = client.fine_tuning.jobs.create(model=str(tiny_model), training_file=f.id, validation_file=f.id, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 3}}})
    # the answer reads the job back after queueing it: a free worker may already have claimed it
    assert job.status in ("queued", "running") and job.method.type == "dpo"
    row = srv.store.get_job(job.id)
    recipe = yaml.safe_load(row["recipe_yaml"])
    assert recipe["recipe"] == "dpo" and recipe["beta"] == 0.2 and row["run_id"] == f"dpo-{job.id}"
    pairs = [json.loads(x) for x in Path(recipe["data"]["train"]).read_text().splitlines()]
    assert pairs[0] == {"prompt": "What color is the cat?", "chosen": "The cat is red.", "rejected": "The cat is blue."}
    done = srv.wait(job.id)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["implicit_reward_margin"] > 0 and done["result"]["steps"] == 2
    job = client.fine_tuning.jobs.retrieve(job.id)
    out = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                         messages=[{"role": "user", "content": "What color is the cat?"}])
    assert out.usage.completion_tokens > 0
    # a base model the server does not know is not loaded for a caller who names it
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model=str(tmp_path), messages=[{"role": "user", "content": "hi"}])
