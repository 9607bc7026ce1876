"""Levels: a model over a cache scores and rolls back; prompt lookup proposes; a view follows the top."""

from __future__ import annotations

import random

import torch

from triforce.cache import FullCache, RetrievalView, StreamingCache
from triforce.levels import ModelLevel, PromptLookup, ViewLevel
from triforce.model import Segment
from triforce.runner import Runner
from triforce.sampling import SamplingParams, warp

from .conftest import VOCAB

PROMPT = [1] + [3 + (i * 7) % (VOCAB - 3) for i in range(29)] + [4, 5, 6, 4, 5]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(VOCAB)
    drafts, probs, confidence = lookup.propose([1, 4, 5, 6, 7, 8, 4, 5, 9, 4, 5], 3, None)
    assert drafts == [9, 4, 5] and confidence is None  # "4 5" last occurred before 9
    assert torch.equal(probs, torch.eye(VOCAB)[[9, 4, 5]])  # deterministic: q is one-hot
    assert lookup.propose([1, 2, 3], 3, None) == ([], None, None)  # nothing to match
    assert not lookup.has_proposal([1, 2, 3]) and lookup.has_proposal([1, 2, 3, 2])
    # the index follows a context that changed in its tail (rejected drafts)
    assert lookup.propose([1, 4, 5, 6, 7, 8, 4, 5, 9, 4, 5, 6, 4, 5], 2, None)[0] == [6, 4]
    assert lookup.propose([1, 4, 5, 6, 7, 8, 4, 5, 9, 4, 5, 7], 2, None)[0] == [8, 4]


def test_the_lookup_index_kept_up_to_date_equals_one_built_afresh():
    # rollbacks in the tail, growth, and a restore to a snapshot followed by a context that
    # differs from the last one long before its tail (the next sample of a prompt): each leaves
    # the index a fresh one would build, positions in increasing order
    rng = random.Random(0)
    lookup = PromptLookup(VOCAB)
    context = [rng.randrange(3, 9) for _ in range(50)]
    lookup.index(context)
    state = lookup.snapshot()
    for edit in range(30):
        if edit % 10 == 9:
            lookup.restore(state)
            context = context[:50] + [rng.randrange(3, 9) for _ in range(600)]
        else:
            context = context[: len(context) - rng.randrange(0, 12)] + [rng.randrange(3, 9) for _ in range(8)]
        lookup.index(context)
        fresh = PromptLookup(VOCAB)
        fresh.index(context)
        assert lookup.indexed == context
        assert {k: v for k, v in lookup.ngrams.items() if v} == fresh.ngrams


def test_a_model_level_scores_like_a_plain_pass_and_rolls_back(small_vocab_models):
    target, _ = small_vocab_models
    dec = target.decoder
    dec.prepare(64)
    params = SamplingParams(1.0)
    level = ModelLevel("target", Runner(dec), FullCache(target.config, 64, dtype=torch.float32), params)
    p = level.score(PROMPT, [4, 5])
    expected = dec.forward([Segment(torch.tensor(PROMPT + [4, 5]), FullCache(target.config, 64, torch.float32), 3)])
    assert (p - warp(expected[0], params)).abs().max() < 1e-6
    assert level.tokens == PROMPT + [4, 5] and level.cache.length == len(PROMPT) + 2
    level.rollback(len(PROMPT) + 1)
    assert level.cache.length == len(PROMPT) + 1
    again = level.score(PROMPT + [4], [])  # only the rows that changed run again
    assert level.stats.forward_tokens == len(PROMPT) + 2 + 1
    assert (again[0] - p[1]).abs().max() < 1e-6


def test_a_draft_level_restores_its_streaming_cache(small_vocab_models):
    _, draft = small_vocab_models
    dec = draft.decoder
    cache = StreamingCache(draft.config, 2, 6, dtype=torch.float32)
    dec.prepare(cache.capacity)
    cache.rope = dec.rope
    level = ModelLevel("draft", Runner(dec), cache, SamplingParams())
    level.score(PROMPT, [])
    state = level.snapshot()
    before = level.score(PROMPT, [])
    drafts, _, confidence = level.propose(PROMPT, 80, None)  # far past the window: evicts and re-rotates
    assert len(drafts) == 80 and all(0 < c <= 1 for c in confidence)
    level.restore(state)
    assert level.tokens == PROMPT and torch.equal(level.score(PROMPT, []), before)


def test_a_retrieval_view_rebuilds_every_n_verifications(small_vocab_models):
    target, _ = small_vocab_models
    dec = target.decoder
    dec.prepare(64)
    full = FullCache(target.config, 64, dtype=torch.float32)
    full.record_queries = True
    params = SamplingParams()
    top = ModelLevel("target", Runner(dec), full, params)
    view = ViewLevel("target-retrieval", Runner(dec), RetrievalView(full, 12, 4), top, params, rebuild_every=3)
    top.score(PROMPT, [])
    view.follow_top()
    assert view.rebuild_query is not None and view.stats.rebuilds == 0  # it waits for the level's next pass
    for _ in range(7):
        view.score(PROMPT, [])
        view.follow_top()
    assert view.stats.rebuilds == 3  # the first pass (no selection yet), then after every third follow
    assert view.tokens == top.tokens and view.view.length == len(PROMPT)
    assert len(full.queries_at(full.length - 1)) == target.config.num_layers
