"""`triforce serve`: an OpenAI-compatible HTTP server with TriForce underneath.

One model, one engine, one worker thread: requests wait in a bounded FIFO queue (429 with
Retry-After when it is full) and run one at a time. Text streams back as Server-Sent Events in
the OpenAI chunk format. A client that disconnects cancels its generation at the next step.
Unsupported parameters are refused with HTTP 400 and an OpenAI-style error body, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .batch import ForwardBatcher
from .errors import TriforceError
from .generation import METHODS, TriForce
from .loading import LoadedModel
from .rope import resolve_scaling

# Parameters OpenAI clients send that we do not implement: refused when set to anything but their
# neutral value (so default-filled client requests still work).
NEUTRAL = {
    "n": 1, "logprobs": False, "top_logprobs": None, "logit_bias": None, "presence_penalty": 0,
    "frequency_penalty": 0, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
    "parallel_tool_calls": None, "echo": False, "best_of": 1, "suffix": None, "response_format": None,
    "service_tier": None, "store": False, "metadata": None, "modalities": None, "audio": None,
    "prediction": None, "reasoning_effort": None, "web_search_options": None,
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "user",
          "triforce"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_KEYS = COMMON | {"prompt"}
EXTENSION_KEYS = {"method", "budget", "gamma", "draft_gamma", "chunk_size", "sink", "window", "rebuild_every"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "service_unavailable"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    stop: list[str]
    overrides: dict[str, Any]
    stream: bool
    include_usage: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def emit(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Metrics:
    """Counters exposed at /metrics in Prometheus text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.generated_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self.cancelled = 0
        self.spec: dict[str, dict[str, int]] = {}

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def finished(self, prompt_tokens: int, stats: dict[str, Any]) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += stats.get("new_tokens", 0)
            self.prefill_s += stats.get("prefill_s", 0.0)
            self.decode_s += stats.get("decode_s", 0.0)
            for level in stats.get("levels", []):
                if "num_drafts" not in level:
                    continue
                entry = self.spec.setdefault(level["name"], {"drafts": 0, "draft_tokens": 0, "accepted": 0})
                entry["drafts"] += level["num_drafts"]
                entry["draft_tokens"] += level["num_draft_tokens"]
                entry["accepted"] += level["num_accepted_tokens"]

    def render(self, queue_depth: int, running: int, passes: int = 0, sequence_passes: int = 0) -> str:
        out = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP triforce:{name} {help_text}")
            out.append(f"# TYPE triforce:{name} {kind}")
            for labels, value in samples:
                out.append(f"triforce:{name}{labels} {value}")

        with self.lock:
            metric("requests_total", "counter", "HTTP requests by endpoint and status.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("queue_depth", "gauge", "Requests waiting for the engine.", [("", queue_depth)])
            metric("requests_running", "gauge", "Requests being generated.", [("", running)])
            metric("forward_passes_total", "counter", "Model passes run (each reads the weights once).",
                   [("", passes)])
            metric("batched_sequences_total", "counter", "Sum over passes of the requests each served "
                   "(divided by forward_passes_total: the mean batch size).", [("", sequence_passes)])
            metric("requests_cancelled_total", "counter", "Generations cancelled by client disconnects.",
                   [("", self.cancelled)])
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("prefill_seconds_total", "counter", "Seconds spent reading prompts.",
                   [("", round(self.prefill_s, 4))])
            metric("decode_seconds_total", "counter", "Seconds spent generating.", [("", round(self.decode_s, 4))])
            spec = (("drafts", "spec_decode_num_drafts_total", "Verification steps, per drafting level."),
                    ("draft_tokens", "spec_decode_num_draft_tokens_total", "Draft tokens proposed."),
                    ("accepted", "spec_decode_num_accepted_tokens_total", "Draft tokens accepted."))
            for key, name, text in spec:
                metric(name, "counter", text,
                       [(f'{{level="{level}"}}', v[key]) for level, v in sorted(self.spec.items())])
        return "\n".join(out) + "\n"


class Server:
    """The engine, its queue and worker, and the request handling independent of the web stack.

    The worker runs up to `max_batch` requests at once (continuous batching): each has its own
    engine and caches, and their forward passes run together (batch.ForwardBatcher), so a step
    reads the weights once for all of them. A request joins as soon as a slot is free and its KV
    memory fits; its prefill runs chunk by chunk between the others' decoding steps."""

    def __init__(self, target: LoadedModel, draft: LoadedModel | str | None, method: str, knobs: dict[str, Any],
                 max_queue: int, max_context: int, model_id: str, max_batch: int = 1) -> None:
        self.target, self.draft = target, draft
        self.engine = TriForce(target, draft, method=method, **knobs)  # validates the settings
        self.defaults = {"method": method, **knobs}
        self.max_queue, self.max_context, self.model_id = max_queue, max_context, model_id
        self.max_batch = max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0
        self.running = 0
        self.lock = threading.Lock()
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.batcher = ForwardBatcher()
        self.worker = threading.Thread(target=self._work, name="triforce-engine", daemon=True)

    def start(self) -> None:
        """Fix the target's RoPE scaling for --max-context (a server's scaling is set by its
        context, as in other servers, so batch mates share one rotary table), then take requests."""
        self.engine.reserve(self.max_context)  # refuses a context that cannot fit at all
        dec = self.target.decoder
        dec.rope_override = resolve_scaling(self.target.config, dec.rope_override, self.max_context)
        self.engine.release()
        self.worker.start()

    # -- admission ------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.lock:
            if self.stopping.is_set():
                raise RequestError(503, "the server is shutting down")
            if self.waiting >= self.max_queue:
                raise RequestError(429, f"the request queue is full ({self.max_queue} waiting); retry later",
                                   code="queue_full", headers={"Retry-After": str(self._retry_after())})
            self.waiting += 1
        self.queue.put(job)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.waiting * 2 / self.max_batch))

    def shutdown(self) -> None:
        """Stop taking work; queued requests are told the server is going away."""
        self.stopping.set()
        self.queue.put(None)

    # -- the worker -----------------------------------------------------------------------------
    def _work(self) -> None:
        held: Job | None = None  # the next request, waiting for memory its batch mates hold
        while True:
            while self.batcher.live < self.max_batch and not self.stopping.is_set():
                job = held
                if job is None:
                    try:
                        job = self.queue.get(timeout=None if self.batcher.live == 0 else 0)
                    except queue.Empty:
                        break
                    if job is None:
                        break
                    with self.lock:
                        self.waiting -= 1
                held = None
                if job.cancelled.is_set():
                    continue
                engine = self._engine_for(job)
                if engine is None:
                    continue
                try:
                    engine.prepare(len(job.prompt_ids) + job.max_tokens)
                except TriforceError as exc:
                    engine.release()
                    if self.batcher.live:  # memory is held by running requests: wait for them
                        held = job
                        break
                    job.emit("error", RequestError(400, str(exc)))
                    continue
                with self.lock:
                    self.running += 1
                self.batcher.add(lambda job=job, engine=engine: self._generate(job, engine),
                                 on_exit=lambda engine=engine: self._finished(engine))
            if self.stopping.is_set() and self.batcher.live == 0:
                break
            if self.batcher.live:
                self.batcher.step(timeout=0.05)
        for job in [held] + self._drain():
            if job is not None:
                job.emit("error", RequestError(503, "the server is shutting down"))

    def _drain(self) -> list[Job | None]:
        jobs = []
        while not self.queue.empty():
            jobs.append(self.queue.get_nowait())
        return jobs

    def _engine_for(self, job: Job) -> TriForce | None:
        try:
            return TriForce(self.target, self.draft, **{**self.defaults, **job.overrides})
        except TriforceError as exc:
            job.emit("error", RequestError(400, str(exc)))
            return None

    def _finished(self, engine: TriForce) -> None:
        engine.release()  # the request's caches go back to the system now
        with self.lock:
            self.running -= 1

    def _generate(self, job: Job, engine: TriForce) -> None:
        try:
            run = engine.steps(job.prompt_ids, max_new_tokens=job.max_tokens, stop=job.stop,
                               on_text=lambda piece: job.emit("text", piece), **job.sampling)
            for _ in run:
                if job.cancelled.is_set():
                    run.close()
                    with self.metrics.lock:
                        self.metrics.cancelled += 1
                    return
            result = engine.last_result
        except TriforceError as exc:
            job.emit("error", RequestError(400, str(exc)))
            return
        except Exception as exc:  # keep serving: report this request's failure only
            job.emit("error", RequestError(500, f"generation failed: {type(exc).__name__}: {exc}"))
            return
        self.metrics.finished(result.prompt_tokens, result.stats)
        job.emit("done", result)


