"""The engine: a target model, its settings and caches; builds a method's chain of levels and
generates with it (prefill, stopping, streaming, statistics).

    engine = Engine(target, EngineSettings(method="triforce", draft="ngram"))
    result = engine.generate("...", max_new_tokens=128, temperature=0.6, top_p=0.9)
    for piece in engine.stream("..."): print(piece, end="")

The caches outlive a generation: a new prompt sharing a prefix with the last one reuses its
rows (prompt caching).
"""

from __future__ import annotations

import itertools
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .batcher import ForwardBatcher
from .cache import (
    FullCache,
    RetrievalView,
    SparseView,
    StreamingCache,
    StreamingView,
    available_memory_bytes,
    check_fits,
)
from .chain import Chain
from .controller import Controller, default_prior_cost
from .errors import SettingError
from .head import FeatureHead
from .levels import FeatureStore, HeadLevel, Level, ModelLevel, PromptLookup, ViewLevel
from .loading import LoadedModel
from .metrics import LevelStats
from .native import MAX_KERNEL_QUERIES
from .offload import (
    DISK_SLOWDOWN,
    CompactRetrieval,
    CompactStreaming,
    CompactView,
    OffloadedCache,
    check_directory,
    offload_plan,
)
from .parallel import Link, StepLog
from .rope import RotaryTable
from .runner import Runner
from .sampling import SamplingParams, draw
from .settings import EngineSettings, LevelSpec
from .stopping import StopChecker

_ENGINE_IDS = itertools.count()
STEP, FINISHED, ABANDONED = 1, 2, 0  # what a generation does next


class _Abandoned(Exception):
    """Rank 0 closed the generation this rank follows."""


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "stop" or "length"
    stats: dict[str, Any] = field(default_factory=dict)
    samples: list[list[int]] | None = None


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SettingError(name, f"must be an integer >= 1, got {value!r}")
    return value


