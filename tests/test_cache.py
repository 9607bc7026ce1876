"""KV caches: what each holds, what each lets a query see, their sizes, snapshots and rollbacks."""

from __future__ import annotations

import pytest
import torch

from triforce.cache import FullCache, RetrievalView, StreamingCache, StreamingView
from triforce.config import ModelConfig
from triforce.errors import TriforceError
from triforce.rope import RotaryTable

CFG = ModelConfig("llama", 10, 64, 64, 2, 4, 2, 16, 1e-5, 10000.0, 256, True)


def fill(cache, rows: int, seed: int = 0) -> None:
    """Write `rows` random rows through the decoder's interface (positions, slot, commit)."""
    g = torch.Generator().manual_seed(seed)
    cache.positions(rows)
    for layer in range(CFG.num_layers):
        slot = cache.slot(layer)
        slot.k[:, slot.row : slot.row + rows] = torch.randn(2, rows, 16, generator=g)
        slot.v[:, slot.row : slot.row + rows] = torch.randn(2, rows, 16, generator=g)
    cache.commit(rows)


def test_rope_shift_is_an_exact_rerotation():
    from triforce.config import ModelConfig
    from triforce.rope import RotaryTable

    cfg = ModelConfig("llama", 10, 64, 64, 1, 4, 2, 16, 1e-5, 10000.0, 256, True)
    table = RotaryTable(cfg, None, 256, 256)
    x = torch.randn(20, 2, 16)
    pos = torch.arange(100, 120)
    shifted = table.shift(table.rotate(x, pos), torch.full((20,), -37))
    assert (shifted - table.rotate(x, pos - 37)).abs().max() < 1e-5




def test_each_cache_says_its_size_before_it_is_built():
    full = FullCache(CFG, 100, dtype=torch.float32)
    assert FullCache.bytes_for(CFG, 100, torch.float32) == full.nbytes == 2 * full.k.numel() * 4
    stream = StreamingCache(CFG, 4, 20, dtype=torch.bfloat16)
    assert StreamingCache.bytes_for(CFG, 4, 20, torch.bfloat16) == 2 * stream.k.numel() * 2
    view = RetrievalView(full, budget=32, chunk_size=8)
    assert RetrievalView.bytes_for(CFG, 100, 8) == view.chunk_means.numel() * 4


def test_full_cache_truncates_grows_and_refuses_overflow():
    full = FullCache(CFG, 50, dtype=torch.float32)
    fill(full, 30)
    kept = full.k[:, :, :20].clone()
    full.truncate(20)
    assert full.length == 20 and full.slot(0).row == 20
    with pytest.raises(ValueError):
        full.truncate(21)
    bigger = full.grown(80, 20)
    assert bigger.capacity == 80 and bigger.length == 20 and torch.equal(bigger.k[:, :, :20], kept)
    with pytest.raises(TriforceError, match="holds 50 tokens"):
        full.positions(31)
    assert full.snapshot() == 20
    fill(full, 5)
    full.restore(20)
    assert full.length == 20


def test_streaming_cache_keeps_the_sink_and_recent_rows_in_its_slots():
    cache = StreamingCache(CFG, sink=2, window=6, dtype=torch.float32)
    cache.rope = RotaryTable(CFG, None, cache.capacity, cache.capacity)
    fill(cache, 70)  # 2 + 6 + 64 slots: no eviction yet
    state = cache.snapshot()
    sink = cache.k[:, :, :2].clone()
    last = cache.k[:, :, 66:70].clone()
    cache.positions(10)  # past the capacity: the oldest 64 window rows go, the last 4 move down
    assert cache.slots == 6 and torch.equal(cache.k[:, :, :2], sink)
    shift = torch.full((4,), -64, dtype=torch.long)
    expected = cache.rope.shift(last.transpose(1, 2), shift).transpose(1, 2)  # re-rotated to their new slots
    assert (cache.k[:, :, 2:6] - expected).abs().max() < 1e-5
    assert (cache.positions(1) < cache.capacity).all()
    cache.restore(state)
    assert cache.slots == 70 and cache.length == 70 and torch.equal(cache.k[:, :, 66:70], last)
    cache.truncate(65)  # roll back rejected drafts
    assert cache.slots == 65 and cache.length == 65
    with pytest.raises(ValueError):
        cache.truncate(70)


def test_streaming_view_sees_the_sink_and_the_window():
    full = FullCache(CFG, 100, dtype=torch.float32)
    fill(full, 50)
    view = StreamingView(full, sink=4, window=10)
    view.truncate(50)
    view.positions(1)
    slot = view.slot(0)
    assert slot.chunks.tolist() == [[0], [0]] and slot.chunk_size == 4 and slot.dense_start == 40
    short = StreamingView(full, sink=4, window=60)
    short.truncate(50)
    short.positions(1)
    assert short.slot(0).chunks is None  # the window covers everything


def test_retrieval_view_keeps_the_sink_chunk_and_the_chunks_the_query_points_at():
    full = FullCache(CFG, 200, dtype=torch.float32)
    fill(full, 160)
    direction = torch.randn(16)
    for chunk in (5, 11):  # keys of these chunks all point along the query
        full.k[:, :, chunk * 8 : chunk * 8 + 8] = 10 * direction
    view = RetrievalView(full, budget=40, chunk_size=8, recent=16)
    view.rebuild([direction.expand(4, 16) for _ in range(CFG.num_layers)])
    assert view.selected_at == 160 and view.dense_start == 144
    chunks = view.chunks[0].tolist()
    keep = (40 - 16) // 8  # what the budget leaves for the old context
    for head in chunks:
        assert len(head) == keep and head == sorted(head)
        assert head[0] == 0 and {40, 88} <= set(head)
    assert torch.equal(view.chunk_means[:, :, :18], full.k[:, :, :144].view(CFG.num_layers, 2, 18, 8, 16).mean(3))
    covering = RetrievalView(full, budget=500, chunk_size=8)
    covering.rebuild([direction.expand(4, 16) for _ in range(CFG.num_layers)])
    assert covering.chunks is None  # everything fits: exact full attention
    assert view.snapshot()[1] == 160


def test_retrieval_view_means_are_computed_once_then_only_for_new_chunks():
    """After a prefill the view computes every selectable chunk's mean key at once, so a first
    selection costs what any later one does; later only chunks that filled since are added."""
    full = FullCache(CFG, 300, dtype=torch.float32)
    fill(full, 160)
    view = RetrievalView(full, budget=40, chunk_size=8, recent=16)
    view.update_means()
    assert view.means_ready == 18  # rows 0-143: everything before the recent rows
    before = view.chunk_means.clone()
    fill(full, 20, seed=1)  # 180 rows: chunks 18 and 19 become selectable
    full.k[:, :, :144] = 0  # rows already summarised are not read again
    view.update_means()
    assert view.means_ready == 20 and torch.equal(view.chunk_means[:, :, :18], before[:, :, :18])
    assert torch.equal(view.chunk_means[:, :, 18:20], full.k[:, :, 144:160].view(CFG.num_layers, 2, 2, 8, 16).mean(3))
