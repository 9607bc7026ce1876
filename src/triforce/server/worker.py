"""The server's queue and worker: admitting requests, decoding them together, cancelling them.

Requests wait in a bounded FIFO queue (429 with Retry-After when it is full). The worker runs up
to `max_batch` of them at once (continuous batching): each has its own engine and caches, built
with the server's ForwardBatcher, so a step reads the weights once for all of them. A request
joins as soon as a slot is free and its KV memory fits; its prefill runs chunk by chunk between
the others' decoding steps. A client that disconnects cancels its generation at the next step.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..batcher import ForwardBatcher
from ..engine import Engine
from ..errors import TriforceError
from ..loading import LoadedModel
from ..metrics import ServingCounters
from ..rope import resolve_scaling
from ..settings import EngineSettings
from .openai import Request, RequestError, from_engine_error


@dataclass
class Job:
    """An admitted request and the channel its events go back on (to the event loop)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def emit(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Server:
    """The model, the default settings, the queue and the worker thread."""

    def __init__(self, target: LoadedModel, settings: EngineSettings, max_queue: int, max_context: int,
                 model_id: str, max_batch: int = 1) -> None:
        self.target, self.settings = target, settings
        self.max_queue, self.max_context, self.model_id = max_queue, max_context, model_id
        self.max_batch = max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0
        self.running = 0
        self.lock = threading.Lock()
        self.counters = ServingCounters()
        self.stopping = threading.Event()
        self.batcher = ForwardBatcher()
        self.worker = threading.Thread(target=self._work, name="triforce-engine", daemon=True)

    def start(self) -> None:
        """Fix the target's RoPE scaling for max_context (a server's scaling is set by its
        context, as in other servers, so batch mates share one rotary table), then take requests."""
        engine = Engine(self.target, self.settings)
        engine.reserve(self.max_context)  # refuses a context that cannot fit at all
        engine.release()
        dec = self.target.decoder
        dec.rope_override = resolve_scaling(self.target.config, dec.rope_override, self.max_context)
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
                engine = Engine(self.target, job.request.settings, batcher=self.batcher)
                try:
                    engine.prepare(len(job.request.prompt_ids) + job.request.max_tokens)
                except TriforceError as exc:
                    engine.release()
                    if self.batcher.live:  # memory is held by running requests: wait for them
                        held = job
                        break
                    job.emit("error", from_engine_error(exc))
                    continue
                with self.lock:
                    self.running += 1
                self.batcher.add(lambda job=job, engine=engine: self._generate(job, engine),
                                 on_exit=lambda engine=engine: self._finished(engine), key=engine.id)
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

    def _finished(self, engine: Engine) -> None:
        engine.release()  # the request's caches go back to the system now
        with self.lock:
            self.running -= 1

    def _generate(self, job: Job, engine: Engine) -> None:
        request = job.request
        try:
            generation = engine.stream(request.prompt_ids, max_new_tokens=request.max_tokens, stop=request.stop,
                                       **request.sampling)
            for piece in generation:
                if job.cancelled.is_set():
                    generation.close()
                    self.counters.cancel()
                    return
                if piece:
                    job.emit("text", piece)
            result = generation.result
        except TriforceError as exc:
            job.emit("error", from_engine_error(exc))
            return
        except Exception as exc:  # keep serving: report this request's failure only
            job.emit("error", RequestError(500, f"generation failed: {type(exc).__name__}: {exc}"))
            return
        assert result is not None
        self.counters.finished(result.prompt_tokens, result.stats)
        job.emit("done", result)
