"""The runner: how inputs are cut into passes, and which cached rows a new prompt may keep."""

from __future__ import annotations

import pytest
import torch

from triforce.cache import FullCache, StreamingCache
from triforce.engine import Engine
from triforce.runner import Runner, split_for_cache
from triforce.settings import EngineSettings

from .conftest import VOCAB


def test_long_inputs_are_cut_at_multiples_of_the_chunk_from_the_first_row(small_vocab_models):
    target, _ = small_vocab_models
    full = FullCache(target.config, 400, dtype=torch.float32)
    full.length = 30  # the inputs start at row 30
    pieces = split_for_cache(list(range(250)), 3, 64, full)
    assert [kind for kind, _ in pieces] == ["fill", "fill", "fill", "fill", "last"]
    assert [len(p) for _, p in pieces] == [34, 64, 64, 64, 24]  # rows 30-64, 64-128, ..., 256-280
    # the scored rows share one pass, even when the last cut leaves fewer
    pieces = split_for_cache(list(range(70)), 10, 64, FullCache(target.config, 200, dtype=torch.float32))
    assert [len(p) for _, p in pieces] == [70]  # not 64 + 6
    short = split_for_cache(list(range(50)), 1, 16, full)
    assert [len(p) for _, p in short] == [16, 16, 2, 16] and short[-1][0] == "last"  # the last pass is whole


def test_a_streaming_cache_skips_the_middle_of_a_long_prompt(small_vocab_models):
    _, draft = small_vocab_models
    cache = StreamingCache(draft.config, sink=4, window=16, dtype=torch.float32)
    pieces = split_for_cache(list(range(300)), 1, 64, cache)
    assert pieces[0] == ("fill", [0, 1, 2, 3])
    assert pieces[1] == ("skip", 300 - 4 - 16)
    assert pieces[-1] == ("last", list(range(284, 300)))


def test_run_in_chunks_gives_the_logits_of_one_pass(small_vocab_models):
    target, _ = small_vocab_models
    dec = target.decoder
    ids = [1] + [3 + (i * 7) % (VOCAB - 3) for i in range(200)]
    dec.prepare(len(ids))
    one = Runner(dec, prefill_chunk=1024).run(FullCache(target.config, 250, dtype=torch.float32), ids, 5)
    full = FullCache(target.config, 250, dtype=torch.float32)
    chunked = Runner(dec, prefill_chunk=32).run(full, ids, 5)
    assert one.shape == (5, VOCAB) and (one - chunked).abs().max() < 1e-5
    assert full.length == len(ids) and full.aligned_chunk == 32 and full.aligned_rows == 192


@pytest.mark.parametrize("long_passes_on_kernel", [True, False], ids=["kernel-prefill", "flash-prefill"])
def test_prompt_cache_holds_exactly_the_rows_a_fresh_prefill_computes(embedded_bf16, long_passes_on_kernel,
                                                                       monkeypatch):
    """Where prefill chunks run through flash attention, they and decoding steps (the kernel)
    round differently, so a reused prompt is exact only if every kept row was computed as a
    fresh prefill of the new prompt computes it. Checked bit for bit on the cache itself, where a
    mere token comparison would pass by luck: the same prompt again, a chat-style continuation
    (old prompt, its answer, more text), and a shorter edit of it. Where the kernel runs prefill
    too, every row is reusable."""
    from triforce import native
    from triforce.corpus import document_tokens

    if long_passes_on_kernel and not native.prefill_on_kernel(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this CPU prefills through flash attention")
    if not long_passes_on_kernel:
        monkeypatch.setattr(native, "prefill_on_kernel", lambda t: False)

    tok = embedded_bf16.tokenizer
    text = document_tokens(tok, "vim", 900, offset=5000)
    knobs = dict(max_new_tokens=12, ignore_eos=True)

    def rows(engine: Engine, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return engine._full.k[:, :, :n], engine._full.v[:, :, :n]

    engine = Engine(embedded_bf16, EngineSettings(prefill_chunk=256))
    first = engine.generate(text[:600], **knobs)
    follow_ups = [text[:600], text[:600] + first.token_ids + text[600:900], text[:700], text[:530]]
    for prompt in follow_ups:
        fresh = Engine(embedded_bf16, EngineSettings(prefill_chunk=256))
        expected = fresh.generate(prompt, **knobs)
        got = engine.generate(prompt, **knobs)
        assert got.token_ids == expected.token_ids
        n = len(prompt) + len(got.token_ids) - 1
        for mine, theirs in zip(rows(engine, n), rows(fresh, n)):
            assert torch.equal(mine, theirs), f"prompt of {len(prompt)} tokens: cached rows differ"
    # the edit keeps all of itself from the kernel's rows, else only the whole chunks of 256
    assert got.stats["cached_prompt_tokens"] == (530 if long_passes_on_kernel else 512)
