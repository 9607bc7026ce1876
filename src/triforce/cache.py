"""KV caches: where each sequence's keys and values live, and which of them its queries see.

The decoder asks a cache for the RoPE positions of the tokens it is about to run
(`positions`), for each layer's slot (`slot`: the buffers new rows go to and the rows a query
may see), and tells it when the pass is over (`commit`). What the queries may see is the
cache's business:

- FullCache: every token, in preallocated per-layer buffers written in place; `truncate` drops
  rejected draft tokens in O(1).
- StreamingView, RetrievalView: the target attending to a subset of its own FullCache (the
  middle level of TriForce), reading its buffers in place.
- StreamingCache: a small draft model's own StreamingLLM cache.

Buffers are [layers, kv_heads, capacity, head_dim]: each (layer, head) is a contiguous
[capacity, head_dim] matrix, which is what the attention kernel streams. Each cache says how
many bytes it will take before it is built (`bytes_for`), and can snapshot and restore itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

import torch

from .attention import KVSlot
from .config import ModelConfig
from .errors import TriforceError

_HUGE_PAGE = 2 << 20


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(nbytes: int, what: str, advice: str = "use a shorter context or fewer tokens") -> None:
    """Refuse an allocation that would not fit in available memory, before making it."""
    available = available_memory_bytes()
    if available is not None and nbytes > 0.9 * available:
        raise TriforceError(
            f"{what} needs {nbytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory is "
            f"available; {advice}"
        )


@functools.cache
def _libc() -> ctypes.CDLL:
    # find_library runs ldconfig in a subprocess: once per process, not once per cache.
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _advise_huge_pages(t: torch.Tensor) -> None:
    # Long caches span many pages; transparent huge pages (madvise mode on most Linux hosts) cut
    # TLB misses when the attention kernel streams them. Best effort, before first touch.
    if t.device.type != "cpu" or not hasattr(os, "sysconf"):
        return
    try:
        libc = _libc()
        start = (t.data_ptr() + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
        end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass


def kv_bytes(config: ModelConfig, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of K and V buffers holding `capacity` tokens."""
    return capacity * config.kv_bytes_per_token(torch.finfo(dtype).bits // 8)


def allocate_kv(
    config: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
    if torch.device(device).type == "cpu":
        check_fits(kv_bytes(config, capacity, dtype), f"a KV cache of {capacity} tokens")
    k = torch.empty(shape, dtype=dtype, device=device)
    v = torch.empty(shape, dtype=dtype, device=device)
    for t in (k, v):
        _advise_huge_pages(t)
        t.zero_()
    return k, v


class FullCache:
    """The exact cache: every token's keys (stored after RoPE) and values."""

    record_queries = False  # set when a retrieval view needs the queries of the last pass

    def __init__(
        self, config: ModelConfig, capacity: int, dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.capacity = capacity
        self.k, self.v = allocate_kv(config, capacity, dtype, device)
        self.length = 0
        self.device = torch.device(device)
        # How the rows were computed, for prompt caching that stays exact (runner.Runner keeps
        # these up to date and reads them): rows [0, aligned_rows) ran in whole prefill chunks
        # [k C, (k+1) C) with C = aligned_chunk; rows [kernel_from, length) ran through the
        # attention kernel, whose rows do not depend on how many ran together.
        self.aligned_rows, self.aligned_chunk, self.kernel_from = 0, 0, 0
        # The rotated queries of the last pass (per layer [T, Hq, D]) and the row of its first
        # token, kept only when `record_queries`.
        self.last_queries: list[torch.Tensor] = []
        self.queries_from = 0

    @staticmethod
    def bytes_for(config: ModelConfig, capacity: int, dtype: torch.dtype) -> int:
        return kv_bytes(config, capacity, dtype)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def buffer_like(self) -> torch.Tensor:
        """A layer's key buffer, for what depends only on its dtype and device."""
        return self.k[0]

    def positions(self, num_tokens: int) -> torch.Tensor:
        if self.length + num_tokens > self.capacity:
            raise TriforceError(f"the KV cache holds {self.capacity} tokens; {self.length + num_tokens} would not fit")
        if self.record_queries:
            self.last_queries, self.queries_from = [], self.length
        return torch.arange(self.length, self.length + num_tokens, device=self.device)

    def slot(self, layer: int) -> KVSlot:
        return KVSlot(self.k[layer], self.v[layer], self.length)

    def visible_rows(self) -> int:
        """Rows a query at the current length reads (for the statistics)."""
        return self.length

    def saw_queries(self, layer: int, q: torch.Tensor) -> None:
        self.last_queries.append(q)

    def queries_at(self, row: int) -> list[torch.Tensor]:
        """Per layer, the query [Hq, D] of the token at `row`, which the last pass ran."""
        return [q[row - self.queries_from] for q in self.last_queries]

    def commit(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (rejected drafts)."""
        if length > self.length:
            raise ValueError(f"cannot truncate to {length}: the cache holds {self.length}")
        self.length = length
        if self.aligned_chunk:
            self.aligned_rows = min(self.aligned_rows, length // self.aligned_chunk * self.aligned_chunk)
        self.kernel_from = min(self.kernel_from, length)

    def grown(self, capacity: int, keep: int) -> FullCache:
        """A larger cache holding this one's first `keep` tokens (a cached prompt survives a
        longer run instead of being prefilled again)."""
        bigger = FullCache(self.config, capacity, self.k.dtype, self.device)
        for old, new in ((self.k, bigger.k), (self.v, bigger.v)):
            new[:, :, :keep].copy_(old[:, :, :keep])
        bigger.length = keep
        bigger.aligned_chunk = self.aligned_chunk
        bigger.aligned_rows, bigger.kernel_from = self.aligned_rows, self.kernel_from
        bigger.truncate(keep)
        return bigger

    def snapshot(self) -> int:
        return self.length

    def restore(self, state: int) -> None:
        self.truncate(state)


class SparseView:
    """The target attending to a subset of its own full cache (the middle level of TriForce).

    It reads the FullCache's buffers in place. Rows below `full.length` hold the target's exact
    KV; rows from there on hold this view's own draft tokens, which the full verification
    overwrites. Each query sees: the selected rows of the old context (`chunks` per layer and KV
    head, `chunk_size` rows each) plus every row from `dense_start` on. Subclasses decide the
    selection.
    """

    record_queries = False

    def __init__(self, full: FullCache) -> None:
        self.full = full
        self.length = 0
        self.chunk_size = 0
        self.chunks: list[torch.Tensor] | None = None  # per layer [Hkv, C] int32 start rows
        self.dense_start = 0

    @property
    def capacity(self) -> int:
        return self.full.capacity

    def positions(self, num_tokens: int) -> torch.Tensor:
        if self.length + num_tokens > self.full.capacity:
            raise TriforceError(f"the KV cache holds {self.full.capacity} tokens")
        self.before_pass(num_tokens)
        return torch.arange(self.length, self.length + num_tokens, device=self.full.device)

    def before_pass(self, num_tokens: int) -> None:
        pass

    def slot(self, layer: int) -> KVSlot:
        if self.chunks is None:
            return KVSlot(self.full.k[layer], self.full.v[layer], self.length)
        return KVSlot(self.full.k[layer], self.full.v[layer], self.length, self.chunks[layer], self.chunk_size,
                      self.dense_start)

    def visible_rows(self) -> int:
        if self.chunks is None:
            return self.length
        return int(self.chunks[0].shape[1]) * self.chunk_size + self.length - self.dense_start

    def commit(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        self.length = length

    def snapshot(self) -> Any:
        return self.length, self.chunks, self.dense_start

    def restore(self, state: Any) -> None:
        self.length, self.chunks, self.dense_start = state


class StreamingView(SparseView):
    """StreamingLLM attention over the target's own cache: `sink` first rows plus the last
    `window` rows (MagicDec-style self-speculation). Positions stay the true ones: the target
    reads long contexts natively, so no re-rotation is needed."""

    def __init__(self, full: FullCache, sink: int, window: int) -> None:
        super().__init__(full)
        self.sink, self.window = sink, window

    @staticmethod
    def bytes_for(*_: Any) -> int:
        return 0

    def before_pass(self, num_tokens: int) -> None:
        start = self.length - self.window
        if start <= self.sink:
            self.chunks = None
            return
        self.chunk_size = self.sink
        sink_rows = torch.zeros(self.full.config.num_kv_heads, 1 if self.sink else 0, dtype=torch.int32)
        self.chunks = [sink_rows] * self.full.config.num_layers
        self.dense_start = start


class RetrievalView(SparseView):
    """TriForce's retrieval cache: the chunks of the old context most relevant to the current
    query, per layer and KV head, plus the recent tokens.

    Chunks are `chunk_size` consecutive rows represented by their mean key (post-RoPE). A chunk's
    score for a KV head is the attention mass its mean key would receive, summed over the query
    heads that share that KV head: sum_h softmax_c(q_h . kbar_c / sqrt(d)). Summing normalised
    masses keeps one head with large logits from deciding alone for its group. The first chunk
    (attention sink) and the last `recent` rows are always kept; `budget` counts every row read.
    """

    def __init__(self, full: FullCache, budget: int, chunk_size: int = 8, recent: int = 64) -> None:
        super().__init__(full)
        self.budget, self.chunk_size, self.recent = budget, chunk_size, recent
        cfg = full.config
        self.max_chunks = full.capacity // chunk_size
        self.chunk_means = torch.zeros(
            cfg.num_layers, cfg.num_kv_heads, self.max_chunks, cfg.head_dim, dtype=torch.float32, device=full.device
        )
        self.means_ready = 0  # chunks whose mean key is computed (their rows never change again)
        self.selected_at = -1  # the context length of the last selection (-1: none yet)

    @staticmethod
    def bytes_for(config: ModelConfig, capacity: int, chunk_size: int) -> int:
        """The chunks' mean keys (float32)."""
        return config.num_layers * config.num_kv_heads * (capacity // chunk_size) * config.head_dim * 4

    def _dense_start(self, context: int) -> int:
        """First row of the recent rows every selection keeps, at a chunk boundary."""
        recent = min(self.recent, self.budget // 2)
        return (context - recent) // self.chunk_size * self.chunk_size

    def update_means(self) -> None:
        """The mean key of every chunk a selection at the current length may choose from. Called
        after a prefill too, so that a first selection costs what later ones do (a 32K prompt's
        means take a few hundred ms)."""
        cfg, cs = self.full.config, self.chunk_size
        n_old = self._dense_start(self.full.length) // cs
        if n_old <= self.means_ready:
            return
        a, b = self.means_ready * cs, n_old * cs
        for layer in range(cfg.num_layers):  # a layer at a time: all of a 32K prompt's keys in fp32 are 750 MB
            k = self.full.k[layer, :, a:b].float()  # [Hkv, rows, D]
            self.chunk_means[layer, :, self.means_ready : n_old] = k.view(
                cfg.num_kv_heads, n_old - self.means_ready, cs, cfg.head_dim).mean(2)
        self.means_ready = n_old

    def rebuild(self, queries: list[torch.Tensor]) -> None:
        """Select chunks for the context held by the full cache, given per-layer queries [Hq, D]."""
        cfg, cs = self.full.config, self.chunk_size
        context = self.full.length
        self.selected_at = context
        if context <= self.budget:
            self.chunks = None  # everything fits: exact full attention
            return
        dense_start = self._dense_start(context)
        n_old = dense_start // cs  # chunks available for selection
        keep = max(1, (self.budget - (context - dense_start)) // cs)
        if keep >= n_old:
            self.chunks = None
            return
        self.update_means()
        q = torch.stack([x.float() for x in queries])  # [L, Hq, D]
        chosen = (top_chunks(q, self.chunk_means[:, :, :n_old], keep, cfg) * cs).to(torch.int32)
        self.chunks = [chosen[i].contiguous() for i in range(cfg.num_layers)]
        self.dense_start = dense_start

    def snapshot(self) -> Any:
        return super().snapshot(), self.selected_at

    def restore(self, state: Any) -> None:
        view, self.selected_at = state
        super().restore(view)


def top_chunks(q: torch.Tensor, means: torch.Tensor, keep: int, config: ModelConfig) -> torch.Tensor:
    """The `keep` chunks (ascending indices [L, Hkv, keep]) a retrieval cache reads, given the
    queries q [L, Hq, D] and the chunks' mean keys [L, Hkv, C, D]: chunk 0 (the attention sink)
    and the keep - 1 others whose mean key receives the most attention mass, summed over the
    query heads sharing the KV head."""
    layers = q.shape[0]
    q = q.view(layers, config.num_kv_heads, config.group_size, config.head_dim)
    logits = torch.einsum("lhgd,lhcd->lhgc", q, means[:, :, 1:]) * config.head_dim**-0.5
    mass = logits.softmax(-1).sum(2)  # [L, Hkv, C-1]
    top = torch.topk(mass, keep - 1, dim=-1).indices + 1
    zero = torch.zeros(layers, config.num_kv_heads, 1, dtype=top.dtype, device=top.device)
    return torch.cat([zero, top], dim=-1).sort(-1).values


class StreamingCache:
    """StreamingLLM cache with its own buffers, for a small draft model: `sink` first tokens
    plus a window of recent ones. Keys are rotated for their slot in the cache, not their
    position in the text, so the draft never sees a position beyond sink + window + slack
    however long the document is. When the buffer is full the oldest window tokens are dropped
    in one step and the survivors' keys re-rotated to their new slots (amortised; exact RoPE
    shift). `truncate` rolls back the most recent tokens (rejected drafts)."""

    record_queries = False
    SLACK = 64  # slots past sink + window, so eviction happens once per SLACK tokens

    def __init__(
        self,
        config: ModelConfig,
        sink: int,
        window: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.sink, self.window, self.slack = sink, window, self.SLACK
        self.capacity = sink + window + self.slack
        self.k, self.v = allocate_kv(config, self.capacity, dtype, device)
        self.device = torch.device(device)
        self.slots = 0  # filled slots
        self.length = 0  # tokens of the text this cache has consumed
        self.rope: Any = None  # set by the owner: the draft's RotaryTable, for re-rotation

    @classmethod
    def bytes_for(cls, config: ModelConfig, sink: int, window: int, dtype: torch.dtype) -> int:
        return kv_bytes(config, sink + window + cls.SLACK, dtype)

    def positions(self, num_tokens: int) -> torch.Tensor:
        if num_tokens > self.window + self.slack:
            raise ValueError("feed a StreamingCache at most window + slack tokens at a time")
        if self.slots + num_tokens > self.capacity:
            self._evict(self.slots + num_tokens - self.capacity)
        return torch.arange(self.slots, self.slots + num_tokens, device=self.device)

    def _evict(self, at_least: int) -> None:
        # Drop the oldest window tokens so `slack` slots are free again (or `at_least`).
        drop = max(at_least, min(self.slack, self.slots - self.sink))
        keep_from = self.sink + drop
        moved = self.slots - keep_from
        if moved > 0:
            delta = torch.full((moved,), -drop, device=self.device)
            src_k = self.k[:, :, keep_from : self.slots]
            shifted = self.rope.shift(src_k.transpose(1, 2), delta)  # [L, moved, Hkv, D]
            self.k[:, :, self.sink : self.sink + moved] = shifted.transpose(1, 2)
            self.v[:, :, self.sink : self.sink + moved] = self.v[:, :, keep_from : self.slots].clone()
        self.slots = self.sink + max(moved, 0)

    def slot(self, layer: int) -> KVSlot:
        return KVSlot(self.k[layer], self.v[layer], self.slots)

    def visible_rows(self) -> int:
        return self.slots

    def commit(self, num_tokens: int) -> None:
        self.slots += num_tokens
        self.length += num_tokens

    def skip(self, num_tokens: int) -> None:
        """Let `num_tokens` tokens of the text pass unseen (a long prompt's middle: StreamingLLM
        would evict them anyway), keeping the sink."""
        self.slots = min(self.slots, self.sink)
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        back = self.length - length
        # the last `back` tokens must still be held: all of them when nothing was evicted or
        # skipped yet (a short prompt lies inside the sink), else only window rows
        held = self.slots if self.length == self.slots else self.slots - self.sink
        if back < 0 or back > held:
            raise ValueError(f"cannot roll a StreamingCache back by {back} tokens")
        self.slots -= back
        self.length = length

    def reset(self) -> None:
        self.slots = self.length = 0

    def snapshot(self) -> Any:
        # evicted rows cannot be recovered by truncation: keep the buffers themselves
        return self.k.clone(), self.v.clone(), self.slots, self.length

    def restore(self, state: Any) -> None:
        k, v, self.slots, self.length = state
        self.k.copy_(k)
        self.v.copy_(v)