# -- request parsing ----------------------------------------------------------------------------------
def _number(body: dict, key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"'{key}' must be a number", key)
    if not low <= value <= high:
        raise RequestError(400, f"'{key}' must be between {low} and {high}, got {value}", key)
    return float(value)


def _integer(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{key}' must be an integer", key)
    if value < low or (high is not None and value > high):
        raise RequestError(400, f"'{key}' must be an integer >= {low}" + (f" and <= {high}" if high else ""), key)
    return value


def parse_request(server: Server, body: Any, kind: str, loop: asyncio.AbstractEventLoop) -> Job:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    allowed = CHAT_KEYS if kind == "chat" else COMPLETION_KEYS
    for key, value in body.items():
        if key in allowed:
            continue
        if key in NEUTRAL:
            if value == NEUTRAL[key] or (value is None):
                continue
            raise RequestError(400, f"'{key}' is not supported by this server", key, "unsupported_parameter")
        raise RequestError(400, f"unrecognized request argument: '{key}'", key, "unsupported_parameter")
    model = body.get("model")
    if model is not None and model != server.model_id:
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{server.model_id}'",
                           "model", "model_not_found")
    tok = server.target.tokenizer
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise RequestError(400, "each message needs a role of system, user or assistant", "messages")
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise RequestError(400, "only text content parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(400, "message content must be a string or text parts", "messages")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        try:
            prompt_ids = tok.encode_chat(clean)
        except TriforceError as exc:
            raise RequestError(400, str(exc), "messages") from None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError(400, "'prompt' is empty", "prompt")
            prompt_ids = tok.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            if not all(0 <= t < server.target.config.vocab_size for t in prompt):
                raise RequestError(400, "'prompt' has a token id outside the vocabulary", "prompt")
            prompt_ids = list(prompt)
        else:
            raise RequestError(400, "'prompt' must be a string, or a list of token ids (one prompt per request)",
                               "prompt")
    if len(prompt_ids) >= server.max_context:
        raise RequestError(400, f"the prompt has {len(prompt_ids)} tokens; this server's context is "
                                f"{server.max_context}", "messages" if kind == "chat" else "prompt",
                           "context_length_exceeded")
    max_tokens = _integer(body, "max_completion_tokens", 1) if kind == "chat" else None
    max_tokens = max_tokens or _integer(body, "max_tokens", 1)
    room = server.max_context - len(prompt_ids)
    if max_tokens is None:
        max_tokens = min(room, 16 if kind == "completion" else 1024)
    elif max_tokens > room:
        raise RequestError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds this "
                                f"server's context of {server.max_context}", "max_tokens", "context_length_exceeded")
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 1e-9, 1.0, 1.0)
    top_k = _integer(body, "top_k", 0) or 0
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "'seed' must be an integer", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError(400, "'stream_options' supports only include_usage", "stream_options")
    overrides = body.get("triforce") or {}
    if not isinstance(overrides, dict) or set(overrides) - EXTENSION_KEYS:
        raise RequestError(400, f"'triforce' accepts only {', '.join(sorted(EXTENSION_KEYS))}", "triforce")
    if "method" in overrides and overrides["method"] not in METHODS:
        raise RequestError(400, f"'triforce.method' must be one of {', '.join(METHODS)}", "triforce")
    if overrides.get("method") in ("speculative", "triforce") and server.draft is None:
        raise RequestError(400, "this server has no draft model for that method", "triforce")
    for key in EXTENSION_KEYS - {"method"}:
        if key in overrides:
            _integer(overrides, key, 0 if key == "sink" else 1)
    return Job(kind=kind, prompt_ids=prompt_ids, max_tokens=max_tokens,
               sampling={"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed},
               stop=stop, overrides=overrides, stream=stream, include_usage=bool(options.get("include_usage")),
               loop=loop)


# -- responses -------------------------------------------------------------------------------------
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(result: Any) -> dict[str, Any]:
    levels = [
        {k: level[k] for k in ("name", "num_drafts", "num_draft_tokens", "num_accepted_tokens",
                               "draft_acceptance_rate", "mean_acceptance_length")}
        for level in result.stats["levels"] if "num_drafts" in level
    ]
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "total_tokens": result.prompt_tokens + len(result.token_ids),
        "speculative": {"method": result.stats["method"], "levels": levels,
                        "ms_per_token": result.stats["ms_per_token"]},
    }


