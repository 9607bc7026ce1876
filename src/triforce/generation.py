"""The user-facing generator: presets, prefill, stopping, streaming, statistics.

    engine = TriForce(target, draft, method="triforce")
    result = engine.generate("...", max_new_tokens=128, temperature=0.6, top_p=0.9)
    for piece in engine.stream("..."): print(piece, end="")

`method` picks the chain of levels (see speculative.py):
    autoregressive  target, full cache
    speculative     draft model (full cache) -> target
    retrieval       target on a retrieval cache -> target
    streaming       target on a StreamingLLM view of its cache -> target
    triforce        draft (StreamingLLM cache) -> target on a retrieval cache -> target
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import FullCache, RetrievalView, StreamingCache, StreamingView, check_fits
from .errors import TriforceError
from .loading import LoadedModel
from .sampling import SamplingParams
from .speculative import Chain, Level, LevelStats, ModelLevel, NgramLevel, SharedViewLevel

METHODS = ("autoregressive", "speculative", "retrieval", "streaming", "triforce")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "stop" or "length"
    stats: dict[str, Any] = field(default_factory=dict)
    samples: list[list[int]] | None = None


class StopChecker:
    """Ends generation at EOS, a stop string, or max_new_tokens, and releases text that can no
    longer become part of a stop string."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], stop: list[str], max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stop = [s for s in stop if s]
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.released = 0
        self.finish_reason: str | None = None

    def add(self, new_tokens: list[int]) -> str:
        """Accept tokens from one step; return newly releasable text."""
        for token in new_tokens:
            if self.finish_reason:
                break
            self.tokens.append(token)
            if token in self.eos_ids:
                self.finish_reason = "eos"
            elif len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
        self.text = self.tokenizer.decode(self.tokens)
        if self.stop:
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
        if self.finish_reason:
            safe = len(self.text)
        else:
            safe = len(self.text)
            if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
                safe = len(self.text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe = min(safe, len(self.text[:safe]) - k)
                        break
        piece = self.text[self.released : safe] if safe > self.released else ""
        self.released = max(self.released, safe)
        return piece


class TriForce:
    """Lossless (hierarchical) speculative generation over one target model."""

    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel | str | None = None,
        method: str = "autoregressive",
        gamma: int = 6,
        draft_gamma: int = 2,
        budget: int = 4096,
        chunk_size: int = 8,
        sink: int = 16,
        window: int = 256,
        rebuild_every: int = 1,
        prefill_chunk: int = 1024,
        max_context: int | None = None,
        progress: bool = False,
    ) -> None:
        if method not in METHODS:
            raise TriforceError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        for name, value, low in (("gamma", gamma, 1), ("draft-gamma", draft_gamma, 1), ("budget", budget, 1),
                                 ("chunk-size", chunk_size, 1), ("sink", sink, 0), ("window", window, 1),
                                 ("rebuild-every", rebuild_every, 1), ("prefill chunk", prefill_chunk, 1)):
            if not isinstance(value, int) or value < low:
                raise TriforceError(f"{name} must be an integer >= {low}, got {value}")
        if max_context is not None and max_context < 2:
            raise TriforceError(f"--max-context must be at least 2, got {max_context}")
        needs_draft = method in ("speculative", "triforce")
        if needs_draft and draft is None:
            raise TriforceError(f"--method {method} needs a draft: --draft PATH or --draft ngram")
        if isinstance(draft, LoadedModel):
            check_draft_compatible(target, draft)
        elif draft not in (None, "ngram"):
            raise TriforceError(f"draft must be a loaded model or 'ngram', got {draft!r}")
        self.target, self.draft, self.method = target, draft, method
        self.gamma, self.draft_gamma = gamma, draft_gamma
        self.budget, self.chunk_size, self.sink, self.window = budget, chunk_size, sink, window
        self.rebuild_every, self.prefill_chunk = rebuild_every, prefill_chunk
        self.max_context = max_context
        self.progress = progress
        self._full: FullCache | None = None
        self._draft_cache: FullCache | StreamingCache | None = None
        # Prompt caching: the tokens whose target KV in self._full are valid, and the signature
        # of the rotary table they were rotated with (another scaling invalidates them).
        self._cached_tokens: list[int] = []
        self._cached_rope: object = None
        self.last_result: GenerationResult | None = None

    def configure(self, method: str | None = None, draft: LoadedModel | str | None | bool = False,
                  **knobs: int) -> None:
        """Switch method, draft or knobs while keeping the caches (and the cached prompt)."""
        if method is not None:
            if method not in METHODS:
                raise TriforceError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            self.method = method
        if draft is not False:
            if isinstance(draft, LoadedModel):
                check_draft_compatible(self.target, draft)
            if draft is not self.draft:
                self._draft_cache = None
            self.draft = draft
        for name, value in knobs.items():
            if not hasattr(self, name):
                raise TriforceError(f"unknown setting {name!r}")
            setattr(self, name, value)
        if self.method in ("speculative", "triforce") and self.draft is None:
            raise TriforceError(f"--method {self.method} needs a draft: --draft PATH or --draft ngram")

    # -- chain construction ------------------------------------------------------------------
    def capacity_for(self, total: int) -> int:
        """Cache rows a run reaching `total` tokens needs."""
        return total + self.gamma + self.draft_gamma + 8  # room for drafts past the last token

    def _build_chain(self, capacity: int, params: SamplingParams) -> Chain:
        target = self.target.decoder
        if self._cached_rope != target.rope.signature:
            self._cached_tokens = []
        full = self._full_cache(capacity)
        full.truncate(len(self._cached_tokens))
        top = ModelLevel("target", target, full, params, self.prefill_chunk, self.progress)
        top.tokens = list(self._cached_tokens)
        method = self.method
        if method == "autoregressive":
            return Chain([top], [])

        def bottom_draft(cache_kind: str) -> Level:
            if self.draft == "ngram":
                return NgramLevel(self.target.config.vocab_size)
            assert isinstance(self.draft, LoadedModel)
            dec = self.draft.decoder
            if cache_kind == "streaming":
                cache = self._draft_cache
                if not isinstance(cache, StreamingCache) or cache.k.dtype != dec.dtype or (
                        cache.sink, cache.window) != (self.sink, self.window):
                    cache = StreamingCache(
                        self.draft.config, self.sink, self.window, dtype=dec.dtype, device=dec.device
                    )
                cache.slots = cache.seq_length = 0
                dec.prepare(cache.capacity)
                cache.rope = dec.rope
            else:
                cache = self._draft_cache
                if not isinstance(cache, FullCache) or cache.capacity < capacity or cache.k.dtype != dec.dtype:
                    self._draft_cache = None
                    cache = FullCache(self.draft.config, capacity, dtype=dec.dtype, device=dec.device)
                cache.truncate(0)
                dec.prepare(capacity)
            self._draft_cache = cache
            return ModelLevel("draft", dec, cache, params, self.prefill_chunk)

        if method == "speculative":
            return Chain([bottom_draft("full"), top], [self.gamma])
        if method == "streaming":
            view = StreamingView(full, self.sink, self.window)
            middle = SharedViewLevel("target-streaming", target, view, top, params)
            return Chain([middle, top], [self.gamma])
        retrieval = RetrievalView(full, self.budget, self.chunk_size)
        middle = SharedViewLevel("target-retrieval", target, retrieval, top, params, self.rebuild_every)
        full.keep_queries = True
        if method == "retrieval":
            return Chain([middle, top], [self.gamma])
        return Chain([bottom_draft("streaming"), middle, top], [self.draft_gamma, self.gamma])

    def _full_cache(self, capacity: int) -> FullCache:
        """The target's full cache, with room for `capacity` tokens; growing it keeps the cached
        prompt."""
        target = self.target.decoder
        if self._full is not None and self._full.k.dtype != target.dtype:
            self._full, self._cached_tokens = None, []
        if self._full is None:
            self._cached_tokens = []
            self._full = FullCache(self.target.config, capacity, dtype=target.dtype, device=target.device)
        elif self._full.capacity < capacity:
            keep = len(self._cached_tokens)
            self._full = self._full.grown(capacity, keep)
        return self._full

    def reserve(self, context: int) -> None:
        """Allocate the caches for prompts + outputs of up to `context` tokens now, so serving
        never reallocates (and memory stays flat across requests)."""
        capacity = self.capacity_for(context)
        check_fits(self.memory_needed(capacity), f"a context of {context} tokens")
        self._full_cache(capacity)
        self.target.decoder.prepare(context, capacity)

    def prepare(self, total: int) -> None:
        """Allocate caches and rotary tables for a run reaching `total` tokens (batching does
        this for every sequence before any starts)."""
        capacity = self.capacity_for(total)
        check_fits(self.memory_needed(capacity), f"a context of {total} tokens")
        self.target.decoder.prepare(total, capacity)
        self._build_chain(capacity, SamplingParams(0.0, 1.0, 0))

    def release(self) -> None:
        """Free the caches (and forget the cached prompt)."""
        self._full = self._draft_cache = None
        self._cached_tokens, self._cached_rope = [], None

    def memory_held(self) -> int:
        """Bytes of KV cache this engine holds now (kept between runs for prompt caching)."""
        return sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size()
                   for c in (self._full, self._draft_cache) if c is not None)

    def memory_needed(self, capacity: int) -> int:
        """Bytes a run of `capacity` tokens allocates (KV caches and rotary tables), estimated
        before allocating anything."""
        target = self.target.decoder
        rope = 2 * capacity * target.config.head_dim * 4  # cos+sin float32 (plus a float64 pass)
        total = capacity * target.kv_bytes_per_token() + 3 * rope
        if isinstance(self.draft, LoadedModel):
            if self.method == "speculative":
                total += capacity * self.draft.decoder.kv_bytes_per_token()
            else:
                total += (self.sink + self.window + 64) * self.draft.decoder.kv_bytes_per_token()
        return total

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
            raise TriforceError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.target.config.vocab_size]
        if bad:
            raise TriforceError(f"prompt token id {bad[0]} is outside the vocabulary")
        return ids

    def _eos_ids(self) -> set[int]:
        ids = set(self.target.config.eos_token_ids)
        if self.target.tokenizer.eos_token_id is not None:
            ids.add(self.target.tokenizer.eos_token_id)
        return ids

    # -- generation --------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], **kwargs: Any) -> Iterator[str]:
        """Yield text as it is generated; the full result is then in `self.last_result`."""
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)

        # Run step by step so text is yielded while generating.
        gen = self.steps(prompt, on_text=on_text, **kwargs)
        for _ in gen:
            while pieces:
                yield pieces.pop(0)
        while pieces:
            yield pieces.pop(0)

    def generate(
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
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Generate after `prompt` (text, or token ids). ignore_eos runs to max_new_tokens (for
        benchmarks)."""
        for _ in self.steps(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=seed, stop=stop, chat=chat, num_samples=num_samples, on_text=on_text,
                           ignore_eos=ignore_eos):
            pass
        return self.last_result

    def steps(
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
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[None]:
        """Generate one decoding step per iteration (the arguments of `generate`); the result is
        in `self.last_result` once exhausted. Closing the iterator early abandons the generation
        (the server cancels requests this way)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise TriforceError(f"max-new-tokens must be an integer >= 1, got {max_new_tokens}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise TriforceError(f"num-samples must be an integer >= 1, got {num_samples}")
        params = SamplingParams(float(temperature), float(top_p), int(top_k))
        ids = self.encode_prompt(prompt, chat)
        total = len(ids) + max_new_tokens
        if self.max_context is not None and len(ids) > self.max_context:
            raise TriforceError(f"the prompt has {len(ids)} tokens, more than --max-context {self.max_context}")
        if self.max_context is not None and total > self.max_context:
            raise TriforceError(
                f"prompt ({len(ids)} tokens) + max-new-tokens ({max_new_tokens}) exceeds --max-context "
                f"{self.max_context}"
            )
        capacity = self.capacity_for(total)
        check_fits(self.memory_needed(capacity), f"a context of {total} tokens")
        self.target.decoder.prepare(total, capacity)
        chain = self._build_chain(capacity, params)
        generator = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, (1,)).item()))
        eos = set() if ignore_eos else self._eos_ids()

        # Prefill: the target reads the prompt once (or only what differs from the last prompt);
        # its distribution gives the first token.
        t0 = time.perf_counter()
        top = chain.top
        reused = top.reuse_prefix(ids)
        self._cached_tokens, self._cached_rope = [], None  # invalid while the cache is written
        first_probs = top.score(ids, [])[0]
        for level in chain.levels[:-1]:
            if isinstance(level, SharedViewLevel):
                level.follow_top(top.last_logit_offset)
            elif isinstance(level, ModelLevel):  # a draft model reads the prompt now, not in the first step
                level.score(ids, [])
        prompt_state = chain.snapshot() if num_samples > 1 else None
        prefill_s = time.perf_counter() - t0
        for level in chain.levels:  # level figures cover decoding only
            level.stats = LevelStats(level.stats.name, is_top=level.stats.is_top)
        samples: list[list[int]] = []
        result = None
        decode_s = 0.0
        for sample_index in range(num_samples):
            if sample_index:
                chain.restore(prompt_state)
            stopper = StopChecker(self.target.tokenizer, eos, stop or [], max_new_tokens)
            t1 = time.perf_counter()
            first = int(first_probs.argmax()) if params.greedy else int(
                torch.multinomial(first_probs, 1, generator=generator))
            piece = stopper.add([first])
            if on_text and piece and sample_index == 0:
                on_text(piece)
            context = ids + [first]
            while stopper.finish_reason is None:
                new = chain.step(context, generator)
                context += new
                piece = stopper.add(new)
                if on_text and piece and sample_index == 0:
                    on_text(piece)
                yield None
            decode_s += time.perf_counter() - t1
            samples.append(list(stopper.tokens))
            if result is None:
                result = stopper
        assert result is not None
        self._cached_tokens, self._cached_rope = list(top.tokens), self.target.decoder.rope.signature
        new_tokens = sum(len(s) for s in samples)
        stats: dict[str, Any] = {
            "method": self.method,
            "draft": self.draft if isinstance(self.draft, str) or self.draft is None else self.draft.source,
            "prefill_s": round(prefill_s, 4),
            "cached_prompt_tokens": reused,
            "decode_s": round(decode_s, 4),
            "new_tokens": new_tokens,
            "ms_per_token": round(1000 * decode_s / new_tokens, 3),
            "tokens_per_s": round(new_tokens / decode_s, 3) if decode_s > 0 else None,
            "levels": [level.stats.as_dict() for level in chain.levels],
        }
        self.last_result = GenerationResult(
            text=result.text,
            token_ids=result.tokens,
            prompt_tokens=len(ids),
            finish_reason=result.finish_reason or "length",
            stats=stats,
            samples=samples if num_samples > 1 else None,
        )


def check_draft_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft must speak the target's vocabulary token for token."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise TriforceError(
            f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
            f"({target.config.vocab_size}); a draft must use the target's tokenizer"
        )
    if draft.tokenizer.vocabulary() != target.tokenizer.vocabulary():
        raise TriforceError("the draft's tokenizer differs from the target's; a draft must use the target's tokenizer")
