"""tunelab serve: batching is exact, adapters are selected per row, and the OpenAI client works against it.

The server runs in-process (uvicorn in a thread) on a tiny random-init Llama with two tiny LoRA
adapters made here; the official ``openai`` package drives it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.conftest import uvicorn_in_thread

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

PROMPTS = ["What color is the small cat?", "Tell me the color of the big dog.",
           "Which color does the old bird have? Tell me the color of the fish.", "The frog"]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random B (so it changes the outputs), saved with the base tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    return {"colors-a": make_adapter(tiny_model, d / "a", 1), "colors-b": make_adapter(tiny_model, d / "b", 2)}


def _build(tiny_model, adapters, **kw):
    import torch

    from tunelab.serve.server import ServeConfig, build
    from tunelab.workspace import Workspace

    torch.set_num_threads(2)
    ws = Workspace.resolve(tiny_model.parent / "ws")
    cfg = ServeConfig(model=str(tiny_model), name="tiny", adapters=[f"{n}={p}" for n, p in adapters.items()], **kw)
    return build(cfg, ws)


@pytest.fixture(scope="module")
def server(tiny_model, adapters):
    """The app under uvicorn in a thread; yields (base_url, registry, engine)."""
    app, registry, engine = _build(tiny_model, adapters, api_keys=["secret"], max_tokens=64)
    with uvicorn_in_thread(app) as url:
        yield url, registry, engine
    engine.close()


def _client(url, key="secret"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


# ----------------------------------------------------------------------------- the engine


def _generate_alone(tiny_model, adapters, jobs, reqs):
    """Check each request's tokens against plain transformers/peft ``generate`` for it alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    peft = PeftModel.from_pretrained(base, adapters["colors-a"], adapter_name="colors-a")
    peft.load_adapter(str(adapters["colors-b"]), adapter_name="colors-b")
    eos = tok.eos_token_id
    outs = {}
    for (p, name, budget), r in zip(jobs, reqs):
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            if name == "tiny":
                with peft.disable_adapter():
                    g = peft.generate(input_ids=ids, max_new_tokens=budget, do_sample=False, eos_token_id=eos,
                                      pad_token_id=tok.pad_token_id)
            else:
                peft.set_adapter(name)
                g = peft.generate(input_ids=ids, max_new_tokens=budget, do_sample=False, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id)
        want = [t for t in g[0, ids.shape[1]:].tolist() if t != eos]
        assert r.out_ids == want, (p, name)
        assert r.finish_reason == ("length" if len(want) == budget else "stop")
        outs.setdefault(p, set()).add(tuple(r.out_ids))
    assert any(len(v) > 1 for v in outs.values()), "the adapters did not change any output"


JOBS = [(p, name, budget) for p, budget in zip(PROMPTS, [12, 5, 20, 9]) for name in ("tiny", "colors-a", "colors-b")]


def _submit_all(engine, registry, tok, jobs, hold_lock: bool):
    from tunelab.models.engine import GenRequest

    done = threading.Semaphore(0)
    reqs = []
    try:
        if hold_lock:  # the worker waits before its next prefill, so the queued requests are prefilled together
            engine.lock.acquire()
        for i, (p, name, budget) in enumerate(jobs):
            r = GenRequest(prompt_ids=tok(p)["input_ids"], tokenizer=tok, adapter=registry.get(name).adapter,
                           max_tokens=budget, on_event=lambda k, d: k in ("done", "error") and done.release())
            reqs.append(r)
            engine.submit(r)
            if i == 4 and not hold_lock:  # later requests join a batch that is already decoding
                time.sleep(0.05)
        if hold_lock:
            engine.lock.release()
        for _ in jobs:
            assert done.acquire(timeout=120)
    finally:
        engine.close()
    return reqs


def test_batched_greedy_equals_generate_alone(tiny_model, adapters):
    """Requests for the base and two adapters, of different lengths and budgets, decoded in one
    batch (joining and leaving at different steps) give exactly the tokens that plain
    transformers/peft generate gives for each alone."""
    from transformers import AutoTokenizer

    app, registry, engine = _build(tiny_model, adapters)
    reqs = _submit_all(engine, registry, AutoTokenizer.from_pretrained(tiny_model), JOBS, hold_lock=False)
    assert engine.stats.as_dict()["mean_batch_size"] > 1.5, "requests were not batched"
    _generate_alone(tiny_model, adapters, JOBS, reqs)


def test_prefill_together_left_padded_equals_generate_alone(tiny_model, adapters):
    """Queued requests of different prompt lengths and adapters are prefilled in one left-padded forward
    and still give exactly the tokens of generate alone."""
    from transformers import AutoTokenizer

    app, registry, engine = _build(tiny_model, adapters, prefill_batch=8)
    reqs = _submit_all(engine, registry, AutoTokenizer.from_pretrained(tiny_model), JOBS, hold_lock=True)
    st = engine.stats.as_dict()
    assert st["rows_prefilled"] == len(JOBS) and st["mean_prefill_batch_size"] >= 2, st
    _generate_alone(tiny_model, adapters, JOBS, reqs)


