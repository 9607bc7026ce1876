"""KV caches behind one small interface.

The decoder asks a cache for the RoPE positions of the tokens it is about to run
(`positions`), hands it each layer's new queries, keys and values (`attend`), and tells it when
the forward pass is over (`commit`). What the queries may see is the cache's business:

- FullCache: every token, in preallocated per-layer buffers written in place; `truncate` drops
  rejected draft tokens in O(1).
- (speculative caches, built on a FullCache or their own buffers, live in speculative.py's
  neighbours: StreamingCache and RetrievalCache below.)

Buffers are [layers, batch, kv_heads, capacity, head_dim]: each (layer, sequence, head) is a
contiguous [capacity, head_dim] matrix, which is what the attention kernel streams.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

import torch

from . import native
from .attention import AttentionJob, attend_many, kernel_runs
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


def check_fits(nbytes: int, what: str) -> None:
    """Refuse an allocation that would not fit in available memory, before making it."""
    available = available_memory_bytes()
    if available is not None and nbytes > 0.9 * available:
        raise TriforceError(
            f"{what} needs {nbytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory is "
            "available; use a shorter context (--max-context) or fewer tokens"
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


def allocate_kv(
    config: ModelConfig, capacity: int, batch: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim)
    nbytes = 2 * torch.Size(shape).numel() * (torch.finfo(dtype).bits // 8)
    if torch.device(device).type == "cpu":
        check_fits(nbytes, f"a KV cache of {capacity} tokens")
    k = torch.empty(shape, dtype=dtype, device=device)
    v = torch.empty(shape, dtype=dtype, device=device)
    for t in (k, v):
        _advise_huge_pages(t)
        t.zero_()
    return k, v


class RowCache:
    """Shared mechanics: where a layer's new keys/values go, and attention over what is visible.

    Subclasses say where sequence b's new rows start (`write_row`), which buffers hold them
    (`buffers`) and which rows a query sees (`visible`). The decoder calls `attend` with rotated
    q/k (PyTorch path) or `attend_qkv` with the raw projection (fused native path: rotary
    embedding, cache write and conversion in one call).
    """

    batch = 1
    keep_queries = False  # whether saw_queries wants each pass's queries

    def buffers(self, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def write_row(self, b: int) -> int:
        raise NotImplementedError

    def visible(self, layer: int, b: int) -> tuple[torch.Tensor | None, int, int]:
        """(chunks [Hkv, C] or None, chunk_size, dense_start) for sequence b at `layer`."""
        return None, 0, 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        jobs = []
        T = q.shape[1]
        for b in range(self.batch):
            kb, vb = self.buffers(layer, b)
            row = self.write_row(b)
            kb[:, row : row + T] = k[b].transpose(0, 1)
            vb[:, row : row + T] = v[b].transpose(0, 1)
            jobs.append(self._job(layer, b, q[b], kb, vb, row))
        if self.keep_queries:
            self.saw_queries(layer, q)
        return attend_many(jobs, q.dtype).view(q.shape)

    def _job(self, layer: int, b: int, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, row: int) -> AttentionJob:
        chunks, chunk_size, dense_start = self.visible(layer, b)
        return AttentionJob(q, kb, vb, row + q.shape[0], row, chunks, chunk_size, dense_start)

    def attend_qkv(
        self, layer: int, qkv: torch.Tensor, rope: Any, positions: torch.Tensor, num_heads: int
    ) -> torch.Tensor:
        """qkv [B, T, Hq + 2 Hkv, D] straight from the projection; returns [B, T, Hq, D]."""
        jobs = self.store_qkv(layer, qkv, rope, positions, num_heads)
        return attend_many(jobs, qkv.dtype).view(len(jobs), -1, *jobs[0].q.shape[1:])

    def store_qkv(
        self, layer: int, qkv: torch.Tensor, rope: Any, positions: torch.Tensor, num_heads: int
    ) -> list[AttentionJob]:
        """Rotate and store each sequence's new keys and values (fused native call); return
        the attention each sequence's queries then need, one job per sequence."""
        jobs = []
        for b in range(self.batch):
            kb, vb = self.buffers(layer, b)
            row = self.write_row(b)
            q = native.rope_store(qkv[b], rope.cos, rope.sin, positions[b], kb, vb, row, num_heads)
            jobs.append(self._job(layer, b, q, kb, vb, row))
        if self.keep_queries:
            self.saw_queries(layer, torch.stack([job.q for job in jobs]))
        return jobs

    def saw_queries(self, layer: int, q: torch.Tensor) -> None:
        pass


