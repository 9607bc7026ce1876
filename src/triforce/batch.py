"""Batched generation: many sequences decoded together, each exactly as it would be alone.

Each sequence runs its own generation (its own engine, caches, chain of levels and random
generator) in a thread of its own. Where that generation would run a model forward pass, it
hands the pass to a `ForwardBatcher` and waits. Once every live sequence is waiting, the
batcher runs all passes that use the same decoder as one `Decoder.forward_batch` (the weights
are read once per step for the whole batch; attention runs per sequence against its own cache)
and wakes them. So sequences accept different numbers of draft tokens, keep their own cache
lengths, retrieval selections and StreamingLLM windows, and leave the batch when done; a long
prompt's prefill runs chunk by chunk between the others' decoding steps.

Threads only coordinate: the tensor work of a step happens in the batcher's thread, and the
per-sequence bookkeeping (sampling, acceptance) is short Python between steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import TriforceError
from .model import Decoder, KVCache

_local = threading.local()


def run_forward(decoder: Decoder, tokens: torch.Tensor, cache: KVCache, logits_for: str | torch.Tensor) -> torch.Tensor:
    """A decoder pass for the current sequence: at once, or with its batch mates when the calling
    thread belongs to a ForwardBatcher."""
    batcher = getattr(_local, "batcher", None)
    if batcher is None:
        return decoder.forward(tokens, cache, logits_for=logits_for)
    return batcher.submit(decoder, tokens, cache, logits_for)


@dataclass
class _Pass:
    decoder: Decoder
    tokens: torch.Tensor
    cache: KVCache
    logits_for: str | torch.Tensor
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class ForwardBatcher:
    """Runs sequence jobs in threads and their forward passes together (see the module doc)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._pending: list[_Pass] = []
        self._live = 0
        self._closed = False
        self.threads = torch.get_num_threads()  # the stepping thread's: its kernels use them all
        self.passes = 0  # decoder passes run
        self.sequence_passes = 0  # sum over passes of the sequences in each

    @property
    def live(self) -> int:
        return self._live

    # -- the sequences' side -----------------------------------------------------------------
    def submit(self, decoder: Decoder, tokens: torch.Tensor, cache: KVCache,
               logits_for: str | torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] != 1:
            raise ValueError("batched sequences run one row each")
        work = _Pass(decoder, tokens, cache, logits_for)
        with self._cv:
            self._pending.append(work)
            if len(self._pending) >= self._live:  # only the last to arrive wakes the stepping thread
                self._cv.notify_all()
        # Each sequence waits on its own event: a shared condition woke every waiting sequence at
        # every submission and every step (4 sequences: ~20 wake-ups, each taking the GIL, per step).
        work.done.wait()
        if work.error is not None:
            raise work.error
        assert work.result is not None
        return work.result

    def add(self, job: Callable[[], Any], on_exit: Callable[[], None] | None = None) -> threading.Thread:
        """Start `job` (a whole generation) as a member of the batch."""

        def member() -> None:
            _local.batcher = self
            # A sequence thread only samples and keeps books between passes; with PyTorch's
            # default it would start an OpenMP team of its own per thread, whose spinning workers
            # fight the batcher's kernels for the cores (a batch of one ran 1.6x slower than alone).
            torch.set_num_threads(1)
            try:
                job()
            finally:
                torch.set_num_threads(self.threads)  # the process-wide default new threads inherit
                _local.batcher = None
                if on_exit is not None:
                    on_exit()
                with self._cv:
                    self._live -= 1
                    self._cv.notify_all()

        with self._cv:
            self._live += 1
        thread = threading.Thread(target=member, daemon=True, name="triforce-sequence")
        thread.start()
        return thread

    # -- the stepping side ---------------------------------------------------------------------
    def step(self, timeout: float | None = None) -> bool:
        """Wait until every live sequence waits on a pass, then run them; False if nothing ran
        (no live sequences, or the timeout passed)."""
        with self._cv:
            ready = self._cv.wait_for(lambda: self._live > 0 and len(self._pending) >= self._live, timeout)
            if not ready:
                return False
            work, self._pending = self._pending, []
        groups: dict[int, list[_Pass]] = {}
        for item in work:
            groups.setdefault(id(item.decoder), []).append(item)
        for items in groups.values():
            try:
                if len(items) == 1:
                    it = items[0]
                    results = [it.decoder.forward(it.tokens, it.cache, logits_for=it.logits_for)]
                else:
                    results = items[0].decoder.forward_batch([(it.tokens, it.cache, it.logits_for) for it in items])
                for it, result in zip(items, results):
                    it.result = result
            except BaseException as exc:  # noqa: BLE001 - handed to the sequences that asked
                for it in items:
                    it.error = exc
            self.passes += 1
            self.sequence_passes += len(items)
        for item in work:
            item.done.set()
        return True

    def run_until_done(self) -> None:
        """Step until every sequence has finished."""
        while True:
            with self._cv:
                if self._live == 0:
                    return
            self.step(timeout=0.05)


