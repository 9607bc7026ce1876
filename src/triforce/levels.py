"""The levels of a speculative chain: a model over a cache, the target over a view of its own
cache, and prompt lookup.

A level scores a context plus draft tokens (`score`: its warped distributions after each) or,
at the bottom, proposes tokens cheaply (`propose`). It keeps the tokens its cache holds and
rolls them back when drafts are rejected; it runs tokens through its `Runner` and gets logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .cache import FullCache, RetrievalView, SparseView, StreamingCache
from .metrics import LevelStats
from .runner import Runner
from .sampling import SamplingParams, draw, warp

TAIL_CHECK = 256  # tokens compared when aligning a level's cache with the context
KeepGoing = Callable[[int, float], bool]


class Level:
    """Interface of a level. Models implement score(); the bottom also implements propose()."""

    name = "level"
    stats: LevelStats
    greedy = False  # whether its distributions are one-hot (temperature 0)
    # Each pass since the chain last looked: (rows it ran, seconds, seconds spent outside the pass
    # because of it), timed by `clock`; what adaptive speculation learns costs from. For prompt
    # lookup a "pass" is one proposal, its rows the tokens proposed.
    passes: list[tuple[int, float, float]]
    clock: Callable[[], float] = time.perf_counter

    def score(self, context: list[int], drafts: list[int]) -> torch.Tensor:
        """Warped distributions [len(drafts) + 1, V]: after context, and after each draft."""
        raise NotImplementedError

    def propose(
        self, context: list[int], num_tokens: int, generator: torch.Generator | None,
        keep_going: KeepGoing | None = None,
    ) -> tuple[list[int], torch.Tensor | None, list[float] | None]:
        """Up to num_tokens draft tokens, the distributions they were drawn from, and the level's
        own confidence in each (None where it has none). keep_going(k, confidence), asked after
        the k-th token (k < num_tokens), may end the proposal early; the k-th token is kept."""
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        """Keep state for the first `length` tokens of the last scored context + drafts."""

    def snapshot(self) -> Any:
        """State to come back to (after a prompt's prefill, for several samples)."""
        return None

    def restore(self, state: Any) -> None:
        pass


class ModelLevel(Level):
    """A model over a cache: the target on its full cache, or a draft model on its own."""

    def __init__(self, name: str, runner: Runner, cache: FullCache | SparseView | StreamingCache,
                 params: SamplingParams, progress: bool = False) -> None:
        self.name = name
        self.runner = runner
        self.cache = cache
        self.params = params
        self.greedy = params.greedy
        self.progress = progress
        self.tokens: list[int] = []  # the tokens whose rows the cache holds
        self.stats = LevelStats(name)
        self.passes = []
        self._logits: torch.Tensor | None = None  # of the last pass, for `confidences`

    # -- cache alignment ---------------------------------------------------------------------
    def _common_prefix(self, context: list[int], exhaustive: bool = False) -> int:
        """Length of the common prefix of the cached tokens and `context`. Within a generation
        only the tail can change (rejected drafts), so only the last TAIL_CHECK tokens are
        compared unless `exhaustive` (a new prompt against a cached one)."""
        n = min(len(self.tokens), len(context))
        start = 0 if exhaustive else max(0, n - TAIL_CHECK)
        if start and self.tokens[start - 1] != context[start - 1]:
            start = 0  # diverged earlier than the tail: compare everything
        for i in range(start, n):
            if self.tokens[i] != context[i]:
                return i
        return n

    def _truncate(self, length: int) -> None:
        self.cache.truncate(length)
        del self.tokens[length:]

    def reuse_prefix(self, prompt: list[int]) -> int:
        """Keep the cached rows of the longest common prefix with a new prompt that a fresh
        prefill would compute alike (prompt caching); returns how many tokens were kept."""
        common = self._common_prefix(prompt, exhaustive=True)
        if isinstance(self.cache, FullCache):
            common = self.runner.reusable(self.cache, common, len(prompt))
        self._truncate(common)
        return common

    def _sync(self, context: list[int]) -> list[int]:
        """Align the cache with `context` and return the tokens still to run (at least one, so
        the pass yields the distribution after the context)."""
        common = self._common_prefix(context)
        if common == len(context):
            common -= 1
        if common < len(self.tokens):
            self._truncate(common)
        return context[common:]

    # -- scoring -----------------------------------------------------------------------------
    def score(self, context: list[int], drafts: list[int], overhead: float = 0.0) -> torch.Tensor:
        t0, c0 = time.perf_counter(), self.clock()
        inputs = self._sync(context) + drafts
        logits = self.runner.run(self.cache, inputs, len(drafts) + 1, self.name if self.progress else None)
        self._logits = logits
        self.passes.append((len(inputs), self.clock() - c0, overhead))
        self.tokens = list(context) + list(drafts)
        decoder = self.runner.decoder
        self.stats.forward_calls += 1
        self.stats.forward_tokens += len(inputs)
        self.stats.bytes_read += decoder.weight_bytes + self.cache.visible_rows() * decoder.kv_bytes_per_token()
        self.stats.time_s += time.perf_counter() - t0
        return warp(logits, self.params)

    def confidences(self, probs: torch.Tensor, tokens: list[int]) -> list[float]:
        """The level's own probability of `tokens` at the rows of its last pass that gave `probs`
        (the first len(tokens) of them): the warped probability when sampling, and when greedy
        (one-hot rows, which say nothing) the plain softmax probability of the argmax."""
        n = len(tokens)
        if self.greedy and self._logits is not None:
            rows = self._logits[:n].float()
            return (1.0 / torch.exp(rows - rows.max(-1, keepdim=True).values).sum(-1)).tolist()
        return probs[torch.arange(n), torch.tensor(tokens)].tolist()

    def propose(
        self, context: list[int], num_tokens: int, generator: torch.Generator | None,
        keep_going: KeepGoing | None = None,
    ) -> tuple[list[int], torch.Tensor | None, list[float] | None]:
        drafts: list[int] = []
        dists, confidence = [], []
        for k in range(1, num_tokens + 1):
            probs = self.score(context + drafts, [])
            drafts.append(draw(probs[0], self.params, generator))
            dists.append(probs[0])
            confidence += self.confidences(probs, drafts[-1:])
            if keep_going is not None and k < num_tokens and not keep_going(k, confidence[-1]):
                break
        return drafts, torch.stack(dists) if dists else None, confidence

    def rollback(self, length: int) -> None:
        if length < len(self.tokens):
            self._truncate(length)

    def snapshot(self) -> Any:
        return list(self.tokens), self.cache.snapshot()

    def restore(self, state: Any) -> None:
        tokens, cache_state = state
        self.tokens = list(tokens)
        self.cache.restore(cache_state)


class ViewLevel(ModelLevel):
    """The target on a sparse view of the top's full cache (retrieval or StreamingLLM).

    Rows the top has verified are shared, so this level's tokens start as the top's; rows beyond
    hold its own drafts until the top overwrites them. A retrieval view re-selects its chunks
    after every `rebuild_every`-th verification of the top, from the top's query at the last
    token it kept.
    """

    def __init__(self, name: str, runner: Runner, view: SparseView, top: ModelLevel, params: SamplingParams,
                 rebuild_every: int = 1) -> None:
        super().__init__(name, runner, view, params)
        self.view = view
        self.top = top
        self.rebuild_every = rebuild_every
        self.top_steps = 0
        self.rebuild_query: list[torch.Tensor] | None = None  # per layer, when a re-selection is due

    def follow_top(self) -> None:
        """After the top ran (prefill, a verification, a plain step): adopt its tokens, and after
        every `rebuild_every`-th top pass keep the top's query at the last token it kept, for a
        re-selection of the retrieval chunks. That waits for this level's next pass (it may not
        run for a while); a later top pass brings a fresher query to it."""
        self.tokens = list(self.top.tokens)
        self.view.truncate(len(self.tokens))
        if isinstance(self.view, RetrievalView):
            self.top_steps += 1
            due = self.top_steps % self.rebuild_every == 0 or self.view.selected_at < 0
            if due or self.rebuild_query is not None:
                full = self.top.cache
                assert isinstance(full, FullCache)
                self.rebuild_query = full.queries_at(full.length - 1)

    def index_prompt(self) -> None:
        """After a prefill: what a first retrieval selection needs from the prompt, computed now,
        so that the selection a cycle pays for costs what any later one does."""
        if isinstance(self.view, RetrievalView):
            self.view.update_means()

    def score(self, context: list[int], drafts: list[int], overhead: float = 0.0) -> torch.Tensor:
        if self.rebuild_query is not None:
            assert isinstance(self.view, RetrievalView)
            t0, c0 = time.perf_counter(), self.clock()
            self.view.rebuild(self.rebuild_query)
            self.rebuild_query = None
            overhead += self.clock() - c0
            self.stats.rebuilds += 1
            self.stats.rebuild_s += time.perf_counter() - t0
        return super().score(context, drafts, overhead)

    def snapshot(self) -> Any:
        return super().snapshot(), self.top_steps, self.rebuild_query

    def restore(self, state: Any) -> None:
        level, self.top_steps, self.rebuild_query = state
        super().restore(level)


class PromptLookup(Level):
    """Prompt lookup ("ngram"): propose the continuation of the most recent earlier occurrence
    of the last n tokens (n from max_ngram down to min_ngram). Deterministic proposals (q
    one-hot) are verified losslessly like any other draft."""

    name = "ngram"

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.vocab_size = vocab_size
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.stats = LevelStats("ngram")
        self.passes = []
        self.indexed: list[int] = []
        self.ngrams: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its positions, increasing

    def index(self, context: list[int]) -> None:
        """Bring the n-gram index up to `context`; only what changed since the last call is
        indexed. Within a generation only the tail changes (rejected drafts); a context that
        changed earlier is for `restore` to say."""
        n = min(len(self.indexed), len(context))
        common = next((i for i in range(max(0, n - TAIL_CHECK), n) if self.indexed[i] != context[i]), n)
        self._truncate(common)
        for p in range(len(self.indexed), len(context)):
            self.indexed.append(context[p])
            for size in range(self.min_ngram, self.max_ngram + 1):
                begin = p - size + 1
                if begin >= 0:
                    self.ngrams.setdefault(tuple(self.indexed[begin : p + 1]), []).append(begin)

    def _truncate(self, length: int) -> None:
        for size in range(self.min_ngram, self.max_ngram + 1):
            # latest first: each n-gram's positions end with its latest occurrence
            for p in range(len(self.indexed) - size, max(0, length - size + 1) - 1, -1):
                positions = self.ngrams[tuple(self.indexed[p : p + size])]
                assert positions[-1] == p
                positions.pop()
        del self.indexed[length:]

    def snapshot(self) -> Any:
        return len(self.indexed)

    def restore(self, state: Any) -> None:
        self._truncate(state)

    def has_proposal(self, context: list[int]) -> bool:
        """Whether the latest n-gram of `context` occurred before (so `propose` would draft)."""
        return bool(self._lookup(context, 1))

    def propose(
        self, context: list[int], num_tokens: int, generator: torch.Generator | None,
        keep_going: KeepGoing | None = None,
    ) -> tuple[list[int], torch.Tensor | None, list[float] | None]:
        t0, c0 = time.perf_counter(), self.clock()
        drafts = self._lookup(context, num_tokens)
        self.stats.time_s += time.perf_counter() - t0
        if not drafts:
            return [], None, None
        self.passes.append((len(drafts), self.clock() - c0, 0.0))
        probs = torch.zeros(len(drafts), self.vocab_size)
        probs[torch.arange(len(drafts)), torch.tensor(drafts)] = 1.0
        return drafts, probs, None

    def _lookup(self, context: list[int], num_tokens: int) -> list[int]:
        self.index(context)
        drafts: list[int] = []
        for size in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            positions = self.ngrams.get(tuple(context[-size:]), [])
            # the most recent occurrence that is not the suffix itself
            for p in reversed(positions):
                if p + size < len(context):
                    drafts = context[p + size : p + size + num_tokens]
                    break
            if drafts:
                break
        return drafts
