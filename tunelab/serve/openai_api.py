"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health.

Requests are validated strictly at the edge (unknown fields, wrong JSON types, values out of
range, lone surrogates in text and unsupported options are a 400 that names the parameter, never
silently ignored or coerced); errors use OpenAI's body ``{"error": {"message", "type", "param",
"code"}}`` so every client library raises its usual exception. Anything unexpected is a JSON 500
with the same shape, never a traceback (the traceback goes to the server log). Streaming
answers are server-sent events (``data: {chunk}`` ... ``data: [DONE]``), one event per step
that produced text. Each finished request writes one log line: model, prompt and completion
tokens, latency and time spent queued.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request, bodies) at
# definition time, and Request is imported inside create_app to keep fastapi out of import time.

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from tunelab.data import retrieval
from tunelab.errors import TunelabError
from tunelab.serve.adapters import Registry, UnknownModel
from tunelab.models.engine import AdapterGone, Engine, GenRequest, Overloaded

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there
log = logging.getLogger("tunelab.serve")


class Limits(BaseModel):
    """Per-request limits the server enforces (400 when a request exceeds them)."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = 512  # most completion tokens one request may ask for
    default_max_tokens: int = 256  # when a chat request gives none (completions default to 16, as OpenAI's)
    max_prompt_tokens: int = 2048
    api_keys: list[str] = []


# ----------------------------------------------------------------------------- request bodies

# Below this a positive temperature overflows the softmax in float32 (logits / 1e-40 = inf, inf/inf = nan);
# vLLM raises temperatures under the same 1e-2 to it with a warning (vllm/sampling_params.py, _MAX_TEMP);
# tunelab refuses them instead of changing them.
MIN_TEMPERATURE = 0.01
SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds; OpenAI's seed is a signed 64-bit integer
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(s: str) -> str:
    # JSON lets "\ud800" through as a lone UTF-16 half, which no UTF-8 tokenizer (or response) can encode
    m = _SURROGATE.search(s)
    if m:
        raise ValueError(f"contains a lone UTF-16 surrogate (U+{ord(m.group()):04X}) at character {m.start()}; "
                         "send valid Unicode text")
    return s


Text = Annotated[str, AfterValidator(_no_surrogates)]
# JSON Schema's "integer" (what /openapi.json publishes) includes 2.0; 2.5, "2" and true stay refused
def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]
Count = Annotated[int, Field(ge=1), BeforeValidator(_integral)]  # constraints before the validator: in the schema
Seed = Annotated[int, Field(ge=0, le=SEED_MAX), BeforeValidator(_integral)]
# strict: no coercion ("yes" is not true, 1.0 is not a token count, "3" is not a number); no inf or nan
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Body(BaseModel):
    model_config = _STRICT
    model: Text
    max_tokens: Optional[Count] = None
    # the published schema says what is accepted: 0, or MIN_TEMPERATURE to 2
    temperature: float = Field(1.0, ge=0.0, le=2.0, json_schema_extra={
        "anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE, "maximum": 2}]})
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Int = Field(1, json_schema_extra={"minimum": 1, "maximum": 1})  # refused below with the reason
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[Text, list[Text], None] = None
    seed: Optional[Seed] = None
    user: Optional[Text] = None
    # accepted only at their neutral values: anything else is refused rather than ignored
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, json_schema_extra={"minimum": 0, "maximum": 0})
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, json_schema_extra={"minimum": 0, "maximum": 0})
    logprobs: Optional[Union[bool, Int]] = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, t: float) -> float:
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or from {MIN_TEMPERATURE} to 2; {t} overflows the softmax")
        return t


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # other part kinds carry other fields; refused below
    type: Text
    text: Optional[Text] = None


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[Text, list[ContentPart], None] = None
    name: Optional[Text] = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[Count] = None


class CompletionBody(_Body):
    prompt: Union[Text, list[Text]]
    echo: bool = Field(False, json_schema_extra={"const": False})


class AdapterBody(BaseModel):
    model_config = _STRICT
    name: Text = Field(min_length=1)
    path: Text = Field(min_length=1)


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def _safe(s):
    """Text that can be sent as UTF-8: a lone surrogate echoed from a request becomes its escape."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(s, str) else s


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": _safe(message), "type": type_, "param": _safe(param), "code": code}},
                        status_code=status, headers=headers)


# pydantic names a union's member in an error's location ("content", "str"); that is not part of the parameter
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|function-.*|.*\[.*)$")


