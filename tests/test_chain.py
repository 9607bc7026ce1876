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
    import torch

    from triforce.cache import FullCache
    from triforce.chain import Chain
    from triforce.levels import ModelLevel, PromptLookup
    from triforce.runner import Runner
    from triforce.sampling import SamplingParams

    target, _ = small_vocab_models
    top = ModelLevel("target", Runner(target.decoder), FullCache(target.config, 8, torch.float32), SamplingParams())
    with pytest.raises(ValueError, match="one gamma"):
        Chain([PromptLookup(12), top], [])
    with pytest.raises(ValueError, match="the top of a chain is a model"):
        Chain([top, PromptLookup(12)], [3])


class ScriptedController:
    """Plans cycles from a fixed script and stops drafting at a fixed position: every way a
    controller may combine the levels, in turn, with the calls the chain makes recorded."""

    def __init__(self, script):
        from triforce.controller import Plan

        self.plans = [Plan(levels, gamma, draft_gamma) for levels, gamma, draft_gamma in script]
        self.cycle, self.calls = 0, []

    def plan(self, context_len, lookup_has_match=None, sequences=1):
        plan = self.plans[self.cycle % len(self.plans)]
        if not lookup_has_match and "ngram" in plan.levels:  # as the controller does
            plan = self.plans[0]
        self.cycle += 1
        self.calls.append(("plan", plan.levels))
        return plan

    def observe_pass(self, level, rows, seconds):
        assert rows >= 1 and seconds >= 0
        self.calls.append(("pass", level))

    def observe_overhead(self, level, seconds):
        self.calls.append(("overhead", level))

    def observe_verification(self, level, drafted, accepted, drafter_probs=None, verifier=None):
        assert 0 <= accepted <= drafted and (drafter_probs is None or len(drafter_probs) == drafted)
        self.calls.append(("verified", level, verifier))

    def observe_cycle(self, seconds):
        assert seconds >= 0
        self.calls.append(("cycle",))

    def should_continue(self, level, position, drafter_prob):
        assert 0 < drafter_prob <= 1
        return position < 2  # stop every level after two tokens

    def report(self):
        return {"cycles": self.cycle}


SCRIPT = [((), 0, 0), (("ngram",), 4, 0), (("draft",), 3, 0), (("target-retrieval",), 5, 0),
          (("draft", "target-retrieval"), 5, 3), (("ngram", "target-retrieval"), 4, 2)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_chain_runs_whatever_structure_each_cycle_is_planned(small_vocab_models, temperature):
    """Switching between plain decoding, any one drafter, and a bottom under the middle from one
    cycle to the next, with drafting cut short, keeps greedy output exact (and sampled output
    complete); the controller hears of every pass and verification."""
    from triforce.chain import Chain
    from triforce.engine import Engine

    from .test_exactness import KNOBS

    target, draft = small_vocab_models
    engine = Engine(target, EngineSettings(method="triforce", draft=draft, **KNOBS))
    scripted = ScriptedController(SCRIPT)
    original = Chain.__init__

    def with_script(self, levels, gammas, controller=None, clock=None):
        original(self, levels, gammas, scripted, clock or (lambda: 0.0))

    Chain.__init__ = with_script
    try:
        out = engine.generate(PROMPT, max_new_tokens=40, temperature=temperature, seed=4, ignore_eos=True)
    finally:
        Chain.__init__ = original
    assert len(out.token_ids) == 40
    if temperature == 0:
        assert out.token_ids == Engine(target).generate(PROMPT, max_new_tokens=40, ignore_eos=True).token_ids
    planned = {call[1] for call in scripted.calls if call[0] == "plan"}
    assert {(), ("draft",), ("target-retrieval",), ("draft", "target-retrieval")} <= planned
    verified = {call[1:] for call in scripted.calls if call[0] == "verified"}
    assert {("draft", "target"), ("target-retrieval", "target"), ("draft", "target-retrieval")} <= verified
    assert ("pass", "target") in scripted.calls and ("overhead", "target-retrieval") in scripted.calls
    cycles = [i for i, call in enumerate(scripted.calls) if call[0] == "cycle"]  # each cycle ends with its wall time
    assert len(cycles) == scripted.cycle and all(scripted.calls[i + 1][0] == "plan" for i in cycles[:-1])
