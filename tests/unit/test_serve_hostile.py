"""tunelab serve under hostile input: a bad request is a 400 naming the parameter, and a request that fails
inside the batch fails alone (every other request in flight, for every model, still gets its exact answer).

Each case is a reproduction from a hostile-input review: `temperature: 1e-40` and `seed: 2**64` used to fail
every request in flight; unloading an adapter with requests taken off the queue failed requests for other
models; a lone surrogate gave a plain-text 500; `stream: "yes"` and `seed: -1` were accepted; validation
errors had `param: null`; /health counted cancelled requests as completed.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")

from tests.unit.test_serve import JOBS, PROMPTS, _build, _generate_alone, adapters  # noqa: F401  (fixture)


def _run(engine, registry, tok, jobs, extra=(), hold_lock=False, before_release=None):
    """Submit ``jobs`` (greedy) plus ``extra`` requests ((prompt_ids, name, budget, kwargs)); wait for all.
    Returns (the jobs' requests, the extra requests, {id(req): error message})."""
    from tunelab.models.engine import GenRequest

    pending = threading.Semaphore(0)
    errors: dict[int, str] = {}

    def on_event(req_box):
        def f(kind, data):
            if kind == "error":
                errors[id(req_box[0])] = data
            if kind in ("done", "error"):
                pending.release()
        return f

    reqs, bad = [], []
    if hold_lock:  # the worker takes the requests off the queue, then waits for the lock: one prefill for all
        engine.lock.acquire()
    try:
        for i, (p, name, budget) in enumerate(jobs):
            box = []
            r = GenRequest(prompt_ids=tok(p)["input_ids"], tokenizer=tok, adapter=registry.get(name).adapter,
                           max_tokens=budget, on_event=on_event(box))
            box.append(r)
            reqs.append(r)
            engine.submit(r)
            if i == 1:  # the bad requests arrive while others are in flight
                for ids, bname, bbudget, kw in extra:
                    box = []
                    b = GenRequest(prompt_ids=ids, tokenizer=tok, adapter=registry.get(bname).adapter,
                                   max_tokens=bbudget, on_event=on_event(box), **kw)
                    box.append(b)
                    bad.append(b)
                    engine.submit(b)
        if before_release is not None:
            before_release()
    finally:
        if hold_lock:
            engine.lock.release()
    try:
        for _ in range(len(jobs) + len(extra)):
            assert pending.acquire(timeout=120)
    finally:
        engine.close()
    return reqs, bad, errors


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# ----------------------------------------------------------------------------- the engine: a bad row fails alone


@pytest.mark.parametrize("kw", [{"temperature": 1e-40}, {"seed": 2**64, "temperature": 1.0},
                                {"temperature": 1e-300, "top_p": 0.5}], ids=["temperature-1e-40", "seed-2**64",
                                                                             "temperature-1e-300"])
def test_a_bad_sampling_request_does_not_fail_the_others(tiny_model, adapters, tok, kw):
    """Sent past the edge (straight to the engine), a request whose sampling overflows or whose seed does not
    fit the generator fails alone or decodes; the base and both adapters' requests in the same batch all get
    exactly the tokens of generate alone."""
    app, registry, engine = _build(tiny_model, adapters)
    extra = [(tok(PROMPTS[0])["input_ids"], "colors-a", 6, kw)]
    reqs, bad, errors = _run(engine, registry, tok, JOBS, extra)
    assert not any(id(r) in errors for r in reqs), errors
    _generate_alone(tiny_model, adapters, JOBS, reqs)
    (b,) = bad
    if "seed" in kw:
        assert b.finish_reason == "error" and "seed" in errors[id(b)]
    else:  # the softmax is taken after subtracting the top logit: a tiny temperature is greedy, not nan
        assert b.finish_reason in ("stop", "length"), errors.get(id(b))
    assert engine.stats.failed == (1 if "seed" in kw else 0)


POISON_LEN = 50  # longer than any other request's prompt + budget, so only the poisoned row reaches these positions


def _poison(engine, monkeypatch, at: int):
    """Make a forward raise whenever it contains a row at position >= ``at`` (only the poisoned request gets there),
    as a row that breaks a kernel would: the whole batched forward raises."""
    forward = engine._forward
    calls = {"raised": 0}

    def poisoned(ids, positions, mask, cache, adapters):
        if int(positions.max()) >= at:
            calls["raised"] += 1
            raise RuntimeError("injected failure for one row")
        return forward(ids, positions, mask, cache, adapters)

    monkeypatch.setattr(engine, "_forward", poisoned)
    return calls


@pytest.mark.parametrize("where", ["prefill", "step"])
def test_a_row_that_fails_in_a_batched_forward_fails_alone(tiny_model, adapters, tok, monkeypatch, where):
    """A forward that raises for one row (injected) in a batch of requests for the base and two adapters:
    that request fails alone with the error, every other request decodes on and gets exactly the tokens of
    generate alone. At prefill (all prefilled in one forward) and at a decoding step several tokens in."""
    kw = {"prefill_batch": 8} if where == "prefill" else {}
    app, registry, engine = _build(tiny_model, adapters, **kw)
    calls = _poison(engine, monkeypatch, POISON_LEN - 1 if where == "prefill" else POISON_LEN + 3)
    poison_ids = (tok(" ".join(["cat"] * 80))["input_ids"])[:POISON_LEN]
    assert len(poison_ids) == POISON_LEN
    extra = [(poison_ids, "colors-b", 10, {}), (tok(PROMPTS[1])["input_ids"], "colors-a", 7, {})]
    reqs, bad, errors = _run(engine, registry, tok, JOBS, extra, hold_lock=(where == "prefill"))
    assert calls["raised"] >= 2, calls  # the batch's forward, then the poisoned row alone
    poisoned, fine = bad
    assert poisoned.finish_reason == "error" and "injected failure" in errors[id(poisoned)]
    if where == "step":
        assert len(poisoned.out_ids) == 4  # it decoded until its row broke
    assert fine.finish_reason in ("stop", "length") and id(fine) not in errors
    assert not any(id(r) in errors for r in reqs), errors
    _generate_alone(tiny_model, adapters, JOBS, reqs)
    st = engine.stats.as_dict()
    assert st["failed"] == 1 and st["completed"] == len(JOBS) + 1, st


def test_a_failing_delivery_fails_that_request_alone(tiny_model, adapters, tok, monkeypatch):
    """A request whose text cannot be delivered a few tokens in (its callback raises, as when its client's
    event loop is closed) fails alone; the requests decoding beside it finish."""
    from tunelab.models.engine import GenRequest

    app, registry, engine = _build(tiny_model, adapters)
    monkeypatch.setattr(engine, "eos_ids", set())  # nobody stops early: all decode side by side
    done = threading.Semaphore(0)
    deltas = []

    def broken(kind, data):
        if kind == "delta":
            deltas.append(data)
            if len(deltas) == 3:
                raise RuntimeError("Event loop is closed")
        if kind in ("done", "error"):
            done.release()

    engine.lock.acquire()  # all are admitted before the first step
    try:
        good = [GenRequest(prompt_ids=tok(p)["input_ids"], tokenizer=tok, max_tokens=8,
                           adapter=registry.get(n).adapter,
                           on_event=lambda k, d: k in ("done", "error") and done.release())
                for p in PROMPTS[:2] for n in ("tiny", "colors-a")]
        bad = GenRequest(prompt_ids=tok(PROMPTS[2])["input_ids"], tokenizer=tok, max_tokens=8, on_event=broken)
        for r in good[:2] + [bad] + good[2:]:
            engine.submit(r)
    finally:
        engine.lock.release()
    try:
        for _ in range(len(good) + 1):
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    assert bad.finish_reason == "error" and len(deltas) == 3
    assert [r.finish_reason for r in good] == ["length"] * len(good)


# ----------------------------------------------------------------------------- unloading with requests queued


def test_unload_with_requests_taken_off_the_queue_is_refused_and_fails_nobody(tiny_model, adapters, tok):
    """The worker has taken requests for colors-a and colors-b off the queue and waits for the step lock;
    unloading colors-a now is refused (they count as busy) instead of deleting it under them, which failed
    the colors-b requests too ("Adapter adapter_1 not found"). Once they finish it unloads, and a request
    for it is refused at submit (the API answers 404)."""
    from tunelab.errors import TunelabError
    from tunelab.models.engine import AdapterGone, GenRequest

    app, registry, engine = _build(tiny_model, adapters)
    a = registry.get("colors-a").adapter
    # colors-a's only request comes first: the worker takes it off the queue before the others arrive
    jobs = [(PROMPTS[0], "colors-a", 6), (PROMPTS[0], "colors-b", 6), (PROMPTS[1], "tiny", 6),
            (PROMPTS[1], "colors-b", 6)]

    def unload_now():
        for _ in range(200):  # the worker pops the queue, then blocks on the lock this thread holds
            if engine.load()["waiting"] < len(jobs):
                break
            time.sleep(0.01)
        with engine._cv:
            assert a not in {q.adapter for q in engine._waiting}, "colors-a is still queued: nothing to test"
        with pytest.raises(TunelabError, match="queued or in flight"):
            registry.remove("colors-a")

    # _run closes the engine at the end: run a fresh one for the rest
    reqs, _, errors = _run(engine, registry, tok, jobs, hold_lock=True, before_release=unload_now)
    assert not errors, errors
    assert all(r.finish_reason in ("stop", "length") for r in reqs)

    app, registry, engine = _build(tiny_model, adapters)
    try:
        a = registry.get("colors-a").adapter
        registry.remove("colors-a")
        assert "colors-a" not in registry.models
        with pytest.raises(AdapterGone):
            engine.submit(GenRequest(prompt_ids=[1, 2], tokenizer=tok, adapter=a, on_event=lambda *x: None))
    finally:
        engine.close()


def test_a_request_for_an_adapter_unloaded_after_lookup_is_a_404(tiny_model, adapters, monkeypatch):
    """A request that resolved its model just before the adapter was unloaded gets a 404 naming `model`, not
    a 500 from a forward through a deleted adapter."""
    from fastapi.testclient import TestClient

    app, registry, engine = _build(tiny_model, adapters)
    try:
        served = registry.get("colors-a")
        registry.remove("colors-a")
        monkeypatch.setattr(registry, "get", lambda name: served)  # the lookup happened before the unload
        r = TestClient(app).post("/v1/completions", json={"model": "colors-a", "prompt": "The cat", "max_tokens": 2})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["param"] == "model" and "unloaded" in r.json()["error"]["message"]
    finally:
        engine.close()


# ----------------------------------------------------------------------------- the edge: 400 naming the parameter


@pytest.fixture(scope="module")
def api(tiny_model, adapters):
    from fastapi.testclient import TestClient

    app, registry, engine = _build(tiny_model, adapters, max_tokens=16)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, engine
    engine.close()


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What color is the cat?"}], "max_tokens": 4}


def _raw(content: str) -> bytes:
    """A chat body as a hostile client sends it: a lone surrogate in ``content`` escaped as \\ud800."""
    return json.dumps({**CHAT, "messages": [{"role": "user", "content": content}]}, ensure_ascii=True).encode()


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {**CHAT, "temperature": 1e-40}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": 0.001}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "The cat", "seed": 2**64}, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "The cat", "seed": -1}, "seed"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {**CHAT, "stream": 1}, "stream"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2.5}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "2"}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": 9}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "bogus": 1}, "bogus"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ("/v1/completions", {"model": "tiny", "prompt": "The cat", "stop": ["a", 3]}, "stop[1]"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "The cat", "max_tokens": 17}, "max_tokens"),
])
def test_bad_values_are_a_400_naming_the_parameter(api, path, body, param):
    c, _ = api
    r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param, err


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/chat/completions", _raw("\ud800"), "messages[0].content"),
    ("/v1/chat/completions", _raw("fine \udfff then"), "messages[0].content"),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "\ud83d"}]}]}).encode(), "messages[0].content[0].text"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "a\udc00"}).encode(), "prompt"),
    ("/v1/completions", json.dumps({"model": "\ud800", "prompt": "a"}).encode(), "model"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "a", "stop": "\ud800"}).encode(), "stop"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "a", "\ud800": 1}).encode(), None),
])
def test_a_lone_surrogate_is_a_json_400_naming_the_parameter(api, path, raw, param):
    c, _ = api
    r = c.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["error"]["param"] == param, r.text