def generate_batch(
    target: Any,
    draft: Any,
    requests: list[dict[str, Any]],
    method: str = "autoregressive",
    **knobs: Any,
) -> list[Any]:
    """Generate for several prompts at once; returns one GenerationResult (or TriforceError) per
    request, in order. Each request is a dict of `TriForce.generate` arguments (`prompt`
    required); each sequence is exactly what it would be alone, seeds included."""
    from .generation import TriForce

    engines = [TriForce(target, draft, method=method, **knobs) for _ in requests]
    return run_batch(engines, requests).results


@dataclass
class BatchRun:
    results: list[Any]  # a GenerationResult or TriforceError per request
    passes: int  # decoder passes run
    sequence_passes: int  # sum over passes of the sequences in each


def run_batch(engines: list[Any], requests: list[dict[str, Any]], release: bool = True) -> BatchRun:
    """Run request i on engines[i] (TriForce engines over the same models), all as one batch.
    With release=False the engines keep their caches and cached prompts (benchmarks reuse a
    prefilled prompt across runs)."""
    from .cache import check_fits

    if len(engines) != len(requests):
        raise ValueError("one engine per request")
    totals = []
    for engine, request in zip(engines, requests):
        if "prompt" not in request:
            raise TriforceError("each batch request needs a 'prompt'")
        ids = engine.encode_prompt(request["prompt"], request.get("chat", False))
        totals.append(len(ids) + int(request.get("max_new_tokens", 128)))
    need = sum(engine.memory_needed(engine.capacity_for(total)) for engine, total in zip(engines, totals))
    held = sum(engine.memory_held() for engine in engines)  # already allocated: not needed again
    check_fits(max(0, need - held), f"a batch of {len(requests)} sequences ({sum(totals)} tokens)")
    prepare_shared(engines, totals)
    results: list[Any] = [None] * len(requests)
    batcher = ForwardBatcher()

    def job(index: int) -> Callable[[], None]:
        def run() -> None:
            try:
                results[index] = engines[index].generate(**requests[index])
            except TriforceError as exc:
                results[index] = exc
            finally:
                if release:
                    engines[index].release()

        return run

    for index in range(len(requests)):
        batcher.add(job(index))
    batcher.run_until_done()
    return BatchRun(results, batcher.passes, batcher.sequence_passes)


def prepare_shared(engines: list[Any], totals: list[int]) -> None:
    """Allocate every sequence's caches and fix the shared decoders' rotary tables before the
    threads start, so no sequence replaces a table its batch mates are using. Refused when the
    sequences would need different RoPE scalings (past the model's trained length with automatic
    scaling): a sequence must decode exactly as it would alone."""
    if not engines:
        return
    decoders = [engines[0].target.decoder]
    if hasattr(engines[0].draft, "decoder"):
        decoders.append(engines[0].draft.decoder)
    order = sorted(range(len(engines)), key=lambda i: totals[i])
    for i in order:
        engines[i].prepare(totals[i])
    tables = [dec.rope for dec in decoders]
    for i in order:  # a second pass must change nothing
        engines[i].prepare(totals[i])
    if any(dec.rope is not table for dec, table in zip(decoders, tables)):
        raise TriforceError(
            "these prompts need different RoPE scalings (some run past the model's trained length); "
            "batch prompts of similar length, or pass --rope-scaling explicitly"
        )