class Engine:
    """Lossless (hierarchical) speculative generation over one target model.

    batcher: when the engine's sequence shares decoder passes with other sequences (batched
    generation, a server), the ForwardBatcher they all submit to. follows: on a tensor-parallel
    rank past 0, the id of rank 0's engine this one copies (tp_worker makes these).
    """

    def __init__(self, target: LoadedModel, settings: EngineSettings | None = None, *,
                 batcher: ForwardBatcher | None = None, progress: bool = False,
                 clock: Callable[[], float] = time.perf_counter, follows: int | None = None) -> None:
        self.target = target
        self.batcher = batcher
        self.progress = progress
        # How rank 0 of a tensor-parallel group names this engine to the other ranks (`follows`: on
        # those, the id of rank 0's engine this one copies), and what it takes from rank 0: its calls,
        # its clock (so every rank plans the same cycles), whether a generation goes on.
        self.group = target.group
        self.id = next(_ENGINE_IDS) if follows is None else follows
        self.link: Link | None = None
        if self.group is not None:
            if batcher is not None and batcher.step_log is None:
                batcher.step_log = StepLog(self.group)
            self.link = Link(self.group, batcher.step_log if batcher is not None else None, self.id)
        # what adaptive speculation times passes with (tests make it deterministic)
        self.clock = self.link.clock if self.link is not None else clock
        self._full: FullCache | None = None
        self._draft_cache: FullCache | StreamingCache | None = None
        # Prompt caching: the tokens whose target KV in self._full are valid, and the signature
        # of the rotary table they were rotated with (another scaling invalidates them).
        self._cached_tokens: list[int] = []
        self._cached_rope: object = None
        self.settings = EngineSettings()
        self.configure(settings or EngineSettings())

    def configure(self, settings: EngineSettings | None = None, **changes: Any) -> None:
        """Switch settings (a new value, or `changes` to the current one) keeping the caches and
        the cached prompt."""
        new = (settings or self.settings).replace(**changes) if changes else (settings or self.settings)
        if isinstance(new.draft, LoadedModel):
            check_draft_compatible(self.target, new.draft)
        if isinstance(new.draft, FeatureHead) and new.draft.target is not self.target.decoder:
            raise SettingError("draft", "is a head loaded for another target: load it with this engine's target")
        if isinstance(new.draft, FeatureHead) and self.group is not None:
            raise SettingError("draft", "is a draft head, which does not run under tensor parallelism; use a draft "
                                        "model or 'ngram'")
        if new.draft is not self.settings.draft:
            self._draft_cache = None
        self.settings = new

    # -- sizes -------------------------------------------------------------------------------
    def capacity_for(self, total: int) -> int:
        """Cache rows a run reaching `total` tokens needs."""
        return total + self.settings.rows_past_context

    def _views_bytes(self, capacity: int, offloaded: bool) -> int:
        """Bytes the views of the target's cache that the levels below the top read take: in
        place (an in-RAM cache) they hold only the retrieval chunks' mean keys; over an offloaded
        cache, copies of the rows they read."""
        s, cfg, dtype = self.settings, self.target.config, self.target.decoder.dtype
        total = 0
        for spec in s.levels:
            if spec.model != "target":
                continue
            if spec.cache == "retrieval":
                total += (CompactRetrieval.bytes_needed(cfg, capacity, s.budget, s.chunk_size, dtype) if offloaded
                          else RetrievalView.bytes_for(cfg, capacity, s.chunk_size))
            elif offloaded:
                total += CompactStreaming.bytes_needed(cfg, s.sink, s.window, dtype)
        return total

    def _offload_plan(self, capacity: int) -> tuple[int, int] | None:
        """(target layers the RAM budget holds whole, RAM tail rows) for a cache on disk, or None
        when the settings keep it in RAM (no kv_offload, or it all fits in the budget)."""
        s, cfg, dec = self.settings, self.target.config, self.target.decoder
        if s.kv_offload is None:
            return None
        if dec.device.type != "cpu":
            raise SettingError("kv_offload", "needs the model on the CPU")
        check_directory(s.kv_offload)
        # by default half of what this engine could have: free memory plus the caches it holds
        budget = s.kv_ram_budget or ((available_memory_bytes() or 2**34) + self.memory_held()) // 2
        if FullCache.bytes_for(cfg, capacity, dec.dtype) + self._views_bytes(capacity, False) <= budget:
            return None
        return offload_plan(cfg, capacity, dec.dtype, budget, self._views_bytes(capacity, True), s.prefill_chunk)

    def memory_needed(self, capacity: int) -> int:
        """Bytes a run of `capacity` tokens allocates (KV caches, selections, rotary tables),
        from each cache's own sizing, before allocating anything."""
        s, cfg, dtype = self.settings, self.target.config, self.target.decoder.dtype
        plan = self._offload_plan(capacity)
        full = FullCache.bytes_for(cfg, capacity, dtype) if plan is None else OffloadedCache.bytes_for(
            cfg, capacity, dtype, *plan)
        total = full + RotaryTable.bytes_for(cfg, capacity) + self._views_bytes(capacity, plan is not None)
        for spec in s.levels:
            if spec.model == "draft" and isinstance(s.draft, LoadedModel):
                dcfg, dtype = s.draft.config, s.draft.decoder.dtype
                if spec.cache == "full":
                    total += FullCache.bytes_for(dcfg, capacity, dtype) + RotaryTable.bytes_for(dcfg, capacity)
                else:
                    rows = StreamingCache.bytes_for(dcfg, s.sink, s.window, dtype)
                    total += rows + RotaryTable.bytes_for(dcfg, s.sink + s.window + StreamingCache.SLACK)
        return total

    def memory_held(self) -> int:
        """Bytes of KV cache this engine holds now (kept between runs for prompt caching)."""
        return sum(c.nbytes for c in (self._full, self._draft_cache) if c is not None)

    def reserve(self, context: int) -> None:
        """Allocate the caches for prompts + outputs of up to `context` tokens now, so serving
        never reallocates (and memory stays flat across requests)."""
        capacity = self.capacity_for(context)
        check_fits(self.memory_needed(capacity), f"a context of {context} tokens")
        self._tell("reserve", context)
        self._full_cache(capacity)
        self.target.decoder.prepare(context, capacity)

    def prepare(self, total: int) -> None:
        """Allocate caches and rotary tables for a run reaching `total` tokens (batching does
        this for every sequence before any starts)."""
        capacity = self.capacity_for(total)
        check_fits(self.memory_needed(capacity), f"a context of {total} tokens")
        self._tell("prepare", total)
        self.target.decoder.prepare(total, capacity)
        self._build_chain(capacity, SamplingParams())

    def release(self) -> None:
        """Free the caches (and forget the cached prompt)."""
        self._tell("release")
        self._free()

    def _free(self) -> None:
        if isinstance(self._full, OffloadedCache):
            self._full.close()
        self._full = self._draft_cache = None
        self._cached_tokens, self._cached_rope = [], None

    # -- chain construction ------------------------------------------------------------------
    def _build_chain(self, capacity: int, params: SamplingParams) -> Chain:
        s = self.settings
        target = self.target.decoder
        if self._cached_rope != target.rope.signature:
            self._cached_tokens = []
        full = self._full_cache(capacity)
        full.truncate(len(self._cached_tokens))
        full.record_queries = any(spec.cache == "retrieval" for spec in s.levels)
        if isinstance(full, OffloadedCache):
            full.visitors = []  # this chain's views register below
        top = ModelLevel("target", Runner(target, s.prefill_chunk, self.batcher), full, params, self.progress)
        top.tokens = list(self._cached_tokens)
        below = [self._level(spec, full, top, params, capacity) for spec in s.levels]
        if below and isinstance(below[0], HeadLevel):  # every model above a head leaves it the features it computes
            for above in [*below[1:], top]:
                assert isinstance(above, ModelLevel)
                above.store = below[0].store
        if not s.adaptive:
            return Chain([*below, top], s.gammas)
        names: list[str | tuple[str, ...]] = [level.name for level in below]
        if isinstance(below[0], (ModelLevel, HeadLevel)) and s.levels[0].model == "draft":  # a hybrid bottom
            below.insert(0, PromptLookup(self.target.config.vocab_size))
            names[0] = ("ngram", names[0])
        # no forced warm-up: a short generation would spend a large part of itself trying every
        # structure; the budgeted probes try them instead
        # speculation must promise 5% over plain decoding: estimates err, and an error that way is a loss
        controller = Controller(names, s.gamma_choices, s.draft_gamma_choices, warmup=False, plain_margin=0.05,
                                prior_cost=self._offloaded_view_prior(full), row_slope=self._row_slope())
        return Chain([*below, top], [], controller, self.clock)

    def _row_slope(self) -> float:
        """The controller's prior cost per extra row of a pass (relative to one row) on the kernels the
        target runs on. `triforce bench kernels --contexts 16384 --queries 1,7 --rows 1,7 --weights auto`
        on the embedded model: 7 rows cost 1.3-1.5 one-row passes on AVX512-BF16 (the bf16 dot products
        keep multi-row passes memory-bound) but 4.2 on AVX2 (bound by float32 multiply-adds; NEON's
        passes are the same float32 multiply-adds, four lanes wide, and take AVX2's prior, not measured
        on an ARM CPU); on PyTorch a verified row attends alone, so at long contexts a row costs nearly
        a step."""
        return {"avx512": 0.1, "avx2": 0.5, "neon": 0.5}.get(self.target.decoder.kernels, 0.8)

    def _offloaded_view_prior(self, full: FullCache) -> dict[str, tuple[float, float]] | None:
        """Before a view of an offloaded cache has run, its pass is priced off the top's RAM traffic
        alone (a view never reads the disk; disk bytes taken as DISK_SLOWDOWN times slower than RAM's):
        with the default prior, a level that could gather many tokens per disk read looks as dear as
        the top and is hardly ever tried."""
        if not isinstance(full, OffloadedCache):
            return None
        layer = full.layer_bytes(full.config, full.capacity, full.dtype)
        ram = self.target.decoder.weight_bytes + full.ram_layers * layer
        share = ram / (ram + DISK_SLOWDOWN * full.disk_layers * layer)
        ratio, slope = default_prior_cost("target-retrieval", self._row_slope())
        return {name: (ratio * share, slope) for name in ("target-retrieval", "target-streaming")}

    def _level(self, spec: LevelSpec, full: FullCache, top: ModelLevel, params: SamplingParams,
               capacity: int) -> Level:
        s = self.settings
        if spec.model == "target":
            view: SparseView | CompactView
            if spec.cache == "retrieval":
                runner = Runner(self.target.copy_in(s.retrieval_weights), s.prefill_chunk, self.batcher)
                if isinstance(full, OffloadedCache):
                    view = CompactRetrieval(full, s.budget, s.chunk_size, rebuild_every=s.rebuild_every)
                    full.visitors.append(view)
                else:
                    view = RetrievalView(full, s.budget, s.chunk_size)
                return ViewLevel("target-retrieval", runner, view, top, params, s.rebuild_every)
            runner = Runner(self.target.decoder, s.prefill_chunk, self.batcher)
            if isinstance(full, OffloadedCache):
                view = CompactStreaming(full, s.sink, s.window)
                full.visitors.append(view)
            else:
                view = StreamingView(full, s.sink, s.window)
            return ViewLevel("target-streaming", runner, view, top, params)
        if s.draft == "ngram":
            return PromptLookup(self.target.config.vocab_size)
        if isinstance(s.draft, FeatureHead):
            head = s.draft
            cache = StreamingCache(head.config, s.sink, s.window, dtype=head.dtype, device=head.device)
            head.prepare(cache.capacity)
            cache.rope = head.rope
            # features back to the head's window, and a whole prefill pass beyond it
            store = FeatureStore(s.window + s.prefill_chunk + MAX_KERNEL_QUERIES)
            return HeadLevel(head, cache, store, params, self.batcher)
        dec = s.draft.copy_in(s.draft_weights)
        cache = self._draft_cache
        if spec.cache == "streaming":
            if not isinstance(cache, StreamingCache) or cache.k.dtype != dec.dtype or (
                    cache.sink, cache.window) != (s.sink, s.window):
                cache = StreamingCache(s.draft.config, s.sink, s.window, dtype=dec.dtype, device=dec.device)
            cache.reset()
            dec.prepare(cache.capacity)
            cache.rope = dec.rope
        else:
            if not isinstance(cache, FullCache) or cache.capacity < capacity or cache.k.dtype != dec.dtype:
                self._draft_cache = None
                cache = FullCache(s.draft.config, capacity, dtype=dec.dtype, device=dec.device)
            cache.truncate(0)
            dec.prepare(capacity)
        self._draft_cache = cache
        return ModelLevel("draft", Runner(dec, s.prefill_chunk, self.batcher), cache, params)

    def _full_cache(self, capacity: int) -> FullCache:
        """The target's full cache, with room for `capacity` tokens; growing it keeps the cached
        prompt."""
        target, s = self.target.decoder, self.settings
        plan = self._offload_plan(capacity)
        old = self._full
        if old is not None:
            if isinstance(old, OffloadedCache):  # it neither grows nor moves: a new one is made
                keep = plan is not None and not old.broken and old.capacity >= capacity and \
                    old.file.directory == s.kv_offload and old.ram_layers <= plan[0] and old.tail_rows >= plan[1]
            else:
                keep = plan is None
            if not keep or old.k.dtype != target.dtype:
                self._free()
        if self._full is None:
            self._cached_tokens = []
            if plan is None:
                self._full = FullCache(self.target.config, capacity, dtype=target.dtype, device=target.device)
            else:
                assert s.kv_offload is not None
                self._full = OffloadedCache(self.target.config, capacity, target.dtype, s.kv_offload, *plan,
                                            keep_file=s.kv_offload_keep)
        elif self._full.capacity < capacity:
            self._full = self._full.grown(capacity, len(self._cached_tokens))
        return self._full

    # -- prompts -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        tok = self.target.tokenizer
        if isinstance(prompt, list):
            ids = prompt
        elif chat:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = tok.encode(prompt)
        if not ids or (isinstance(prompt, str) and not prompt.strip()):
            raise SettingError("prompt", "is empty")
        bad = [t for t in ids if not 0 <= t < self.target.config.vocab_size]
        if bad:
            raise SettingError("prompt", f"has token id {bad[0]}, outside the vocabulary")
        return ids

    def _eos_ids(self) -> set[int]:
        ids = set(self.target.config.eos_token_ids)
        if self.target.tokenizer.eos_token_id is not None:
            ids.add(self.target.tokenizer.eos_token_id)
        return ids

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], **options: Any) -> GenerationResult:
        """Generate after `prompt` (text, or token ids); options as for `stream`."""
        generation = self.stream(prompt, **options)
        for _ in generation:
            pass
        assert generation.result is not None
        return generation.result

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        chat: bool = False,
        num_samples: int = 1,
        ignore_eos: bool = False,
    ) -> Generation:
        """A generation after `prompt`, run by iterating it (see Generation). The settings are
        checked now; the prefill runs at the first step. num_samples draws several samples after
        one prefill (only the first is streamed); ignore_eos runs to max_new_tokens (benchmarks)."""
        _positive("max_new_tokens", max_new_tokens)
        _positive("num_samples", num_samples)
        params = SamplingParams(temperature, top_p, top_k)
        ids = self.encode_prompt(prompt, chat)
        total = len(ids) + max_new_tokens
        limit = self.settings.max_context
        if limit is not None and total > limit:
            raise SettingError("max_context", f"is {limit}, less than the prompt ({len(ids)} tokens) + "
                                              f"max_new_tokens ({max_new_tokens})")
        check_fits(self.memory_needed(self.capacity_for(total)), f"a context of {total} tokens")
        eos = set() if ignore_eos else self._eos_ids()
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        told = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    stop=stop, num_samples=num_samples, ignore_eos=ignore_eos)
        return Generation(self, ids, params, seed, max_new_tokens, eos, list(stop or []), num_samples, told)

    # -- tensor parallelism --------------------------------------------------------------------
    def _tell(self, op: str, *args: Any) -> None:
        """On rank 0 of a tensor-parallel group: have the other ranks' copies of this engine (made
        from the same settings) do `op` too (tp_worker.follow carries it out)."""
        if self.link is None or not self.link.group.leader:
            return
        s = self.settings
        values = {f.name: getattr(s, f.name) for f in fields(s) if f.name != "draft"}
        draft = s.draft.load_spec() if isinstance(s.draft, LoadedModel) else s.draft
        self.link.tell((op, self.id, self.target.decoder.rope_override, values, draft, *args))

    def _next_step(self, state: int) -> int:
        """What a generation does next (STEP, FINISHED, ABANDONED): rank 0's answer on every rank."""
        if self.link is None:
            return state
        decided = self.link.decide(state)
        if decided == ABANDONED and not self.link.group.leader:
            raise _Abandoned
        return decided