def test_overload_and_stop_strings(tiny_model, adapters):
    """A full queue answers 429 with Retry-After; a stop string cuts the text before it."""
    from fastapi.testclient import TestClient

    from tunelab.models.engine import Engine, GenRequest

    app, registry, engine = _build(tiny_model, {}, max_queue=1)
    engine.close()  # nothing decodes from here on: the queue stays as we fill it
    engine.submit(GenRequest(prompt_ids=[1, 2], tokenizer=None, on_event=lambda *a: None))
    c = TestClient(app)
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "The cat", "max_tokens": 4})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    assert "overloaded" in r.json()["error"]["message"]

    # stop strings, on a fresh engine: the full text is produced once, then cut at a stop taken from it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    e2 = Engine(registry.model, registry.eos_ids(), max_positions=256).start()
    try:
        results = []
        for stop in ([], None):
            ev = threading.Event()
            if stop is None:
                stop = [results[0].text[3:6]]
            r = GenRequest(prompt_ids=tok("The cat")["input_ids"], tokenizer=tok, max_tokens=12, stop=stop,
                           on_event=lambda k, d: k == "done" and ev.set())
            e2.submit(r)
            assert ev.wait(60)
            results.append(r)
    finally:
        e2.close()
    full, cut = results
    assert len(full.text) > 6
    assert cut.text == full.text[: full.text.find(cut.stop[0])] and cut.finish_reason == "stop"


# ----------------------------------------------------------------------------- the HTTP API with the openai client


def test_openai_client_chat_stream_completions_and_adapters(server, adapters, tmp_path):
    url, registry, engine = server
    client = _client(url)
    names = [m.id for m in client.models.list().data]
    assert names == ["tiny", "colors-a", "colors-b"]

    msgs = [{"role": "system", "content": "You answer colors."}, {"role": "user", "content": "What color is the cat?"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    text = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    tok = registry.get("tiny").tokenizer
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])  # template applied
    assert 0 < chat.usage.completion_tokens <= 10

    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # more than one event

    comp = client.completions.create(model="tiny", prompt="The small cat is", max_tokens=8, temperature=0)
    assert comp.object == "text_completion" and comp.usage.completion_tokens <= 8

    by_name = {n: client.completions.create(model=n, prompt="The small cat is", max_tokens=8, temperature=0)
               .choices[0].text for n in ("tiny", "colors-a", "colors-b")}
    assert len(set(by_name.values())) > 1, by_name

    # sampling: a seed repeats a sample; a tiny top_p keeps only the top token, i.e. greedy
    kw = dict(model="colors-a", prompt="The small cat is", max_tokens=8, temperature=1.5)
    a1, a2 = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert a1 == a2
    assert len({client.completions.create(seed=s, **kw).choices[0].text for s in range(4)} | {a1}) > 1
    assert client.completions.create(top_p=1e-6, **kw).choices[0].text == by_name["colors-a"]

    # load a third adapter at run time, use it, unload it
    import httpx2 as httpx

    h = {"Authorization": "Bearer secret"}
    r = httpx.post(url + "/v1/adapters", json={"name": "late", "path": str(adapters["colors-b"])}, headers=h)
    assert r.status_code == 200, r.text
    late = client.completions.create(model="late", prompt="The small cat is", max_tokens=8, temperature=0)
    assert late.choices[0].text == by_name["colors-b"]
    assert httpx.delete(url + "/v1/adapters/late", headers=h).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="The small cat is", max_tokens=8)
    assert "colors-a" in [m.id for m in client.models.list().data]


def test_errors_and_limits(server):
    import httpx2 as httpx

    url, registry, engine = server
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    assert httpx.get(url + "/v1/models").status_code == 401
    client = _client(url)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="The cat", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="tiny", prompt="The cat", n=2)
    with pytest.raises(openai.BadRequestError, match="tokens"):
        client.completions.create(model="tiny", prompt="cat " * 300, max_tokens=4)
    h = {"Authorization": "Bearer secret"}
    for body in ({"model": "tiny"}, {"model": "tiny", "messages": "hi"}, {"model": "tiny", "messages": [],},
                 {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
                 {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=h)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed request"), (body, r.text)
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={**h, "content-type": "application/json"})
    assert r.status_code == 400
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["stats"]["completed"] >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_its_decoding(server, monkeypatch, stream):
    """A client that disconnects (a timeout, a closed stream) gets its request cancelled within a step or a
    poll, instead of the server decoding all of max_tokens for nobody."""
    import httpx2 as httpx

    url, registry, engine = server
    step = engine._step
    monkeypatch.setattr(engine, "_step", lambda: (time.sleep(0.05), step())[1])  # ~3 s for 64 tokens
    monkeypatch.setattr(engine, "eos_ids", set())  # the random model must not stop early on its own
    seen = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda req: (seen.append(req), submit(req))[1])
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 64, "stream": stream}
    headers = {"Authorization": "Bearer secret"}
    if stream:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event arrived, then the client hangs up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=0.6)
    (req,) = seen
    for _ in range(100):
        if req.finished is not None:
            break
        time.sleep(0.05)
    assert req.finish_reason == "cancelled", (req.finish_reason, len(req.out_ids))
    assert len(req.out_ids) < 64