def test_valid_surrogate_pairs_and_small_temperatures_still_work(api):
    """The checks refuse only what cannot work: an escaped surrogate pair (an emoji) is text, 0.01 is a
    temperature, 2**63-1 a seed."""
    c, _ = api
    body = {**CHAT, "messages": [{"role": "user", "content": "cat \U0001F408"}], "temperature": 0.01,
            "seed": 2**63 - 1}
    r = c.post("/v1/chat/completions", content=json.dumps(body, ensure_ascii=True).encode(),
               headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_health_counts_cancelled_requests_as_cancelled(api, tiny_model, tok):
    from tunelab.models.engine import GenRequest

    c, engine = api
    before = c.get("/health").json()["stats"]
    ev = threading.Event()
    r = GenRequest(prompt_ids=tok("The cat")["input_ids"], tokenizer=tok, max_tokens=4,
                   on_event=lambda k, d: k in ("done", "error") and ev.set())
    r.cancelled = True  # the client left while it was queued
    engine.submit(r)
    assert ev.wait(30) and r.finish_reason == "cancelled"
    after = c.get("/health").json()["stats"]
    assert after["cancelled"] == before.get("cancelled", 0) + 1, after
    assert after["completed"] == before["completed"], (before, after)


def test_a_completion_without_max_tokens_fits_the_servers_limit(tiny_model):
    """OpenAI's default of 16 completion tokens is capped by a lower --max-tokens: a client that did not ask
    for a length is not refused for it."""
    from fastapi.testclient import TestClient

    app, registry, engine = _build(tiny_model, {}, max_tokens=4)
    try:
        r = TestClient(app).post("/v1/completions", json={"model": "tiny", "prompt": "The cat"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4, r.text
    finally:
        engine.close()


def test_an_unexpected_error_is_a_json_500_without_a_traceback(tiny_model, adapters, monkeypatch):
    """A bug of ours (injected: the model lookup raises) answers OpenAI's JSON error shape with status 500 and
    no traceback; the traceback goes to the server log."""
    from fastapi.testclient import TestClient

    app, registry, engine = _build(tiny_model, {}, max_tokens=4)
    try:
        def broken(name):
            raise KeyError("injected bug")

        monkeypatch.setattr(registry, "get", broken)
        r = TestClient(app, raise_server_exceptions=False).post(
            "/v1/completions", json={"model": "tiny", "prompt": "The cat"})
        assert r.status_code == 500 and r.headers["content-type"].startswith("application/json"), r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "KeyError" in err["message"] and "Traceback" not in r.text
    finally:
        engine.close()


@pytest.mark.parametrize("broken", ["config-not-json", "config-a-list", "weights-garbage"])
def test_loading_a_broken_adapter_folder_is_a_400_naming_path(api, adapters, tmp_path, broken):
    """POST /v1/adapters with a folder whose adapter_config.json is not JSON (or not an object), or whose
    weights are garbage, is a 400 naming `path`; the server goes on serving."""
    import shutil

    c, _ = api
    folder = tmp_path / broken
    shutil.copytree(adapters["colors-a"], folder)
    if broken == "config-not-json":
        (folder / "adapter_config.json").write_text("{not json")
    elif broken == "config-a-list":
        (folder / "adapter_config.json").write_text("[]")
    else:
        (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    r = c.post("/v1/adapters", json={"name": f"broken-{broken}", "path": str(folder)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
    assert f"broken-{broken}" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
    r = c.post("/v1/completions", json={"model": "colors-a", "prompt": "The cat", "max_tokens": 2})
    assert r.status_code == 200, r.text
    registry = c.app.state.registry
    served = {m.adapter for m in registry.models.values()}
    assert not [a for a in getattr(registry.model, "peft_config", {}) if a not in served], "a half-loaded adapter"