class Generation:
    """One generation in progress. Iterating it runs one decoding step per item and yields the
    text that step released ("" while text is held back, e.g. a possible stop string); when it
    is exhausted, `result` holds the GenerationResult. `close()` abandons it (a server cancels
    requests this way)."""

    def __init__(self, engine: Engine, ids: list[int], params: SamplingParams, seed: int,
                 max_new_tokens: int, eos_ids: set[int], stop: list[str], num_samples: int,
                 options: dict[str, Any] | None = None) -> None:
        self.engine, self.ids, self.params = engine, ids, params
        self.options = options or {}  # the stream() options, for the other ranks of a group
        self.generator = torch.Generator().manual_seed(seed)
        self.max_new_tokens, self.eos_ids, self.stop, self.num_samples = max_new_tokens, eos_ids, stop, num_samples
        self.result: GenerationResult | None = None
        self._steps = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._steps)

    def close(self) -> None:
        self._steps.close()

    def _run(self) -> Iterator[str]:
        engine, ids, params, generator = self.engine, self.ids, self.params, self.generator
        engine._tell("stream", ids, self.options)  # at the first step: a generation never run costs no one
        decoder = engine.target.decoder
        total = len(ids) + self.max_new_tokens
        capacity = engine.capacity_for(total)
        decoder.prepare(total, capacity)
        chain = engine._build_chain(capacity, params)

        # Prefill: the target reads the prompt once (or only what differs from the last prompt);
        # its distribution gives the first token.
        t0 = time.perf_counter()
        reused = chain.top.reuse_prefix(ids)
        engine._cached_tokens, engine._cached_rope = [], None  # invalid while the cache is written
        first_probs = chain.prefill(ids)
        prompt_state = chain.snapshot() if self.num_samples > 1 else None
        prefill_s = time.perf_counter() - t0
        offloaded = engine._full if isinstance(engine._full, OffloadedCache) else None
        read_from = offloaded.file.read_bytes if offloaded is not None else 0
        for level in chain.levels:  # level figures cover decoding only
            level.stats = LevelStats(level.stats.name, is_top=level.stats.is_top)
        samples: list[list[int]] = []
        first_run: StopChecker | None = None
        decode_s = 0.0
        try:
            for sample_index in range(self.num_samples):
                if sample_index:
                    chain.restore(prompt_state)
                stopper = StopChecker(engine.target.tokenizer, self.eos_ids, self.stop, self.max_new_tokens)
                t1 = time.perf_counter()
                first = draw(first_probs, params, generator)
                piece = stopper.add([first])
                if sample_index == 0:
                    yield piece
                context = ids + [first]
                while engine._next_step(STEP if stopper.finish_reason is None else FINISHED) == STEP:
                    new = chain.step(context, generator)
                    context += new
                    piece = stopper.add(new)
                    if sample_index == 0:
                        yield piece
                decode_s += time.perf_counter() - t1
                samples.append(list(stopper.tokens))
                first_run = first_run or stopper
        except GeneratorExit:  # abandoned between steps: the other ranks stop too
            if engine.group is not None and not engine.group.failed:
                engine._next_step(ABANDONED)
            raise
        except _Abandoned:  # on the other ranks: rank 0 abandoned it
            return
        finally:  # also when abandoned between steps: the rows the top holds are exact
            engine._cached_tokens, engine._cached_rope = list(chain.top.tokens), decoder.rope.signature
        assert first_run is not None
        new_tokens = sum(len(s) for s in samples)
        stats: dict[str, Any] = {
            "method": engine.settings.method,
            "draft": engine.settings.draft_name,
            "prefill_s": round(prefill_s, 4),
            "cached_prompt_tokens": reused,
            "decode_s": round(decode_s, 4),
            "new_tokens": new_tokens,
            "ms_per_token": round(1000 * decode_s / new_tokens, 3),
            "tokens_per_s": round(new_tokens / decode_s, 3) if decode_s > 0 else None,
            "levels": [level.stats.as_dict() for level in chain.levels],
            "weights_mb": {fmt: round(n / 1e6, 1) for fmt, n in decoder.weight_formats.items()},
            "kernels": decoder.kernels,
            **({"controller": chain.controller.report()} if chain.controller is not None else {}),
            **({"kv_offload": offloaded.report(read_from, new_tokens, decode_s)} if offloaded is not None else {}),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        if engine.link is not None:  # each rank's share of the memory (gathered when not batched)
            stats["tensor_parallel"] = {"ranks": engine.link.group.world}
            if not engine.link.batched:
                stats["tensor_parallel"]["peak_rss_mb"] = engine.link.group.gather(stats["peak_rss_mb"])
        self.result = GenerationResult(
            text=first_run.text,
            token_ids=first_run.tokens,
            prompt_tokens=len(ids),
            finish_reason=first_run.finish_reason or "length",
            stats=stats,
            samples=samples if self.num_samples > 1 else None,
        )


def check_draft_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft must speak the target's vocabulary token for token."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise SettingError(
            "draft", f"has a vocabulary of {draft.config.vocab_size} tokens, the target {target.config.vocab_size}; "
            "a draft must use the target's tokenizer"
        )
    if draft.tokenizer.vocabulary() != target.tokenizer.vocabulary():
        raise SettingError("draft", "has another tokenizer than the target; a draft must use the target's tokenizer")