def attend_qkv_batch(
    layer: int, qkv: torch.Tensor, rope: Any, spans: list[tuple[Any, int, int, torch.Tensor]],
    positions: torch.Tensor, num_heads: int,
) -> torch.Tensor:
    """attend_qkv for a batch step: qkv [1, N, Hq + 2 Hkv, D] holds several sequences' tokens,
    spans (cache, start, end, its positions) say whose; positions [N] are theirs concatenated.
    Where every cache takes the plain path (one sequence, the kernel's dtype, no per-query key
    choice), rotation, cache writes and attention for the whole batch are one native call;
    otherwise each cache stores its rows and the attention runs as one kernel call of jobs."""
    if all(_plain(c, qkv, b - a) for c, a, b, _ in spans):
        fields, keep = [], []
        for cache, a, b, _ in spans:
            kb, vb = cache.buffers(layer, 0)
            selection, chunk_size, dense_start = cache.visible(layer, 0)
            chunks, n_chunks, dense_start = native.chunk_args(selection, dense_start)
            keep.append(chunks)  # alive until the call returns
            fields.append([kb.data_ptr(), vb.data_ptr(), kb.stride(0), cache.write_row(0), b - a,
                           chunks.data_ptr() if chunks is not None else 0, n_chunks, chunk_size, dense_start])
        out, q = native.rope_attention_many(qkv[0], rope.cos, rope.sin, positions, fields, num_heads)
        for cache, a, b, _ in spans:
            if cache.keep_queries:
                cache.saw_queries(layer, q[a:b].unsqueeze(0))
        return out.unsqueeze(0)
    jobs = [j for c, a, b, pos in spans for j in c.store_qkv(layer, qkv[:, a:b], rope, pos, num_heads)]
    return attend_many(jobs, qkv.dtype).unsqueeze(0)


def _plain(cache: Any, qkv: torch.Tensor, num_tokens: int) -> bool:
    if not isinstance(cache, RowCache) or cache.batch != 1 or type(cache)._job is not RowCache._job:
        return False
    k, _ = cache.buffers(0, 0)
    return kernel_runs(k, num_tokens) and k.dtype == qkv.dtype


