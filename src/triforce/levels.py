"""The levels of a speculative chain: a model over a cache, the target over a view of its own
cache, a feature-level draft head, and prompt lookup.

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
from .head import FeatureHead
from .metrics import LevelStats
from .model import Segment
from .native import MAX_KERNEL_QUERIES
from .runner import Runner
from .sampling import SamplingParams, draw, warp

TAIL_CHECK = 256  # tokens compared when aligning a level's cache with the context
KeepGoing = Callable[[int, float], bool]


def own_confidences(logits: torch.Tensor | None, probs: torch.Tensor, tokens: list[int]) -> list[float]:
    """A level's probability of `tokens` at the first len(tokens) rows of its pass: with the raw
    `logits` (greedy: one-hot rows say nothing) the softmax probability of the argmax, else the
    warped probability of the token."""
    n = len(tokens)
    if logits is not None:
        rows = logits[:n].float()
        return (1.0 / torch.exp(rows - rows.max(-1, keepdim=True).values).sum(-1)).tolist()
    return probs[torch.arange(n), torch.tensor(tokens)].tolist()


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
        self.store: FeatureStore | None = None  # where its passes leave final hidden states, for a draft head

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
        features: list[torch.Tensor] | None = [] if self.store is not None else None
        logits = self.runner.run(self.cache, inputs, len(drafts) + 1, self.name if self.progress else None, features)
        if self.store is not None and features:
            rows = torch.cat(features)  # the last len(rows) positions (a streaming cache skips some)
            self.store.write(len(context) + len(drafts) - len(rows), rows)
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
        return own_confidences(self._logits if self.greedy else None, probs, tokens)

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


class FeatureStore:
    """The final hidden states the levels' passes computed at a sequence's recent positions, for a draft head.
    It holds the last `size` positions written; writing a position replaces it and drops every later one
    (they belonged to drafts the write's pass has now judged). `changed_from` is the first position written
    since the head last looked."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: torch.Tensor | None = None  # [size, hidden], ring-indexed by position
        self.length = 0
        self.changed_from = 0

    def write(self, start: int, features: torch.Tensor) -> None:
        count = features.shape[0]
        if self.rows is None:
            self.rows = torch.zeros(self.size, features.shape[1], dtype=features.dtype, device=features.device)
        keep = min(count, self.size)
        slots = torch.arange(start + count - keep, start + count, device=features.device) % self.size
        self.rows[slots] = features[count - keep :].to(self.rows.dtype)
        self.length = start + count
        self.changed_from = min(self.changed_from, start)

    @property
    def held_from(self) -> int:
        return max(0, self.length - self.size)

    def read(self, start: int, end: int) -> torch.Tensor:
        """Features of positions [start, end), all held."""
        if start < self.held_from or end > self.length or self.rows is None:
            raise ValueError(f"features of positions [{start}, {end}) are not held ({self.held_from}-{self.length})")
        return self.rows[torch.arange(start, end, device=self.rows.device) % self.size]

    def take_changes(self) -> int:
        """The first position written since the last call."""
        changed, self.changed_from = self.changed_from, self.length
        return changed

    def snapshot(self) -> Any:
        return (None if self.rows is None else self.rows.clone()), self.length, self.changed_from

    def restore(self, state: Any) -> None:
        rows, self.length, self.changed_from = state
        self.rows = None if rows is None else rows.clone()
        self.changed_from = 0  # a head that ran since may hold rows of other features


class HeadLevel(Level):
    """A feature-level draft head at the bottom of a chain (head.py). Its cache row j is computed from the
    store's feature at j-1 and token j; before drafting it recomputes the rows whose features changed (a level
    above verified those positions since), at most its window back, then drafts from its own predictions."""

    name = "head"

    def __init__(self, head: FeatureHead, cache: StreamingCache, store: FeatureStore, params: SamplingParams,
                 batcher: Any = None) -> None:
        self.head = head
        self.cache = cache
        self.store = store
        self.params = params
        self.greedy = params.greedy
        self.batcher = batcher
        self.stats = LevelStats("head")
        self.passes = []
        self.tokens: list[int] = []  # the tokens whose rows the cache holds
        self.exact = 0  # leading rows computed from the store's features (later ones from the head's own)

    def _pass(self, tokens: list[int], features: torch.Tensor, scored: int) -> tuple[torch.Tensor, torch.Tensor]:
        c0 = self.clock()
        segment = Segment(torch.tensor(tokens, dtype=torch.long), self.cache, scored, want_features=True,
                          hidden_in=features)
        if self.batcher is not None:
            logits = self.batcher.submit(self.head, segment)
        else:
            logits = self.head.forward([segment])[0]
        self.passes.append((len(tokens), self.clock() - c0, 0.0))
        self.stats.forward_calls += 1
        self.stats.forward_tokens += len(tokens)
        self.stats.bytes_read += self.head.weight_bytes + self.cache.visible_rows() * self.head.kv_bytes_per_token()
        assert segment.features is not None
        return logits, segment.features

    def _start_row(self, context: list[int]) -> int:
        """The first row to (re)compute for `context`, with the cache truncated to it."""
        n = len(context)
        changed = self.store.take_changes()
        limit = min(self.exact, len(self.tokens), n - 1, changed + 1)
        # a changed token rewrites its feature too, so `changed` already covers it; the tokens are compared
        # as a check over the rows a window holds only (from the start, it would cost O(context) per draft)
        common = min(limit, max(0, n - self.cache.window - self.cache.slack))
        while common < limit and self.tokens[common] == context[common]:
            common += 1
        # rows older than the window (or than the features held) are not recomputed: a head attends its window
        held = self.store.held_from
        lowest = max(n - self.cache.window, held + 1 if held else 0)
        if common >= lowest:
            try:
                self.cache.truncate(common)
                return common
            except ValueError:
                pass
        self.cache.reset()
        self.cache.length = lowest  # the text before the rows it will hold passes unseen
        return lowest

    def catch_up(self, context: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for every token of `context` (from stored features); logits [1, V] and the predicted feature
        [1, H] of its last row."""
        start = self._start_row(context)
        n = len(context)
        hidden = self.head.config.hidden_size
        features = self.store.read(max(start - 1, 0), n - 1)
        if start == 0:  # the first token has no earlier feature
            features = torch.cat([torch.zeros(1, hidden, dtype=features.dtype), features])
        logits, predicted = None, None
        for a in range(start, n, MAX_KERNEL_QUERIES):
            b = min(n, a + MAX_KERNEL_QUERIES)
            logits, predicted = self._pass(context[a:b], features[a - start : b - start], 1 if b == n else 0)
        assert logits is not None and predicted is not None
        self.tokens, self.exact = list(context), n
        return logits, predicted[-1:]

    def propose(
        self, context: list[int], num_tokens: int, generator: torch.Generator | None,
        keep_going: KeepGoing | None = None,
    ) -> tuple[list[int], torch.Tensor | None, list[float] | None]:
        t0 = time.perf_counter()
        logits, feature = self.catch_up(context)
        drafts: list[int] = []
        dists, confidence = [], []
        for k in range(1, num_tokens + 1):
            probs = warp(logits, self.params)
            token = draw(probs[0], self.params, generator)
            drafts.append(token)
            dists.append(probs[0])
            confidence += own_confidences(logits if self.greedy else None, probs, [token])
            if k == num_tokens or (keep_going is not None and not keep_going(k, confidence[-1])):
                break
            logits, feature = self._pass([token], feature, 1)
            self.tokens.append(token)
        self.stats.time_s += time.perf_counter() - t0
        return drafts, torch.stack(dists), confidence

    def snapshot(self) -> Any:
        return list(self.tokens), self.exact, self.cache.snapshot(), self.store.snapshot()

    def restore(self, state: Any) -> None:
        tokens, self.exact, cache_state, store_state = state
        self.tokens = list(tokens)
        self.cache.restore(cache_state)
        self.store.restore(store_state)


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
