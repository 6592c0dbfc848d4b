"""The OpenAI-compatible routes: handlers only submit to the EngineLoop and read token events.

Each request gets an asyncio queue; the engine loop's thread feeds it through the request's sink
(`call_soon_threadsafe`), so the event loop never blocks on the engine and a request arriving at
any moment joins the running batch at the next engine step. A client that goes away (mid-stream
or while waiting for a non-streamed answer) aborts its request, which frees its KV blocks before
the next step. Every refusal is OpenAI's error object: 400 for bad input, 401 for a missing or
wrong bearer token, 404 for another model's name, 503 + Retry-After while the queue is full, the
engine is warming up, or the server is draining.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from functools import lru_cache
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmc.errors import LlmcError
from llmc.serve import protocol as P
from llmc.serve.metrics import ServerMetrics

RETRY_AFTER_S = 1


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        self.status, self.headers = status, headers
        self.body = P.error_body(message, type_, param, code)


class ServerState:
    """What the routes share: the engine loop (set once loaded), settings, metrics, drain flag."""

    def __init__(self, model_name: str, api_key: str | None, tokenizer, max_model_len: int):
        """`tokenizer` must be this thread's own instance (fast tokenizers are not shareable across
        threads, and the engine loop's detokenises during every step): it only names logprobs'
        tokens."""
        self.model_name, self.api_key, self.tokenizer = model_name, api_key, tokenizer
        self.max_model_len = max_model_len
        self.loop = None  # EngineLoop, set by the server once constructed
        self.draining = False
        self.metrics = ServerMetrics(self.stats)
        self.token_text = lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t]))

    def stats(self) -> dict:
        return self.loop.stats() if self.loop is not None else {}

    @property
    def ready(self) -> bool:
        loop = self.loop
        return loop is not None and loop.ready and loop.error is None and not self.draining


class RequestStream:
    """A request's token events, moved from the engine thread onto the event loop."""

    def __init__(self, state: ServerState):
        self.queue: asyncio.Queue = asyncio.Queue()
        self._aloop = asyncio.get_running_loop()
        self._metrics = state.metrics

    def sink(self, ev) -> None:  # runs in the engine loop's thread: never block
        if ev.finished and ev.output is not None:
            self._metrics.observe(ev.output)
        self._aloop.call_soon_threadsafe(self.queue.put_nowait, ev)

    async def next_batch(self) -> list:
        """The next event and every other one already queued (one SSE chunk carries them all)."""
        evs = [await self.queue.get()]
        while not self.queue.empty() and not evs[-1].finished:
            evs.append(self.queue.get_nowait())
        return evs


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llmc", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmc = state

    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError) -> JSONResponse:
        if exc.status != 404:
            state.metrics.rejected.labels(str(exc.status)).inc()
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    def require_key(request: Request) -> None:
        if not state.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise HTTPError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                            code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return JSONResponse({"status": "ok"})
        status = "draining" if state.draining else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "llmc", "max_model_len": state.max_model_len}]}

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, chat=True)

    app.include_router(v1)
    return app