class FullCache(RowCache):
    """The exact cache: every token's keys and values (keys stored after RoPE)."""

    def __init__(
        self,
        config: ModelConfig,
        capacity: int,
        batch: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.capacity = capacity
        self.batch = batch
        self.k, self.v = allocate_kv(config, capacity, batch, dtype, device)
        # per layer and sequence, made once: indexing anew costs two tensor ops per layer per step
        self.views = [[(self.k[i, b], self.v[i, b]) for b in range(batch)] for i in range(config.num_layers)]
        self.lengths = [0] * batch
        self.device = torch.device(device)
        # How the rows were computed, for prompt caching that stays exact (see `reusable`):
        # rows [0, aligned_rows) ran in whole prefill chunks [k C, (k+1) C) with C = aligned_chunk;
        # rows [kernel_from, length) ran through the attention kernel (few tokens per pass),
        # whose rows do not depend on how many ran together.
        self.aligned_rows, self.aligned_chunk, self.kernel_from = 0, 0, 0
        # Queries of the last forward pass, kept only when a retrieval cache asks for them.
        self.keep_queries = False
        self.last_queries: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return self.lengths[0]

    def positions(self, num_tokens: int) -> torch.Tensor:
        for n in self.lengths:
            if n + num_tokens > self.capacity:
                raise TriforceError(
                    f"the KV cache holds {self.capacity} tokens; {n + num_tokens} would not fit"
                )
        if self.keep_queries:
            self.last_queries = []
        return torch.stack(
            [torch.arange(n, n + num_tokens, device=self.device) for n in self.lengths]
        )

    def buffers(self, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views[layer][b]

    def write_row(self, b: int) -> int:
        return self.lengths[b]

    def saw_queries(self, layer: int, q: torch.Tensor) -> None:
        if self.keep_queries:
            self.last_queries.append(q)

    def commit(self, num_tokens: int) -> None:
        self.lengths = [n + num_tokens for n in self.lengths]

    def grown(self, capacity: int, keep: int) -> FullCache:
        """A larger cache holding this one's first `keep` tokens (a cached prompt survives a
        longer run instead of being prefilled again)."""
        bigger = FullCache(self.config, capacity, self.batch, self.k.dtype, self.device)
        for old, new in ((self.k, bigger.k), (self.v, bigger.v)):
            new[:, :, :, :keep].copy_(old[:, :, :, :keep])
        bigger.lengths = [keep] * self.batch
        bigger.aligned_chunk = self.aligned_chunk
        bigger.aligned_rows, bigger.kernel_from = self.aligned_rows, self.kernel_from
        bigger.truncate(keep)
        return bigger

    def note_rows(self, start: int, end: int, chunk: int, kernel: bool) -> None:
        """Rows [start, end) were just computed in one pass (of chunk size `chunk`)."""
        if self.aligned_chunk != chunk:
            self.aligned_chunk, self.aligned_rows = chunk, 0
        if start == self.aligned_rows and start % chunk == 0 and end - start == chunk:
            self.aligned_rows = end
        if not kernel:
            self.kernel_from = end

    def reusable(self, common: int, prompt_len: int, chunk: int, kernel_max: int) -> int:
        """How many of the `common` leading rows shared with a new prompt hold exactly what a
        fresh prefill of that prompt would compute. A fresh prefill runs whole chunks
        [k C, (k+1) C) and then a final piece [base, prompt_len): rows of the same whole chunks
        match, and when the final piece is short enough for the attention kernel, rows the kernel
        computed (decoded tokens, or an earlier short final piece) match too. When the kernel
        takes passes of any length, a fresh prefill runs every row through it, and a kernel row
        does not depend on how the tokens were split into passes: every row it wrote matches."""
        if kernel_max >= prompt_len and self.kernel_from == 0:
            return common
        aligned = self.aligned_rows if self.aligned_chunk == chunk else 0
        base = (prompt_len - 1) // chunk * chunk if prompt_len else 0
        if prompt_len - base <= kernel_max and aligned >= base and self.kernel_from <= base:
            return common
        return min(common, aligned, base)

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (rejected drafts)."""
        if length > min(self.lengths):
            raise ValueError(f"cannot truncate to {length}: cache holds {self.lengths}")
        self.lengths = [length] * len(self.lengths)
        if self.aligned_chunk:
            self.aligned_rows = min(self.aligned_rows, length // self.aligned_chunk * self.aligned_chunk)
        self.kernel_from = min(self.kernel_from, length)


class SparseView(RowCache):
    """The target attending to a subset of its own full cache (the middle level of TriForce).

    It reads the FullCache's buffers in place. Rows below `full.length` hold the target's exact
    KV; rows from there on hold this view's own draft tokens, which the full verification
    overwrites. Each query sees: the selected rows of the old context (`chunks` per layer and KV
    head, `chunk_size` rows each) plus every row from `dense_start` on. Subclasses decide the
    selection.
    """

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
        self.before_forward(num_tokens)
        return torch.arange(self.length, self.length + num_tokens, device=self.full.device).unsqueeze(0)

    def before_forward(self, num_tokens: int) -> None:
        pass

    def buffers(self, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full.views[layer][0]

    def write_row(self, b: int) -> int:
        return self.length

    def visible(self, layer: int, b: int) -> tuple[torch.Tensor | None, int, int]:
        if self.chunks is None:
            return None, 0, 0
        return self.chunks[layer], self.chunk_size, self.dense_start

    def commit(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        self.length = length

    def attended_tokens(self) -> int:
        """How many keys a query at the current length reads (for reports)."""
        if self.chunks is None:
            return self.length
        return int(self.chunks[0].shape[1]) * self.chunk_size + (self.length - self.dense_start)


class StreamingView(SparseView):
    """StreamingLLM attention over the target's own cache: `sink` first rows plus the last
    `window` rows (MagicDec-style self-speculation). Positions stay the true ones: the target
    reads long contexts natively, so no re-rotation is needed."""

    def __init__(self, full: FullCache, sink: int, window: int) -> None:
        super().__init__(full)
        self.sink, self.window = sink, window

    def before_forward(self, num_tokens: int) -> None:
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
        if budget < 1 or chunk_size < 1:
            raise TriforceError("retrieval budget and chunk size must be positive")
        self.budget, self.chunk_size, self.recent = budget, chunk_size, recent
        cfg = full.config
        self.max_chunks = full.capacity // chunk_size
        self.chunk_means = torch.zeros(
            cfg.num_layers, cfg.num_kv_heads, self.max_chunks, cfg.head_dim, dtype=torch.float32, device=full.device
        )
        self.means_ready = 0  # chunks whose mean key is computed (their rows never change again)
        self.selected_at = -1

    def rebuild(self, queries: list[torch.Tensor]) -> None:
        """Select chunks for the context held by the full cache, given per-layer queries [Hq, D]."""
        cfg, cs = self.full.config, self.chunk_size
        context = self.full.length
        if context <= self.budget:
            self.chunks = None  # everything fits: exact full attention
            self.selected_at = context
            return
        recent = min(self.recent, self.budget // 2)
        dense_start = (context - recent) // cs * cs
        n_old = dense_start // cs  # chunks available for selection
        keep = max(1, (self.budget - (context - dense_start)) // cs)
        if keep >= n_old:
            self.chunks = None
            self.selected_at = context
            return
        if n_old > self.means_ready:
            a, b = self.means_ready * cs, n_old * cs
            k = self.full.k[:, 0, :, a:b].float()  # [L, Hkv, rows, D]
            self.chunk_means[:, :, self.means_ready : n_old] = k.view(
                cfg.num_layers, cfg.num_kv_heads, n_old - self.means_ready, cs, cfg.head_dim
            ).mean(3)
            self.means_ready = n_old
        q = torch.stack([x.float() for x in queries])  # [L, Hq, D]
        q = q.view(cfg.num_layers, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
        means = self.chunk_means[:, :, 1:n_old]  # [L, Hkv, C-1, D]; chunk 0 is always kept
        logits = torch.einsum("lhgd,lhcd->lhgc", q, means) * cfg.head_dim**-0.5
        mass = logits.softmax(-1).sum(2)  # [L, Hkv, C-1]
        top = torch.topk(mass, keep - 1, dim=-1).indices + 1
        zero = torch.zeros(cfg.num_layers, cfg.num_kv_heads, 1, dtype=top.dtype, device=top.device)
        chosen = torch.cat([zero, top], dim=-1).sort(-1).values * cs
        chosen = chosen.to(torch.int32)
        self.chunks = [chosen[i].contiguous() for i in range(cfg.num_layers)]
        self.dense_start = dense_start
        self.selected_at = context


class StreamingCache(RowCache):
    """StreamingLLM cache with its own buffers, for a small draft model: `sink` first tokens
    plus a window of recent ones. Keys are rotated for their slot in the cache, not their
    position in the text, so the draft never sees a position beyond sink + window + slack
    however long the document is. When the buffer is full the oldest window tokens are dropped
    in one step and the survivors' keys re-rotated to their new slots (amortised; exact RoPE
    shift). `truncate` rolls back the most recent tokens (rejected drafts)."""

    def __init__(
        self,
        config: ModelConfig,
        sink: int,
        window: int,
        slack: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        if sink < 0 or window < 1:
            raise TriforceError("StreamingLLM needs sink >= 0 and window >= 1")
        self.config = config
        self.sink, self.window, self.slack = sink, window, slack
        self.capacity = sink + window + slack
        self.k, self.v = allocate_kv(config, self.capacity, 1, dtype, device)
        self.device = torch.device(device)
        self.slots = 0  # filled slots
        self.seq_length = 0  # tokens of the text this cache has consumed
        self.rope = None  # set by the owner: the draft's RotaryTable, for re-rotation

    @property
    def length(self) -> int:
        return self.seq_length

    def positions(self, num_tokens: int) -> torch.Tensor:
        if num_tokens > self.window + self.slack:
            raise ValueError("feed a StreamingCache at most window + slack tokens at a time")
        if self.slots + num_tokens > self.capacity:
            self._evict(self.slots + num_tokens - self.capacity)
        return torch.arange(self.slots, self.slots + num_tokens, device=self.device).unsqueeze(0)

    def _evict(self, at_least: int) -> None:
        # Drop the oldest window tokens so `slack` slots are free again (or `at_least`).
        drop = max(at_least, min(self.slack, self.slots - self.sink))
        keep_from = self.sink + drop
        moved = self.slots - keep_from
        if moved > 0:
            delta = torch.full((moved,), -drop, device=self.device)
            src_k = self.k[:, :, :, keep_from : self.slots]
            shifted = self.rope.shift(src_k.transpose(2, 3), delta)  # [L, B, moved, Hkv, D]
            self.k[:, :, :, self.sink : self.sink + moved] = shifted.transpose(2, 3)
            self.v[:, :, :, self.sink : self.sink + moved] = self.v[:, :, :, keep_from : self.slots].clone()
        self.slots = self.sink + max(moved, 0)

    def buffers(self, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, 0], self.v[layer, 0]

    def write_row(self, b: int) -> int:
        return self.slots

    def commit(self, num_tokens: int) -> None:
        self.slots += num_tokens
        self.seq_length += num_tokens

    def skip(self, num_tokens: int) -> None:
        """Let `num_tokens` tokens of the text pass unseen (a long prompt's middle: StreamingLLM
        would evict them anyway), keeping the sink."""
        self.slots = min(self.slots, self.sink)
        self.seq_length += num_tokens

    def truncate(self, length: int) -> None:
        back = self.seq_length - length
        # the last `back` tokens must still be held: all of them when nothing was evicted or
        # skipped yet (a short prompt lies inside the sink), else only window rows
        held = self.slots if self.seq_length == self.slots else self.slots - self.sink
        if back < 0 or back > held:
            raise ValueError(f"cannot roll a StreamingCache back by {back} tokens")
        self.slots -= back
        self.seq_length = length