def _param(loc) -> str | None:
    """A pydantic error location as OpenAI names a parameter: ('body', 'messages', 0, 'content') ->
    'messages[0].content'."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "path", "query") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _UNION_TAG.match(str(part)):
            out += ("." if out else "") + str(part)
    return out or None


def _text(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, p in enumerate(content):
        if p.type != "text" or p.text is None:
            what = f"of type '{p.type}' is not supported" if p.type != "text" else "has no 'text'"
            raise APIError(400, f"message content {what}; send text", param=f"messages[{i}].content[{j}]")
        parts.append(p.text)
    return "".join(parts)


# ----------------------------------------------------------------------------- the app


def create_app(registry: Registry, engine: Engine, limits: Limits, rag: "retrieval.Index | None" = None):
    """The FastAPI app over a model registry and a running batching engine. ``rag``: a retrieval index
    (tunelab/data/retrieval.py) whose passages are put into every chat request's prompt the way the measured
    ladder put them, and returned in the response's ``sources`` field."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="tunelab serve", version="1")
    app.state.registry, app.state.engine, app.state.limits = registry, engine, limits

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        # a value of the right type but wrong (out of range, a surrogate), and then the deepest location, say more
        # than the other members of a union it did not match ("stop: Input should be a valid string" for a list)
        errors = sorted(e.errors(), key=lambda err: (str(err.get("type", "")).endswith("_type"), -len(err["loc"])))
        params = [None if err.get("type") == "json_invalid" else _param(err["loc"]) for err in errors]
        problems = "; ".join(f"{p or 'body'}: {err['msg']}" for p, err in zip(params, errors))
        param = next((p for p in params if p), None)
        return _error_response(400, f"malformed request: {problems}", "invalid_request_error", param,
                               "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug of ours: JSON, no traceback (the log has it)
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=e)
        return _error_response(500, f"internal error ({type(e).__name__}); the server log has the details",
                               "server_error")

    def authorize(request: Request) -> None:
        if not limits.api_keys:
            return
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if key not in limits.api_keys:
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(registry.models), **engine.load(), "stats": engine.stats.as_dict()}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [m.card("tunelab") for m in registry.models.values()]}

    @app.post("/v1/adapters", dependencies=auth)
    async def load_adapter(body: AdapterBody):
        try:
            served = await asyncio.to_thread(registry.add, body.name, body.path)
        except TunelabError as e:
            raise APIError(400, str(e), param="path") from None
        except Exception as e:  # peft or transformers could not load what the folder holds
            log.warning("loading adapter %r from %r failed", body.name, body.path, exc_info=e)
            raise APIError(400, f"cannot load an adapter from '{body.path}': {type(e).__name__}: {e}",
                           param="path") from None
        return served.card("tunelab")

    @app.delete("/v1/adapters/{name}", dependencies=auth)
    async def unload_adapter(name: str):
        try:
            registry.get(name)
        except UnknownModel as e:
            raise APIError(404, str(e), param="name", code="model_not_found") from None
        try:
            await asyncio.to_thread(registry.remove, name)
        except TunelabError as e:
            raise APIError(409, str(e)) from None
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatBody, request: Request):
        served = _served(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)}
                    for i, m in enumerate(body.messages)]
        sources = None
        if rag is not None:
            messages, sources = await _retrieve(messages)
        try:
            prompt = served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that rejects the roles or their order
            raise APIError(400, f"the chat template of '{body.model}' rejects these messages: {e}",
                           param="messages") from None
        ids = _tokenize(served, prompt, "messages", add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        return await _respond("chat", body, served, ids, max_tokens, request, sources)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionBody, request: Request):
        served = _served(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (a list of one string at most)", param="prompt")
            prompt = prompt[0]
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        ids = _tokenize(served, prompt, "prompt")
        # OpenAI's default of 16, or this server's limit when lower: a client that did not ask is not refused
        max_tokens = body.max_tokens or min(16, limits.max_tokens)
        return await _respond("completion", body, served, ids, max_tokens, request)

    def _tokenize(served, text: str, param: str, **kw) -> list[int]:
        if len(text) > limits.max_prompt_tokens * 64:  # far over any tokenization of max_prompt_tokens: skip the work
            raise APIError(400, f"the prompt has {len(text)} characters; this server takes at most "
                                f"{limits.max_prompt_tokens} tokens", param=param, code="context_length_exceeded")
        try:
            return served.tokenizer(text, **kw)["input_ids"]
        except Exception as e:  # text the tokenizer cannot take
            raise APIError(400, f"the tokenizer of this model cannot encode the {param}: {type(e).__name__}: {e}",
                           param=param) from None

    def _served(name: str):
        try:
            return registry.get(name)
        except UnknownModel as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None

    def _check(body: _Body, ids: list[int], max_tokens: int) -> None:
        if body.n != 1:
            raise APIError(400, "n must be 1 (one choice per request)", param="n")
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported", param="presence_penalty")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                f"{limits.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        ctx = engine.max_positions
        if ctx is not None and len(ids) + max_tokens > ctx:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) is over the model's "
                                f"context of {ctx} tokens", param="max_tokens", code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")

    async def _retrieve(messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
        """The last user turn's nearest passages (k, mode and prompt settings from the index's meta.json)."""
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        if query is None:
            return messages, None
        meta = rag.meta
        # the encoder is CPU work of a few milliseconds: off the event loop, so other requests keep flowing
        hits = (await asyncio.to_thread(rag.search, [query], int(meta.get("k", 3))))[0]
        msgs = retrieval.augment(messages, hits, meta.get("mode", "rag"), meta.get("instruction"),
                                 meta.get("system_prompt"))
        return msgs, [h.as_dict(text_chars=1000) for h in hits]

    async def _respond(kind: str, body: _Body, served, ids: list[int], max_tokens: int, request: Request,
                       sources: list[dict] | None = None):
        _check(body, ids, max_tokens)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = GenRequest(prompt_ids=list(ids), tokenizer=served.tokenizer, adapter=served.adapter,
                         max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stops,
                         seed=body.seed,
                         on_event=lambda kind_, data: loop.call_soon_threadsafe(events.put_nowait, (kind_, data)))
        try:
            engine.submit(req)
        except Overloaded as e:
            raise APIError(429, str(e), "rate_limit_error", code="overloaded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except AdapterGone:  # unloaded between looking the name up and queueing the request
            raise APIError(404, f"model '{body.model}' was unloaded; available: {', '.join(registry.models)}",
                           param="model", code="model_not_found") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(kind, rid, created, body.model, req, events, usage, sources),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            checked = time.monotonic()
            while True:
                try:
                    what, data = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    what, data = None, None
                if what == "error":
                    raise APIError(500, data, "server_error")
                if what == "done":
                    break
                # Starlette does not cancel a plain endpoint when its client leaves: ask now and then (text
                # arrives every step, so not only on a quiet queue), and stop decoding for a client that is gone
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        _cancel(req, body.model)
                        return Response(status_code=499)  # "client closed request" (nginx's convention)
        finally:  # also when this task is cancelled
            _cancel(req, body.model)
        _log(req, body.model, stream=False)
        out = _final(kind, rid, created, body.model, req)
        if sources is not None:
            out["sources"] = sources  # an extra field: OpenAI clients keep it (model_extra) and ignore it otherwise
        return out

    async def _stream(kind, rid, created, model, req: GenRequest, events: asyncio.Queue, include_usage: bool,
                      sources: list[dict] | None = None):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict | str | None, finish=None, usage=None, extra=None):
            if kind == "chat":
                choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": finish}]
            else:
                choices = [] if delta is None else [{"index": 0, "text": delta, "logprobs": None,
                                                     "finish_reason": finish}]
            c = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if usage is not None:
                c["usage"] = usage
            if extra:
                c.update(extra)
            return f"data: {json.dumps(c)}\n\n"

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""},
                            extra=None if sources is None else {"sources": sources})
            while True:
                what, data = await events.get()
                if what == "delta":
                    yield chunk({"content": data} if kind == "chat" else data)
                elif what == "error":
                    err = {"message": data, "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
                else:
                    yield chunk({} if kind == "chat" else "", finish=req.finish_reason)
                    if include_usage:
                        yield chunk(None, usage=_usage(req))
                    _log(req, model, stream=True)
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away: stop decoding for it
            _cancel(req, model)

    def _cancel(req: GenRequest, model: str) -> None:
        if req.finished is None and not req.cancelled:
            req.cancelled = True
            log.info("request model=%s cancelled by the client after %d completion tokens, %.0f ms", model,
                     len(req.out_ids), req.latency_s * 1000)

    return app


def _usage(req: GenRequest) -> dict:
    p, c = len(req.prompt_ids), len(req.out_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _final(kind: str, rid: str, created: int, model: str, req: GenRequest) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": req.text}, "logprobs": None,
                  "finish_reason": req.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": req.text, "logprobs": None, "finish_reason": req.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": _usage(req)}


def _log(req: GenRequest, model: str, stream: bool) -> None:
    log.info("request model=%s prompt_tokens=%d completion_tokens=%d latency_ms=%.0f queue_ms=%.0f finish=%s "
             "stream=%s", model, len(req.prompt_ids), len(req.out_ids), req.latency_s * 1000, req.queue_s * 1000,
             req.finish_reason, stream)
