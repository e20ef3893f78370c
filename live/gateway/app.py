"""``staircase serve``'s HTTP routes (FastAPI): ``POST /v1/chat/completions`` (server-sent
events when ``stream`` is true, with a final usage chunk when
``stream_options.include_usage`` is), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus). Errors come in OpenAI's shape with the offending
parameter named (``staircase.live.gateway.api.ApiError``); a malformed body is a 400, never a 500
with a traceback. A client that goes away cancels its request: every call of it on
every engine.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from staircase.errors import ConfigError
from staircase.trace import RequestRow

from ..engines import EngineError
from .server import Job, StaircaseServer, Stream
from .api import (ApiError, ChatCompletion, ChatCompletionRequest, ErrorResponse, Health, ModelList, StopScan,
                  completion_id, cut_at_stop)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}
# each server-sent event: data is a chat.completion.chunk object as JSON, or an error object, or [DONE]
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
SSE = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
             "description": "the completion (JSON), or its chunks as server-sent events when stream is true"}}


def create_app(server: StaircaseServer, on_ready=None, on_stop=None) -> FastAPI:
    """The app around ``server``; its life starts the engines (then ``on_ready()``) and,
    at the end, stops the server (``StaircaseServer.shutdown``; then ``on_stop(summary)``)."""

    @asynccontextmanager
    async def life(app: FastAPI):
        try:
            await server.startup()
        except (ConfigError, EngineError) as err:  # an engine that cannot start: one line, not a traceback
            server.failed = err  # (the uvicorn loop sees it and stops; ``staircase.live.gateway.serving``)
            yield
            await server.runner.close()
            return
        if on_ready is not None:
            on_ready()
        gc.collect()
        gc.freeze()  # what startup made (modules, engines) is never garbage: full collections skip it
        tasks = [asyncio.create_task(server.flush_every())]
        if server.metrics.multiprocess:
            tasks.append(asyncio.create_task(server.sample_every()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            summary = await server.shutdown()
            if on_stop is not None:
                on_stop(summary)

    app = FastAPI(title="staircase serve", version="1", lifespan=life,
                  description="Mixture-of-Agents with staircase streaming behind the OpenAI chat-completions API.")
    _error_handlers(app)
    _routes(app, server)
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        if "input" in first and not isinstance(first["input"], (dict, list)):
            message += f" (got {str(first['input'])[:80]!r})"
        return JSONResponse(ApiError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):  # e.g. a body that is not JSON text
        body = ApiError(err.status_code, f"body: {err.detail}" if err.status_code == 400 else str(err.detail)).body()
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_request: Request, err: Exception):  # a bug of ours: a named error, no traceback out
        body = {"error": {"message": f"internal error ({type(err).__name__})", "type": "server_error",
                          "param": None, "code": 500}}
        return JSONResponse(body, status_code=500)


def _routes(app: FastAPI, server: StaircaseServer) -> None:
    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS | SSE)
    async def chat(body: ChatCompletionRequest, request: Request, authorization: str | None = Header(None)):
        server.check_key(authorization)
        job = server.admit(body)
        task, stream = server.start(job)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(server, job, task, stream, usage), media_type="text/event-stream")
        row = await _unless_gone(server, request, task)
        if row.outcome != "ok":
            raise ApiError(503, f"the request failed: {row.error}", None)
        return _completion(job, row, server)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models(authorization: str | None = Header(None)):
        server.check_key(authorization)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": server.created,
                                            "owned_by": "staircase"} for m in server.model_names]}

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        body = {"status": "ok" if server.accepting else "stopping", "requests_in_flight": server.in_flight,
                "max_in_flight": server.settings.max_in_flight}
        return JSONResponse(body, status_code=200 if server.accepting else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics():
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _unless_gone(server: StaircaseServer, request: Request, task: asyncio.Task) -> RequestRow:
    """The request's row; if the client disconnects first, the request is cancelled."""
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel("client disconnected")
                await asyncio.gather(task, return_exceptions=True)
                raise ApiError(400, "cancelled: client disconnected")  # (no one reads it)
    finally:
        if not task.done():  # this handler was cancelled (a stop past its grace)
            task.cancel(_reason(server))


def _reason(server: StaircaseServer) -> str:
    return "client disconnected" if server.accepting else "server stopping"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _events(server: StaircaseServer, job: Job, task: asyncio.Task, stream: Stream, usage: bool):
    """The completion as server-sent events: a chunk per delta of the answer (the first
    also names the role), the finish reason, the usage if asked, ``[DONE]``. A failed
    request ends with an error event."""
    head = {"id": completion_id(job.id), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": job.model}
    first, scan = True, StopScan(job.stops)

    def chunk(text: str) -> str:
        nonlocal first
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        first = False
        return _sse(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

    def finish(reason: str) -> str:
        delta = {"role": "assistant", "content": ""} if first else {}
        return _sse(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})
    try:
        while (item := await stream.queue.get()) is not None:
            if text := scan.feed(item[0]):
                yield chunk(text)
            if scan.stopped:  # the answer the client gets ends here; the run goes on to its row
                yield finish("stop")
                yield "data: [DONE]\n\n"
                return
        if text := scan.flush():
            yield chunk(text)
        row = stream.row
        if row is None:  # the run raised (``Stream.broke``)
            yield _sse({"error": {"message": stream.error, "type": "server_error", "param": None, "code": 500}})
        elif row.outcome != "ok":
            yield _sse({"error": ApiError(503, f"the request failed: {row.error}").body()["error"]})
        else:
            yield finish(_finish(row, job))
            if usage:
                yield _sse(head | {"choices": [], "usage": _usage(row, job)})
        yield "data: [DONE]\n\n"
    finally:
        if not task.done() and not scan.stopped:
            task.cancel(_reason(server))


def _finish(row: RequestRow, job: Job) -> str:
    return "length" if row.output_tokens >= job.answer_tokens else "stop"


def _usage(row: RequestRow, job: Job) -> dict:
    return {"prompt_tokens": int(row.query_tokens), "completion_tokens": int(row.output_tokens),
            "total_tokens": int(row.query_tokens + row.output_tokens),
            "staircase": {"policy": job.policy.name, "calls": int(row.calls),
                          "prompt_tokens_all_calls": int(row.prompt_tokens), "cached_tokens": int(row.cached_tokens),
                          "inputs_lost": row.lost or None}}


def _completion(job: Job, row: RequestRow, server: StaircaseServer) -> dict:
    text, stopped = cut_at_stop(row.answer_text or "", job.stops)
    return {"id": completion_id(job.id), "object": "chat.completion", "created": int(time.time()),
            "model": job.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop" if stopped else _finish(row, job)}],
            "usage": _usage(row, job)}
