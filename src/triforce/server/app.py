"""The HTTP face of the server: OpenAI routes, API-key checks, Server-Sent Events, health, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .openai import FINISH, RequestError, chunk, full_response, parse_request, usage
from .worker import Job, Server


async def sse_events(job: Job, model: str) -> AsyncIterator[str]:
    """The SSE stream of one job; closing it (client gone) cancels the generation."""
    def line(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    kind = job.request.kind
    try:
        if kind == "chat":
            yield line(chunk(kind, job.id, job.created, model, delta={"role": "assistant", "content": ""}))
        while True:
            event, payload = await job.events.get()
            if event == "text":
                yield line(chunk(kind, job.id, job.created, model, delta={"content": payload}, text=payload))
            elif event == "error":
                yield line(payload.body())
                break
            else:
                finish = FINISH.get(payload.finish_reason, "stop")
                yield line(chunk(kind, job.id, job.created, model, finish=finish))
                if job.request.include_usage:
                    last = chunk(kind, job.id, job.created, model)
                    last["choices"] = []
                    last["usage"] = usage(payload)
                    yield line(last)
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op when finished; stops the engine when the client left


def create_app(server: Server, api_key: str | None = None) -> FastAPI:
    """The application. With `api_key`, every /v1 route wants `Authorization: Bearer <api_key>`
    (401 otherwise); /health and /metrics stay open, as in vLLM's server."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        server.shutdown()

    app = FastAPI(title="triforce", lifespan=lifespan)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def error_response(endpoint: str, exc: RequestError) -> JSONResponse:
        server.counters.request(endpoint, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if expected is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                error = RequestError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                     code="invalid_api_key")
                return error_response(request.url.path.removeprefix("/v1/"), error)
        return await call_next(request)

    async def completion(request: Request, kind: str) -> Any:
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError(400, "the request body is not valid JSON") from None
            job = Job(parse_request(body, kind, server), asyncio.get_running_loop())
            server.submit(job)
        except RequestError as exc:
            return error_response(endpoint, exc)
        if job.request.stream:
            server.counters.request(endpoint, 200)
            return StreamingResponse(sse_events(job, server.model_id), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    continue
                if event == "error":
                    return error_response(endpoint, payload)
                if event == "done":
                    server.counters.request(endpoint, 200)
                    return JSONResponse(full_response(kind, job.id, job.created, server.model_id, payload))
        finally:
            job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await completion(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await completion(request, "completion")

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                            "owned_by": "triforce", "max_model_len": server.max_context}]}

    @app.get("/health")
    async def health() -> Any:
        alive = server.worker.is_alive() and not server.stopping.is_set()
        return JSONResponse({"status": "ok" if alive else "unavailable", "queue_depth": server.waiting,
                             "running": server.running}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Any:
        text = server.counters.render(server.waiting, server.running, server.batcher.passes,
                                      server.batcher.sequence_passes)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
