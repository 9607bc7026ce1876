"""A layer's attention over several sequences' caches: one native call, or one sequence at a time."""

from __future__ import annotations

import pytest
import torch

from triforce import native
from triforce.attention import KVSlot, attend_layer, attend_torch, gather_chunks
from triforce.config import ModelConfig
from triforce.rope import RotaryTable

CONFIG = ModelConfig("llama", 100, 576, 64, 1, 9, 3, 64, 1e-5, 10000.0, 4096, True)
# (cached rows, new tokens, capacity, retrieval chunks?)
SEQUENCES = [(700, 1, 800, False), (1300, 7, 1400, True), (90, 3, 96, False), (2049, 1, 2100, True)]


def make_spans(dtype: torch.dtype, seed: int = 3) -> tuple[torch.Tensor, list]:
    """qkv for the sequences' new tokens, one after another, and their slots on random caches."""
    g = torch.Generator().manual_seed(seed)
    spans, start = [], 0
    for n, T, cap, chunked in SEQUENCES:
        k = torch.randn(3, cap, 64, generator=g).to(dtype)
        v = torch.randn(3, cap, 64, generator=g).to(dtype)
        slot = KVSlot(k, v, n - T)
        if chunked:  # 12 chunks of 8 rows from the first half, per KV head
            slot.chunks = torch.stack([torch.randperm(n // 16, generator=g)[:12].sort().values * 8
                                       for _ in range(3)]).int()
            slot.chunk_size, slot.dense_start = 8, n - 40
        spans.append((slot, start, start + T, torch.arange(n - T, n)))
        start += T
    qkv = torch.randn(start, 9 + 2 * 3, 64, generator=g).to(dtype)
    return qkv, spans


@pytest.mark.skipif(native.library() is None, reason="native kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_call_for_a_batch_equals_each_sequence_alone(dtype):
    """One native call for a batch of sequences (different lengths, token counts, dense or
    retrieval keys, cache capacities) gives each sequence bit-identically what rotating, storing
    and attending it alone gives: outputs, rotated queries and the rows written to its cache."""
    rope = RotaryTable(CONFIG, None, 2100, 2100)
    qkv, together = make_spans(dtype)
    out, q = attend_layer(qkv, together, rope, 9, fused=True)
    _, alone = make_spans(dtype)
    for (slot, a, b, pos), (mine, *_) in zip(alone, together):
        q1 = native.rope_store(qkv[a:b], rope.cos, rope.sin, pos, slot.k, slot.v, slot.row, 9)
        o1 = native.attention(q1, slot.k, slot.v, slot.row + b - a, slot.row, slot.chunks, slot.chunk_size,
                              slot.dense_start, dtype)
        assert torch.equal(out[a:b], o1)
        assert torch.equal(q[a:b], q1)
        assert torch.equal(mine.k, slot.k) and torch.equal(mine.v, slot.v)


@pytest.mark.parametrize("fused", [True, False], ids=["native", "torch"])
def test_layer_attention_matches_a_dense_reference(fused):
    """Whatever path runs (the kernel, or PyTorch's rotation and SDPA), each sequence's output
    is attention over the keys its slot selects, rotated as the rotary table says (fp32)."""
    if fused and native.library() is None:
        pytest.skip("native kernels unavailable")
    rope = RotaryTable(CONFIG, None, 2100, 2100)
    qkv, spans = make_spans(torch.float32)
    out, q = attend_layer(qkv, spans, rope, 9, fused=fused)
    for slot, a, b, pos in spans:
        T = b - a
        expected_q = rope.rotate(qkv[a:b, :9], pos)
        assert (q[a:b].float() - expected_q).abs().max() < 1e-5
        assert (slot.k[:, slot.row : slot.row + T] - rope.rotate(qkv[a:b, 9:12], pos).transpose(0, 1)).abs().max() \
            < 1e-5
        k, v, first, rows = slot.k, slot.v, slot.row, slot.row + T
        if slot.chunks is not None:
            k, v, first, rows = gather_chunks(k, v, slot.chunks, slot.chunk_size, slot.dense_start, rows, first)
        assert (out[a:b] - attend_torch(expected_q, k, v, rows, first)).abs().max() < 1e-4


def test_a_slot_may_choose_its_keys_from_the_queries():
    """`choose` (a benchmark's oracle cache) sees the rotated queries and picks the rows."""
    rope = RotaryTable(CONFIG, None, 2100, 2100)
    qkv, spans = make_spans(torch.float32)
    slot, a, b, pos = spans[0]
    seen = []

    def choose(q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        seen.append(q)
        return torch.zeros(3, 1, dtype=torch.int32), 1, slot.row  # the first row and the new one
    slot.choose = choose
    out, _ = attend_layer(qkv[a:b], [(slot, 0, b - a, pos)], rope, 9, fused=native.library() is not None)
    assert len(seen) == 1 and seen[0].shape == (1, 9, 64)
    k, v, first, rows = gather_chunks(slot.k, slot.v, torch.zeros(3, 1, dtype=torch.int32), 1, slot.row,
                                      slot.row + 1, slot.row)
    assert (out - attend_torch(seen[0].float(), k, v, rows, first)).abs().max() < 1e-4
