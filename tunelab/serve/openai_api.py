"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health.

Requests are validated strictly at the edge (unknown fields and unsupported options are a 400
with the reason, never silently ignored); errors use OpenAI's body ``{"error": {"message",
"type", "param", "code"}}`` so every client library raises its usual exception. Streaming
answers are server-sent events (``data: {chunk}`` ... ``data: [DONE]``), one event per step
that produced text. Each finished request writes one log line: model, prompt and completion
tokens, latency and time spent queued.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request, bodies) at
# definition time, and Request is imported inside create_app to keep fastapi out of import time.

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import TunelabError
from tunelab.serve.adapters import Registry, UnknownModel
from tunelab.serve.batching import Engine, GenRequest, Overloaded

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


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # accepted only at their neutral values: anything else is refused rather than ignored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[Union[bool, int]] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: Union[str, list[str]]
    echo: bool = False


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:
        if p.get("type") != "text":
            raise APIError(400, f"message content of type '{p.get('type')}' is not supported; send text",
                           param="messages")
        parts.append(str(p.get("text", "")))
    return "".join(parts)


# ----------------------------------------------------------------------------- the app


def create_app(registry: Registry, engine: Engine, limits: Limits):
    """The FastAPI app over a model registry and a running batching engine."""
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
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
                             for err in e.errors())
        return _error_response(400, f"malformed request: {problems}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), "invalid_request_error")

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
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]
        try:
            prompt = served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that rejects the roles or their order
            raise APIError(400, f"the chat template of '{body.model}' rejects these messages: {e}",
                           param="messages") from None
        ids = served.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        return await _respond("chat", body, served, ids, max_tokens, request)

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
        ids = served.tokenizer(prompt)["input_ids"]
        return await _respond("completion", body, served, ids, body.max_tokens or 16, request)

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

    async def _respond(kind: str, body: _Body, served, ids: list[int], max_tokens: int, request: Request):
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
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(kind, rid, created, body.model, req, events, usage),
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
        return _final(kind, rid, created, body.model, req)

    async def _stream(kind, rid, created, model, req: GenRequest, events: asyncio.Queue, include_usage: bool):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict | str | None, finish=None, usage=None):
            if kind == "chat":
                choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": finish}]
            else:
                choices = [] if delta is None else [{"index": 0, "text": delta, "logprobs": None,
                                                     "finish_reason": finish}]
            c = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if usage is not None:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            while True:
                what, data = await events.get()
                if what == "delta":
                    yield chunk({"content": data} if kind == "chat" else data)
                elif what == "error":
                    yield f"data: {json.dumps({'error': {'message': data, 'type': 'server_error'}})}\n\n"
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