def chunk(job: Job, model: str, delta: dict | None = None, text: str | None = None,
          finish: str | None = None) -> dict[str, Any]:
    if job.kind == "chat":
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": job.created,
                "model": model, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def full_response(job: Job, model: str, result: Any) -> dict[str, Any]:
    finish = FINISH.get(result.finish_reason, "stop")
    if job.kind == "chat":
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": job.created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": finish, "logprobs": None}],
                "usage": usage(result)}
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(result)}


async def sse_events(job: Job, model: str) -> AsyncIterator[str]:
    """The SSE stream of one job; closing it (client gone) cancels the generation."""
    def line(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        if job.kind == "chat":
            yield line(chunk(job, model, delta={"role": "assistant", "content": ""}))
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                yield line(chunk(job, model, delta={"content": payload}, text=payload))
            elif kind == "error":
                yield line(payload.body())
                break
            else:
                yield line(chunk(job, model, finish=FINISH.get(payload.finish_reason, "stop")))
                if job.include_usage:
                    last = chunk(job, model)
                    last["choices"] = []
                    last["usage"] = usage(payload)
                    yield line(last)
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op when finished; stops the engine when the client left


def create_app(server: Server) -> Any:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        server.shutdown()

    app = FastAPI(title="triforce", lifespan=lifespan)

    def error_response(endpoint: str, exc: RequestError) -> JSONResponse:
        server.metrics.request(endpoint, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def completion(request: Request, kind: str) -> Any:
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError(400, "the request body is not valid JSON") from None
            job = parse_request(server, body, kind, asyncio.get_running_loop())
            server.submit(job)
        except RequestError as exc:
            return error_response(endpoint, exc)
        if job.stream:
            server.metrics.request(endpoint, 200)
            return StreamingResponse(sse_events(job, server.model_id), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    kind_, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind_ == "error":
                    return error_response(endpoint, payload)
                if kind_ == "done":
                    server.metrics.request(endpoint, 200)
                    return JSONResponse(full_response(job, server.model_id, payload))
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
        return PlainTextResponse(server.metrics.render(server.waiting, server.running, server.batcher.passes,
                                                       server.batcher.sequence_passes),
                                 media_type="text/plain; version=0.0.4")

    return app
