"""Hierarchical speculative decoding: a chain of levels, each verifying the one below.

A level is something that can score a context plus draft tokens (a model over some cache) or
propose tokens cheaply (the bottom: a small model, or prompt lookup). The chain, bottom to top:

    bottom --drafts--> level 1 --verifies, and so drafts--> ... --> top (target, full cache)

Level i gathers tokens by repeatedly asking level i-1 for `gammas[i-1]` drafts and verifying them
with one forward pass (speculative sampling: accept with min(1, p/q), else sample the residual).
The tokens a level emits are distributed exactly as its own model would sample them, so the level
above may treat them as drafts with q = that level's distribution. The top's output is therefore
distributed exactly as plain sampling from the target (token for token when greedy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import kernel_query_limit, kernel_runs
from .batch import run_forward
from .cache import FullCache, RetrievalView, SparseView, StreamingCache
from .model import Decoder
from .native import MAX_KERNEL_QUERIES
from .sampling import SamplingParams, sample, verify, warp

TAIL_CHECK = 256  # tokens compared when aligning a level's cache with the context


@dataclass
class LevelStats:
    """Per-level figures, named as vLLM / SGLang / llama.cpp name speculation metrics."""

    name: str
    num_drafts: int = 0  # times this level's drafts were verified by the level above
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_at_position: list[int] = field(default_factory=list)
    drafted_at_position: list[int] = field(default_factory=list)
    forward_calls: int = 0
    forward_tokens: int = 0
    time_s: float = 0.0
    rebuilds: int = 0
    rebuild_s: float = 0.0
    is_top: bool = False

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        while len(self.drafted_at_position) < drafted:
            self.drafted_at_position.append(0)
            self.accepted_at_position.append(0)
        for i in range(drafted):
            self.drafted_at_position[i] += 1
            if i < accepted:
                self.accepted_at_position[i] += 1

    def as_dict(self) -> dict[str, Any]:
        rate = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None
        mal = 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None
        d: dict[str, Any] = {
            "name": self.name,
            "time_s": round(self.time_s, 4),
            "forward_calls": self.forward_calls,
            "forward_tokens": self.forward_tokens,
        }
        if not self.is_top:
            d.update(
                num_drafts=self.num_drafts,
                num_draft_tokens=self.num_draft_tokens,
                num_accepted_tokens=self.num_accepted_tokens,
                draft_acceptance_rate=None if rate is None else round(rate, 4),
                mean_acceptance_length=None if mal is None else round(mal, 4),
                acceptance_at_position=[
                    round(a / n, 4) for a, n in zip(self.accepted_at_position, self.drafted_at_position)
                ],
            )
        if self.rebuilds:
            d.update(rebuilds=self.rebuilds, rebuild_s=round(self.rebuild_s, 4))
        return d


class Level:
    """Interface of a level. Models implement score(); the bottom also implements propose()."""

    name = "level"
    stats: LevelStats

    def score(self, context: list[int], drafts: list[int]) -> torch.Tensor:
        """Warped distributions [len(drafts) + 1, V]: after context, and after each draft."""
        raise NotImplementedError

    def propose(
        self, context: list[int], num_tokens: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """Up to num_tokens draft tokens and the distributions they were drawn from."""
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        """Keep state for the first `length` tokens of the last scored context + drafts."""

    def reset(self) -> None:
        """Forget everything (a new prompt)."""

    def snapshot(self) -> Any:
        """State to come back to (after a prompt's prefill, for several samples)."""
        return None

    def restore(self, state: Any) -> None:
        pass


class ModelLevel(Level):
    """A model over a cache: the target on its full cache, on a sparse view of it, or a draft."""

    def __init__(
        self,
        name: str,
        decoder: Decoder,
        cache: FullCache | SparseView | StreamingCache,
        params: SamplingParams,
        prefill_chunk: int = 1024,
        progress: bool = False,
    ) -> None:
        self.name = name
        self.decoder = decoder
        self.cache = cache
        self.params = params
        self.prefill_chunk = prefill_chunk
        self.progress = progress
        self.tokens: list[int] = []
        self.stats = LevelStats(name)
        self.last_logit_offset = 0  # input index of the first scored position in the last forward

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

    def reset(self) -> None:
        self._truncate(0)

    def reuse_prefix(self, prompt: list[int]) -> int:
        """Keep the cached KV of the longest common prefix with a new prompt (prompt caching);
        returns how many tokens were kept."""
        common = self._common_prefix(prompt, exhaustive=True)
        if isinstance(self.cache, FullCache):  # only rows a fresh prefill would compute alike
            # without the kernel (another device, an older CPU) short passes run through SDPA
            # too, whose rows depend on how many tokens share the pass: only whole chunks match
            kernel_max = kernel_query_limit(self.cache.buffers(0, 0)[0])
            common = self.cache.reusable(common, len(prompt), self.prefill_chunk, kernel_max)
        self._truncate(common)
        return common

    def sync(self, context: list[int]) -> list[int]:
        """Align the cache with `context` and return the tokens still to run (at least one, so
        the forward pass yields the distribution after the context)."""
        common = self._common_prefix(context)
        if common == len(context):
            common -= 1
        if common < len(self.tokens):
            self._truncate(common)
        return context[common:]

    # -- forward -----------------------------------------------------------------------------
    def _forward(self, inputs: list[int], num_scored: int) -> torch.Tensor:
        """Run `inputs` after the cache; return logits of the last `num_scored` positions."""
        t0 = time.perf_counter()
        dec, cache = self.decoder, self.cache
        full = cache if isinstance(cache, FullCache) else None
        start = full.length if full is not None else 0
        pieces = _split_for_cache(inputs, num_scored, self.prefill_chunk, cache, start)
        logits = None
        bar = None
        if self.progress and len(pieces) > 2:
            from tqdm import tqdm

            bar = tqdm(total=len(inputs), desc=f"prefill ({self.name})", unit="tok", leave=False)
        for kind, piece in pieces:
            if kind == "skip":
                cache.skip(piece)  # StreamingCache only: the middle of a long prompt
                continue
            scored = min(num_scored, len(piece)) if kind == "last" else 0
            ids = torch.tensor([piece], dtype=torch.long, device=dec.device)
            if scored:
                out = run_forward(dec, ids, cache, torch.arange(len(piece) - scored, len(piece)))
                logits = out[0]
            else:
                run_forward(dec, ids, cache, "none")
            if full is not None:
                end = full.length
                full.note_rows(end - len(piece), end, self.prefill_chunk,
                               kernel=kernel_runs(full.buffers(0, 0)[0], len(piece)))
            if bar is not None:
                bar.update(len(piece))
        if bar is not None:
            bar.close()
        self.stats.forward_calls += 1
        self.stats.forward_tokens += len(inputs)
        self.stats.time_s += time.perf_counter() - t0
        self.last_logit_offset = len(pieces[-1][1]) - num_scored
        assert logits is not None
        return logits

    def score(self, context: list[int], drafts: list[int]) -> torch.Tensor:
        pending = self.sync(context)
        logits = self._forward(pending + drafts, len(drafts) + 1)
        self.tokens = list(context) + list(drafts)
        return warp(logits, self.params)

    def propose(
        self, context: list[int], num_tokens: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        drafts: list[int] = []
        dists = []
        for _ in range(num_tokens):
            probs = self.score(context + drafts, [])[0]
            token = int(sample(probs, generator)) if not self.params.greedy else int(probs.argmax())
            drafts.append(token)
            dists.append(probs)
        return drafts, torch.stack(dists) if dists else None

    def rollback(self, length: int) -> None:
        if length < len(self.tokens):
            self._truncate(length)

    def snapshot(self) -> Any:
        cache = self.cache
        if isinstance(cache, StreamingCache):  # evicted rows cannot be recovered by truncation
            return list(self.tokens), (cache.k.clone(), cache.v.clone(), cache.slots, cache.seq_length)
        return list(self.tokens), None

    def restore(self, state: Any) -> None:
        tokens, saved = state
        if saved is not None:
            assert isinstance(self.cache, StreamingCache)
            k, v, self.cache.slots, self.cache.seq_length = saved
            self.cache.k.copy_(k)
            self.cache.v.copy_(v)
            self.tokens = list(tokens)
        else:
            self.rollback(self._common_prefix(tokens))


def _split_for_cache(
    inputs: list[int], num_scored: int, chunk: int, cache: Any, start: int = 0
) -> list[tuple[str, Any]]:
    """Pieces of a forward pass: ("fill", tokens), ("skip", count), ("last", tokens).

    Long inputs (prefill) run in chunks so activations stay bounded. A StreamingLLM cache keeps
    only its sink and window, so of a long prompt it runs the start (the sink) and the last
    window tokens; the rest it would evict unread.

    Other caches cut long inputs at multiples of `chunk` counted from the cache's first row
    (`start` is where the inputs begin): a row's keys and values then depend only on the
    tokens, never on where an earlier prompt happened to end, which keeps prompt caching exact.
    """
    pieces: list[tuple[str, Any]] = []
    if isinstance(cache, StreamingCache):
        room = cache.window
        chunk = min(chunk, cache.window + cache.slack)
        if len(inputs) > room + cache.sink:
            head_needed = max(0, cache.sink - cache.slots) if cache.slots <= cache.sink else 0
            head, tail = inputs[:head_needed], inputs[-room:]
            if head:
                pieces.append(("fill", head))
            pieces.append(("skip", len(inputs) - len(head) - len(tail)))
            inputs = tail
    elif len(inputs) > MAX_KERNEL_QUERIES:
        cuts = [start] + list(range((start // chunk + 1) * chunk, start + len(inputs), chunk)) + [start + len(inputs)]
        pieces = [("fill", inputs[a - start : b - start]) for a, b in zip(cuts, cuts[1:])]
        while len(pieces) > 1 and len(pieces[-1][1]) < num_scored:  # the scored rows stay in one pass
            pieces[-2:] = [("fill", pieces[-2][1] + pieces[-1][1])]
        pieces[-1] = ("last", pieces[-1][1])
        return pieces
    last_len = max(num_scored, min(chunk, len(inputs)))
    body, last = inputs[: len(inputs) - last_len], inputs[len(inputs) - last_len :]
    for i in range(0, len(body), chunk):
        pieces.append(("fill", body[i : i + chunk]))
    pieces.append(("last", last))
    return pieces


class SharedViewLevel(ModelLevel):
    """The target on a sparse view of the top's full cache (retrieval or StreamingLLM).

    Rows the top has verified are shared, so this level's tokens start as the top's; rows beyond
    hold its own drafts until the top overwrites them.
    """

    def __init__(self, name: str, decoder: Decoder, view: SparseView, top: ModelLevel, params: SamplingParams,
                 rebuild_every: int = 1) -> None:
        super().__init__(name, decoder, view, params)
        self.view = view
        self.top = top
        self.rebuild_every = max(1, rebuild_every)
        self.top_steps = 0

    def follow_top(self, query_index: int | None) -> None:
        """After a top verification: adopt the top's tokens, and re-select retrieval chunks."""
        self.tokens = list(self.top.tokens)
        self.view.truncate(len(self.tokens))
        if isinstance(self.view, RetrievalView):
            self.top_steps += 1
            stale = self.top_steps % self.rebuild_every == 0 or self.view.selected_at < 0
            if stale and query_index is not None:
                self.rebuild(query_index)

    def rebuild(self, query_index: int) -> None:
        assert isinstance(self.view, RetrievalView)
        t0 = time.perf_counter()
        full = self.top.cache
        assert isinstance(full, FullCache)
        queries = [q[0, query_index] for q in full.last_queries]
        self.view.rebuild(queries)
        self.stats.rebuilds += 1
        self.stats.rebuild_s += time.perf_counter() - t0

    def reset(self) -> None:
        super().reset()
        self.top_steps = 0
        if isinstance(self.view, RetrievalView):
            self.view.selected_at = -1

    def snapshot(self) -> Any:
        v = self.view
        return list(self.tokens), v.length, v.chunks, v.dense_start, getattr(v, "selected_at", None), self.top_steps

    def restore(self, state: Any) -> None:
        tokens, length, chunks, dense_start, selected_at, self.top_steps = state
        self.tokens = list(tokens)
        self.view.length, self.view.chunks, self.view.dense_start = length, chunks, dense_start
        if selected_at is not None:
            self.view.selected_at = selected_at


class NgramLevel(Level):
    """Prompt lookup: propose the continuation of the most recent earlier occurrence of the last
    n tokens (n from max_ngram down to min_ngram). Deterministic proposals (q one-hot) are
    verified losslessly like any other draft."""

    name = "ngram"

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.vocab_size = vocab_size
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.stats = LevelStats("ngram")
        self.indexed: list[int] = []
        self.index: dict[tuple[int, ...], list[int]] = {}

    def reset(self) -> None:
        self.indexed, self.index = [], {}

    def _update_index(self, context: list[int]) -> None:
        # positions p of n-grams context[p:p+n], kept in increasing order per n-gram
        common = 0
        n = min(len(self.indexed), len(context))
        common = n
        for i in range(max(0, n - TAIL_CHECK), n):
            if self.indexed[i] != context[i]:
                common = i
                break
        if common < len(self.indexed):
            for size in range(self.min_ngram, self.max_ngram + 1):
                for p in range(max(0, common - size + 1), len(self.indexed) - size + 1):
                    positions = self.index.get(tuple(self.indexed[p : p + size]))
                    if positions and positions[-1] == p:
                        positions.pop()
            del self.indexed[common:]
        for p in range(len(self.indexed), len(context)):
            self.indexed.append(context[p])
            for size in range(self.min_ngram, self.max_ngram + 1):
                start = p - size + 1
                if start >= 0:
                    self.index.setdefault(tuple(self.indexed[start : p + 1]), []).append(start)

    def propose(
        self, context: list[int], num_tokens: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        t0 = time.perf_counter()
        self._update_index(context)
        drafts: list[int] = []
        for size in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            positions = self.index.get(tuple(context[-size:]), [])
            # the most recent occurrence that is not the suffix itself
            for p in reversed(positions):
                if p + size < len(context):
                    drafts = context[p + size : p + size + num_tokens]
                    break
            if drafts:
                break
        self.stats.time_s += time.perf_counter() - t0
        if not drafts:
            return [], None
        probs = torch.zeros(len(drafts), self.vocab_size)
        probs[torch.arange(len(drafts)), torch.tensor(drafts)] = 1.0
        return drafts, probs


class Chain:
    """Levels bottom to top; gammas[i] is how many tokens level i gathers per call."""

    def __init__(self, levels: list[Level], gammas: list[int]) -> None:
        if len(gammas) != len(levels) - 1:
            raise ValueError("one gamma per level below the top")
        self.levels = levels
        self.gammas = gammas
        self.levels[-1].stats.is_top = True

    @property
    def top(self) -> ModelLevel:
        top = self.levels[-1]
        assert isinstance(top, ModelLevel)
        return top

    def reset(self) -> None:
        for level in self.levels:
            level.reset()

    def snapshot(self) -> list[Any]:
        return [level.snapshot() for level in self.levels]

    def restore(self, states: list[Any]) -> None:
        for level, state in zip(self.levels, states):
            level.restore(state)

    def _gather(
        self, i: int, context: list[int], want: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """At least `want` tokens sampled from level i's distribution (fewer only if the bottom
        has nothing to propose), with those distributions."""
        level = self.levels[i]
        if i == 0:
            return level.propose(context, want, generator)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        while len(tokens) < want:
            new, p = self._verify_step(i, context + tokens, generator)
            tokens += new
            probs.append(p)
        return tokens, torch.cat(probs)

    def _verify_step(
        self, i: int, context: list[int], generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor]:
        """One verification at level i: drafts from level i-1 (none for a lone level), one
        forward pass, accept/resample. Returns the new tokens and level i's distributions for
        them."""
        level = self.levels[i]
        drafts: list[int] = []
        q = None
        if i > 0:
            drafts, q = self._gather(i - 1, context, self.gammas[i - 1], generator)
        p = level.score(context, drafts)
        if drafts:
            accepted, next_token = verify(drafts, q, p, generator, greedy=_greedy(level))
            self.levels[i - 1].stats.record(len(drafts), accepted)
        else:
            accepted, next_token = 0, _draw(p[0], level, generator)
        level.rollback(len(context) + accepted)
        for lower in self.levels[:i]:
            lower.rollback(len(context) + accepted)
        return drafts[:accepted] + [next_token], p[: accepted + 1]

    def step(self, context: list[int], generator: torch.Generator | None) -> list[int]:
        """New tokens after `context` (at least one)."""
        top_index = len(self.levels) - 1
        new, _ = self._verify_step(top_index, context, generator)
        accepted = len(new) - 1
        query_index = self.top.last_logit_offset + accepted
        for level in self.levels[:-1]:
            if isinstance(level, SharedViewLevel):
                level.follow_top(query_index)
        return new


def _greedy(level: Level) -> bool:
    params = getattr(level, "params", None)
    return params is not None and params.greedy


def _draw(probs: torch.Tensor, level: Level, generator: torch.Generator | None) -> int:
    if _greedy(level):
        return int(probs.argmax())
    return int(sample(probs, generator))
