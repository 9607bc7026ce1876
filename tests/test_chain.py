"""The chain: each level verifies the one below; what a level emits is what its model samples."""

from __future__ import annotations

import pytest

from triforce.engine import Engine
from triforce.settings import EngineSettings

from .test_exactness import PROMPT


def test_budget_covering_the_context_is_exactly_full_attention(small_vocab_models):
    """With every chunk selected the retrieval level computes what the target computes: every
    draft is accepted, even when sampling (acceptance min(1, p/q) with p == q)."""
    target, draft = small_vocab_models
    engine = Engine(target, EngineSettings(method="retrieval", gamma=4, budget=10_000, chunk_size=4))
    out = engine.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
    middle = out.stats["levels"][0]
    assert middle["num_draft_tokens"] > 20 and middle["draft_acceptance_rate"] == 1.0




def test_a_bottom_with_nothing_to_propose_still_advances(small_vocab_models):
    """Prompt lookup on a prompt with no repeats proposes nothing at first: the level above then
    verifies an empty draft, which still yields one token per step."""
    target, _ = small_vocab_models
    prompt = [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    ar = Engine(target).generate(prompt, max_new_tokens=20, ignore_eos=True)
    out = Engine(target, EngineSettings(method="speculative", draft="ngram", gamma=3)).generate(
        prompt, max_new_tokens=20, ignore_eos=True)
    assert out.token_ids == ar.token_ids
    assert out.stats["levels"][-1]["forward_calls"] <= 20


def test_one_gamma_per_level_below_the_top(small_vocab_models):
    from triforce.chain import Chain
    from triforce.levels import PromptLookup

    with pytest.raises(ValueError, match="one gamma"):
        Chain([PromptLookup(12), PromptLookup(12)], [])