async def _generate(state: ServerState, request: Request, chat: bool) -> Response:
    from llmc.runtime.sampling import SamplingParams
    from llmc.serve.engine_loop import QueueFull, ShuttingDown

    if not state.ready:
        raise HTTPError(503, "server is draining" if state.draining else "engine is loading",
                        type_="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        req = P.parse_request(P.ChatCompletionRequest if chat else P.CompletionRequest, await request.body())
        if req.model not in (None, state.model_name):
            raise HTTPError(404, f"the model {req.model!r} does not exist; this server serves {state.model_name!r}",
                            param="model", code="model_not_found")
        prompt: Any = ([{"role": m.role, "content": m.text()} for m in req.messages] if chat
                       else P.single_prompt(req))
        params = SamplingParams(**P.sampling_kwargs(req, state.max_model_len))
    except P.BadRequest as exc:
        raise HTTPError(400, str(exc), param=exc.param) from None
    except LlmcError as exc:  # SamplingParams' own checks
        raise HTTPError(400, str(exc)) from None
    stream = RequestStream(state)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    try:
        # In a worker thread: tokenising a long prompt or rendering a chat template is CPU work
        # the event loop should not wait for while it streams to everyone else.
        rid = await asyncio.to_thread(state.loop.submit, prompt, params, stream.sink, chat=chat, request_id=rid)
    except ShuttingDown:
        raise HTTPError(503, "server is draining", type_="service_unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except QueueFull as exc:
        raise HTTPError(503, str(exc), type_="service_unavailable", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except LlmcError as exc:
        if state.loop.error is not None:
            raise HTTPError(500, str(exc), type_="internal_error") from None
        raise HTTPError(400, str(exc), param="prompt") from None  # a prompt this engine cannot take
    shape = P.ResponseShape(chat, str(rid), state.model_name)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse_events(state, stream, rid, shape, include_usage, params.logprobs is not None),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(state, stream, rid, shape, request, params.logprobs is not None)


class _Accumulator:
    """Text and logprobs of a request so far, in the endpoint's logprobs format."""

    def __init__(self, state: ServerState, chat: bool, want_logprobs: bool):
        self.state, self.chat, self.want = state, chat, want_logprobs
        self.text_len = 0

    def logprobs(self, evs: list) -> dict | None:
        if not self.want:
            return None
        entries = [e for ev in evs for e in (ev.logprobs or [])]
        if self.chat:
            return P.chat_logprobs(entries, self.state.token_text)
        return P.completion_logprobs(entries, self.state.token_text, self.text_len)


def _usage(out) -> dict:
    return P.usage(len(out.prompt_token_ids), len(out.output_token_ids), out.num_cached_tokens)


def _error_status(state: ServerState) -> int:
    """A request that failed inside the engine: the engine's fault (500) or the request's (400,
    e.g. a prompt that can never fit the KV pool)."""
    return 500 if state.loop.error is not None else 400


async def _collect(state: ServerState, stream: RequestStream, rid, shape: P.ResponseShape, request: Request,
                   want_logprobs: bool) -> Response:
    """Wait for the whole answer; abort the request if the client goes away first."""
    acc = _Accumulator(state, shape.chat, want_logprobs)
    evs: list = []
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while not (evs and evs[-1].finished):
            get = asyncio.ensure_future(stream.next_batch())
            await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                state.loop.abort(rid)
                return Response(status_code=499)
            evs += get.result()
    finally:
        disconnect.cancel()
    out = evs[-1].output
    if out.finish_reason == "error":
        raise HTTPError(_error_status(state), out.error or "generation failed")
    text = "".join(ev.text for ev in evs)
    return JSONResponse(shape.full(text, out.finish_reason, acc.logprobs(evs), _usage(out)))


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _sse_events(state: ServerState, stream: RequestStream, rid, shape: P.ResponseShape,
                      include_usage: bool, want_logprobs: bool) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per batch of new tokens, the finish reason, usage, [DONE].

    If the client disconnects, Starlette cancels this generator; `finally` aborts the request.
    """
    acc = _Accumulator(state, shape.chat, want_logprobs)
    finished = False
    try:
        if shape.chat:  # OpenAI's first chat chunk carries the role
            yield _sse(shape.chunk("", None, None, include_usage, first=True))
        while not finished:
            evs = await stream.next_batch()
            finished = evs[-1].finished
            text = "".join(ev.text for ev in evs)
            out = evs[-1].output if finished else None
            if out is not None and out.finish_reason == "error":
                yield _sse(P.error_body(out.error or "generation failed", code=_error_status(state)))
                break
            lp = acc.logprobs(evs)
            if text or lp or finished:
                yield _sse(shape.chunk(text, out.finish_reason if out else None, lp, include_usage))
                acc.text_len += len(text)
            if out is not None and include_usage:
                yield _sse(shape.usage_chunk(_usage(out)))
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            state.loop.abort(rid)

