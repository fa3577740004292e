"""The OpenAI endpoints fuzzed from their own OpenAPI schema (schemathesis): no request is a 5xx.

schemathesis reads the schema FastAPI publishes at /openapi.json and generates requests for every operation,
both ones that fit the schema (they reach the batching engine and the tiny model) and ones that break it
(wrong types, missing and extra fields, out-of-range values). Every answer must be below 500, and an error
must be OpenAI's JSON shape with a ``param`` for a 400. Bounded: a fixed number of examples an operation,
derandomized, no example database written.
"""

from __future__ import annotations

import collections

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.unit.test_serve import _build, adapters  # noqa: F401,E402  (fixture)

EXAMPLES = 30  # an operation and mode (fits the schema / breaks it); the module runs in well under a minute
OPERATIONS = [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/completions"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/{name}")]


@pytest.fixture(scope="module")
def served(tiny_model, adapters):  # noqa: F811
    # max_tokens 4 keeps every generated request that reaches the model short
    app, registry, engine = _build(tiny_model, adapters, max_tokens=4, default_max_tokens=4)
    yield app, engine
    engine.close()


@pytest.fixture(scope="module")
def api_schema(served):
    app, _ = served
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_fuzzed(api_schema):
    """A new endpoint must join OPERATIONS (and so the fuzzing below)."""
    ops = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert ops == set(OPERATIONS)


# schemathesis' own pytest plugin (schema.parametrize) does not run under this pytest (it sets Node._nodeid,
# which pytest 9 removed); its hypothesis strategies are the public way to use it from any test.
# operations without a body have nothing to break but the path (a free string): positive only
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in (("positive", "negative") if m == "POST" else ("positive",))]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_no_request_is_a_server_error(api_schema, served, method, path, mode):
    from hypothesis import given
    from schemathesis.generation import GenerationMode

    _, engine = served
    op = api_schema[path][method]
    failed_before = engine.stats.failed

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    # the schema cannot know the served names: most generated bodies would stop at a 404 for `model`, so three
    # of four take a served name and go on to the limits, the tokenizer and the batching engine
    @given(case=op.as_strategy(generation_mode=GenerationMode(mode)),
           name=st.sampled_from(["tiny", "colors-a", "colors-b", None]))
    def check(case, name):
        if name is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = name
        response = case.call()
        seen[response.status_code] += 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        if response.status_code >= 400:
            err = response.json()["error"]  # always JSON, OpenAI's shape
            assert set(err) == {"message", "type", "param", "code"}, err
            assert "Traceback" not in err["message"]
            if response.status_code == 400 and isinstance(case.body, dict):
                assert err["param"], (case.body, err)  # a bad request names the parameter (a body that is
                # not a JSON object has none to name)

    seen: collections.Counter = collections.Counter()
    check()
    assert engine.stats.failed == failed_before, "a generated request failed inside the engine"
    if path.endswith("completions") and mode == "positive":
        assert seen[200] >= 5, seen  # the fuzzing reached the model, not only the validation
