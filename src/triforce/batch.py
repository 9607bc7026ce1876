"""Batched generation: many prompts decoded together, each exactly as it would be alone.

Each request gets its own engine (caches, chain of levels, random generator), all built with one
ForwardBatcher, so every step runs the live sequences' passes as one (see batcher.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .batcher import ForwardBatcher
from .cache import check_fits
from .engine import Engine, GenerationResult
from .errors import SettingError, TriforceError
from .loading import LoadedModel
from .settings import EngineSettings


@dataclass
class BatchRun:
    results: list[GenerationResult | TriforceError]  # per request, in order
    passes: int  # decoder passes run
    sequence_passes: int  # sum over passes of the sequences in each


def generate_batch(target: LoadedModel, requests: list[dict[str, Any]],
                   settings: EngineSettings | None = None) -> list[GenerationResult | TriforceError]:
    """Generate for several prompts at once; one GenerationResult (or the TriforceError that
    request raised) per request, in order. Each request is a dict of `Engine.stream` arguments
    (`prompt` required); each sequence is exactly what it would be alone, seeds included."""
    batcher = ForwardBatcher()
    engines = [Engine(target, settings, batcher=batcher) for _ in requests]
    return run_batch(engines, requests).results


def run_batch(engines: list[Engine], requests: list[dict[str, Any]], release: bool = True) -> BatchRun:
    """Run request i on engines[i] (engines over the same models, built with one batcher), all
    as one batch. With release=False the engines keep their caches and cached prompts
    (benchmarks reuse a prefilled prompt across runs)."""
    if len(engines) != len(requests):
        raise ValueError("one engine per request")
    batcher = engines[0].batcher if engines else None
    if batcher is None or any(engine.batcher is not batcher for engine in engines):
        raise ValueError("the engines of a batch share one ForwardBatcher")
    totals = []
    for engine, request in zip(engines, requests):
        if "prompt" not in request:
            raise SettingError("prompt", "is missing from a batch request")
        ids = engine.encode_prompt(request["prompt"], request.get("chat", False))
        totals.append(len(ids) + int(request.get("max_new_tokens", 128)))
    need = sum(engine.memory_needed(engine.capacity_for(total)) for engine, total in zip(engines, totals))
    held = sum(engine.memory_held() for engine in engines)  # already allocated: not needed again
    advice = "use shorter contexts or fewer sequences" + (
        "; with kv_offload, a kv_ram_budget per sequence (the default is half the memory for each)"
        if engines and engines[0].settings.kv_offload else "")
    check_fits(max(0, need - held), f"a batch of {len(requests)} sequences ({sum(totals)} tokens)", advice)
    prepare_shared(engines, totals)
    results: list[Any] = [None] * len(requests)

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

    passes, sequence_passes = batcher.passes, batcher.sequence_passes
    for index in range(len(requests)):
        batcher.add(job(index), key=engines[index].id)
    batcher.run_until_done()
    return BatchRun(results, batcher.passes - passes, batcher.sequence_passes - sequence_passes)


def prepare_shared(engines: list[Engine], totals: list[int]) -> None:
    """Allocate every sequence's caches and fix the shared decoders' rotary tables before the
    threads start, so no sequence replaces a table its batch mates are using. Refused when the
    sequences would need different RoPE scalings (past the model's trained length with automatic
    scaling): a sequence must decode exactly as it would alone."""
    if not engines:
        return
    decoders = [engines[0].target.decoder]
    draft = engines[0].settings.draft
    if isinstance(draft, LoadedModel):
        decoders.append(draft.decoder)
    order = sorted(range(len(engines)), key=lambda i: totals[i])
    for i in order:
        engines[i].prepare(totals[i])
    tables = [dec.rope for dec in decoders]
    for i in order:  # a second pass must change nothing
        engines[i].prepare(totals[i])
    if any(dec.rope is not table for dec, table in zip(decoders, tables)):
        raise TriforceError(
            "these prompts need different RoPE scalings (some run past the model's trained length); "
            "batch prompts of similar length, or set the RoPE scaling explicitly"
        )
