"""Attention of a pass's new queries over the keys each sequence's cache lets it see.

Two implementations with one contract:
- a native CPU kernel (kernels/attention.c, compiled on first use) for decoding and
  verification: it streams the cache once, for all query heads sharing a KV head, and reads
  retrieval chunks in place instead of gathering them; on bf16 caches without AMX, prefill too;
- PyTorch (grouped-query SDPA), used for other long prefill chunks, on other devices, and
  whenever the kernel is unavailable.

Contract: q [T, Hq, D] are the queries of the tokens at key rows first_row .. first_row+T-1;
keys live in k/v [Hkv, capacity, D]; query t may see key row j iff j <= first_row + t. The keys a
query head group looks at are either every row below `num_rows`, or `chunks` [Hkv, C] (start
rows of `chunk_size`-row chunks, per KV head) plus the dense rows [dense_start, num_rows).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import native


@dataclass
class KVSlot:
    """Where a sequence's new keys and values go (rows `row`.. of k/v [Hkv, capacity, D]) and
    which older rows its queries see: all of them (chunks None), or `chunks` plus the dense rows
    from `dense_start`. A cache that picks keys by the queries themselves (a benchmark's oracle)
    sets `choose`, which maps the rotated queries to (chunks, chunk_size, dense_start)."""

    k: torch.Tensor
    v: torch.Tensor
    row: int
    chunks: torch.Tensor | None = None
    chunk_size: int = 0
    dense_start: int = 0
    choose: Callable[[torch.Tensor], tuple[torch.Tensor | None, int, int]] | None = None


def kernel_query_limit(k: torch.Tensor) -> int:
    """The most new tokens per pass over cache buffer `k` that go through the native kernel (0:
    none). The one place this is decided: the prompt cache relies on knowing which rows the
    kernel wrote."""
    if not native.usable_for(k):
        return 0
    return sys.maxsize if native.prefill_on_kernel(k) else native.MAX_KERNEL_QUERIES


def kernel_runs(k: torch.Tensor, num_queries: int) -> bool:
    """Whether `num_queries` new tokens over cache buffer `k` go through the native kernel
    (`kernel_query_limit`, with the per-layer decoding case answered first)."""
    if num_queries <= native.MAX_KERNEL_QUERIES:
        return native.usable_for(k)
    return num_queries <= kernel_query_limit(k)


def attend_layer(
    qkv: torch.Tensor, spans: list[tuple[KVSlot, int, int, torch.Tensor]], rope: Any, num_heads: int, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's attention for a pass: qkv [N, Hq + 2 Hkv, D] straight from the projection
    holds the tokens of one or more sequences; spans (slot, start, end, positions [end-start])
    say whose. Rotates q and k, writes k and v at each slot, attends. Returns the output
    [N, Hq, D] (qkv's dtype) and the rotated queries [N, Hq, D].

    Where every sequence takes the kernel (`fused`: the native glue is loaded), all of it is
    one native call; otherwise each sequence is rotated and stored, then attends on its own.
    A sequence's rows come out the same either way (the kernel's result for a row does not
    depend on the other rows of the call)."""
    nq = num_heads
    if fused and all(slot.choose is None and kernel_runs(slot.k, b - a) and slot.k.dtype == qkv.dtype
                     for slot, a, b, _ in spans):
        fields, keep = [], []
        for slot, a, b, _ in spans:
            chunks, n_chunks, dense_start = native.chunk_args(slot.chunks, slot.dense_start)
            keep.append(chunks)  # alive until the call returns
            fields.append([slot.k.data_ptr(), slot.v.data_ptr(), slot.k.stride(0), slot.row, b - a,
                           chunks.data_ptr() if chunks is not None else 0, n_chunks, slot.chunk_size, dense_start])
        positions = spans[0][3] if len(spans) == 1 else torch.cat([pos for *_, pos in spans])
        out, q = native.rope_attention_many(qkv, rope.cos, rope.sin, positions, fields, nq)
        return out, q
    outs, queries = [], []
    for slot, a, b, positions in spans:
        part = qkv[a:b]
        T = b - a
        if fused:  # rotation and the cache write in one native call
            q = native.rope_store(part, rope.cos, rope.sin, positions, slot.k, slot.v, slot.row, nq)
        else:
            nkv = (part.shape[1] - nq) // 2
            qk = rope.rotate(part[:, : nq + nkv], positions)
            q = qk[:, :nq]
            slot.k[:, slot.row : slot.row + T] = qk[:, nq:].transpose(0, 1)
            slot.v[:, slot.row : slot.row + T] = part[:, nq + nkv :].transpose(0, 1)
        chunks, chunk_size, dense_start = slot.chunks, slot.chunk_size, slot.dense_start
        if slot.choose is not None:
            chunks, chunk_size, dense_start = slot.choose(q)
        outs.append(attend(q, slot.k, slot.v, slot.row + T, slot.row, chunks, chunk_size, dense_start, qkv.dtype))
        queries.append(q)
    if len(outs) == 1:
        return outs[0], queries[0]
    return torch.cat(outs), torch.cat([q.float() for q in queries])


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_rows: int,
    first_row: int,
    chunks: torch.Tensor | None = None,
    chunk_size: int = 0,
    dense_start: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    out_dtype = out_dtype or k.dtype
    if kernel_runs(k, q.shape[0]):
        return native.attention(q, k, v, num_rows, first_row, chunks, chunk_size, dense_start, out_dtype)
    T = q.shape[0]
    if 1 < T <= native.MAX_KERNEL_QUERIES and first_row == num_rows - T:
        # PyTorch's attention rounds a row differently with other rows beside it: a verification
        # row is attended alone, as the step decoding it would (exact; T reads of the cache).
        return torch.cat([attend(q[i : i + 1], k, v, first_row + i + 1, first_row + i, chunks, chunk_size,
                                 dense_start, out_dtype) for i in range(T)])
    if chunks is not None:
        k, v, first_row, num_rows = gather_chunks(k, v, chunks, chunk_size, dense_start, num_rows, first_row)
    return attend_torch(q.to(k.dtype), k, v, num_rows, first_row).to(out_dtype)


def attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_rows: int, first_row: int) -> torch.Tensor:
    """Dense attention with PyTorch's grouped-query SDPA (no per-group copy of K/V)."""
    T, nq, hd = q.shape
    if T > 1 and first_row == num_rows - T and q.device.type == "cpu":
        out = _attend_prefix_and_block(q, k, v, first_row)
        if out is not None:
            return out
    keys = k[:, :num_rows].unsqueeze(0)
    values = v[:, :num_rows].unsqueeze(0)
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
    mask = None
    if T > 1 or first_row < num_rows - 1:
        rows = torch.arange(num_rows, device=q.device)
        mask = rows[None, :] <= (first_row + torch.arange(T, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(
        qh, keys, values, attn_mask=mask, enable_gqa=k.shape[0] != nq
    )
    return out[0].transpose(0, 1)


def _attend_prefix_and_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor | None:
    """A chunk of new queries over a long cache, as two mask-free flash-attention calls.

    With an explicit mask the CPU flash kernel computes every block; split instead into the
    cached prefix (every query sees every key: no mask, and the query heads of a group folded
    into one matrix so K/V are read once) and the causal block of the new tokens (is_causal, so
    masked tiles are skipped), then merge the two with their log-sum-exps.
    """
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None:
        return None
    T, nq, hd = q.shape
    nkv = k.shape[0]
    group = nq // nkv
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
    new_k = k[:, prefix : prefix + T].repeat_interleave(group, 0).unsqueeze(0)
    new_v = v[:, prefix : prefix + T].repeat_interleave(group, 0).unsqueeze(0)
    try:
        out_b, lse_b = flash(qh, new_k, new_v, 0.0, True)[:2]
        if prefix == 0:
            return out_b[0].transpose(0, 1)
        folded = q.view(T, nkv, group, hd).permute(1, 2, 0, 3).reshape(1, nkv, group * T, hd)
        out_a, lse_a = flash(folded, k[:, :prefix].unsqueeze(0), v[:, :prefix].unsqueeze(0), 0.0, False)[:2]
    except RuntimeError:
        return None
    out_a = out_a.reshape(nq, T, hd)
    lse_a = lse_a.reshape(nq, T)
    out_b, lse_b = out_b[0], lse_b[0]
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    merged = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / (wa + wb)[..., None]
    return merged.to(q.dtype).transpose(0, 1)


def gather_chunks(
    k: torch.Tensor,
    v: torch.Tensor,
    chunks: torch.Tensor,
    chunk_size: int,
    dense_start: int,
    num_rows: int,
    first_row: int,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Copy the selected chunks and the dense tail into contiguous buffers (fallback path)."""
    nkv = k.shape[0]
    offsets = torch.arange(chunk_size, device=k.device)
    rows = (chunks.long()[:, :, None] + offsets).reshape(nkv, -1)  # [Hkv, C*chunk]
    tail = torch.arange(dense_start, num_rows, device=k.device).expand(nkv, -1)
    rows = torch.cat([rows, tail], dim=1)
    index = rows[:, :, None].expand(-1, -1, k.shape[-1])
    gathered_k = torch.gather(k, 1, index)
    gathered_v = torch.gather(v, 1, index)
    n = rows.shape[1]
    # The new queries sit at the end of the dense tail, so causality keeps its offset from the end.
    return gathered_k, gathered_v, first_row - num_rows + n, n
