"""A bounded load test on loopback: 16 concurrent clients, bad requests mixed in, one request that breaks
inside the batch, and an adapter loaded and unloaded meanwhile. Every good request succeeds, with exactly
the text a lone request gets (greedy), and every bad one gets its own 4xx (or, for the one broken inside
the engine, its own 500) in OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.conftest import uvicorn_in_thread
from tests.unit.test_serve import PROMPTS, _build, adapters  # noqa: F401  (fixture)

CLIENTS = 16
ROUNDS = 3  # good requests a client, with one bad request among them
POISON_PROMPT = "cat " * 30  # far longer than any good prompt: only its row reaches its own length + 2

GOOD = ([("/v1/completions", {"model": m, "prompt": p, "max_tokens": 8, "temperature": 0}, False)
         for p in PROMPTS for m in ("tiny", "colors-a", "colors-b")]
        + [("/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": p}], "max_tokens": 8,
                                     "temperature": 0}, stream) for p in PROMPTS[:2] for m, stream in
           (("tiny", True), ("colors-a", False), ("colors-b", True))])

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What color is the cat?"}], "max_tokens": 4}
# (body or raw bytes, endpoint, expected status, expected param)
BAD = [
    ({**CHAT, "temperature": 1e-40}, "/v1/chat/completions", 400, "temperature"),
    ({"model": "colors-a", "prompt": "The cat", "seed": 2**64, "temperature": 1}, "/v1/completions", 400, "seed"),
    ({"model": "colors-b", "prompt": "The cat", "seed": -1}, "/v1/completions", 400, "seed"),
    ({**CHAT, "stream": "yes"}, "/v1/chat/completions", 400, "stream"),
    (json.dumps({**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}).encode(), "/v1/chat/completions",
     400, "messages[0].content"),
    ({**CHAT, "model": "nope"}, "/v1/chat/completions", 404, "model"),
    ({"model": "tiny", "prompt": "The cat", "max_tokens": 9}, "/v1/completions", 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": ', "/v1/completions", 400, None),
    ({"model": "colors-b", "prompt": POISON_PROMPT, "max_tokens": 8, "temperature": 0}, "/v1/completions", 500, None),
]


def _answer(client, url, path, body, stream):
    """(status, text or error) of one request; a stream is read to its end and its deltas joined."""
    if not stream:
        r = client.post(url + path, json=body)
        if r.status_code != 200:
            return r.status_code, r.json()["error"]
        c = r.json()["choices"][0]
        return 200, c["message"]["content"] if "message" in c else c["text"]
    text = []
    with client.stream("POST", url + path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()["error"]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return 500, event["error"]
            text += [ch["delta"].get("content") or "" for ch in event["choices"]]
    return 200, "".join(text)


def test_sixteen_clients_with_bad_requests_mixed_in(tiny_model, adapters, monkeypatch):  # noqa: F811
    import httpx2 as httpx

    app, registry, engine = _build(tiny_model, adapters, max_tokens=8, max_batch_size=8)
    forward = engine._forward
    # the poisoned row is prefilled and decodes two steps in the batch, then breaks the forward it is in
    poison_at = len(registry.get("colors-b").tokenizer(POISON_PROMPT)["input_ids"]) + 2

    def poisoned(ids, positions, mask, cache, names):
        if int(positions.max()) >= poison_at:
            raise RuntimeError("injected failure for one row")
        return forward(ids, positions, mask, cache, names)

    monkeypatch.setattr(engine, "_forward", poisoned)
    server = contextlib.ExitStack()
    url = server.enter_context(uvicorn_in_thread(app))
    try:
        with httpx.Client(timeout=120) as c:
            lone = [_answer(c, url, *g) for g in GOOD]  # one at a time: each decodes alone
        assert all(s == 200 for s, _ in lone), lone
        assert len({text for _, text in lone}) > len(PROMPTS), "the adapters did not change any answer"

        results: dict[tuple[int, int], tuple] = {}
        bad_results: dict[int, tuple] = {}
        adapter_log: list[str] = []
        start = threading.Barrier(CLIENTS)

        def client(i: int):
            with httpx.Client(timeout=120) as c:
                start.wait()
                for k in range(ROUNDS):
                    if k == 1:  # the bad request comes while this client's and others' requests are in flight
                        body, path, _, _ = BAD[i % len(BAD)]
                        if isinstance(body, bytes):
                            r = c.post(url + path, content=body, headers={"content-type": "application/json"})
                        else:
                            r = c.post(url + path, json=body)
                        bad_results[i] = (r.status_code, r.json())
                    g = (i * ROUNDS + k) % len(GOOD)
                    results[(i, g)] = _answer(c, url, *GOOD[g])
                if i == CLIENTS - 1:  # meanwhile: load an adapter, use it, unload it (409 while busy: retry)
                    r = c.post(url + "/v1/adapters", json={"name": "late", "path": str(adapters["colors-a"])})
                    adapter_log.append(f"load {r.status_code}")
                    late = _answer(c, url, "/v1/completions", {**GOOD[1][1], "model": "late"}, False)
                    adapter_log.append(f"use {late[0]} {late[1] == lone[1][1]}")
                    for _ in range(100):
                        r = c.delete(url + "/v1/adapters/late")
                        if r.status_code != 409:
                            break
                        time.sleep(0.05)
                    adapter_log.append(f"unload {r.status_code}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        elapsed = time.perf_counter() - t0
        assert not any(th.is_alive() for th in threads)
    finally:
        server.close()
        engine.close()

    assert len(results) == CLIENTS * ROUNDS
    for (i, g), (status, text) in results.items():
        assert status == 200, (GOOD[g], text)
        assert text == lone[g][1], (GOOD[g], text, lone[g][1])  # greedy: the same as alone
    for i, (status, body) in bad_results.items():
        _, path, want_status, want_param = BAD[i % len(BAD)]
        assert status == want_status, (i, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] == want_param, (i, body)
    assert adapter_log == ["load 200", "use 200 True", "unload 200"], adapter_log
    stats = engine.stats.as_dict()
    n_poison = sum(1 for i in range(CLIENTS) if BAD[i % len(BAD)][2] == 500)
    assert stats["failed"] == n_poison and stats["mean_batch_size"] > 1.5, stats
    print(f"{CLIENTS} clients, {len(results)} good + {len(bad_results)} bad requests in {elapsed:.1f} s; {stats}")
