"""Hierarchical speculative decoding: a chain of levels, each verifying the one below.

    bottom --drafts--> level 1 --verifies, and so drafts--> ... --> top (target, full cache)

Level i gathers tokens by repeatedly asking level i-1 for `gammas[i-1]` drafts and verifying them
with one forward pass (speculative sampling: accept with min(1, p/q), else sample the residual).
The tokens a level emits are distributed exactly as its own model would sample them, so the level
above may treat them as drafts with q = that level's distribution. The top's output is therefore
distributed exactly as plain sampling from the target (token for token when greedy).

With a controller (adaptive speculation), each cycle (one pass of the top) runs the sub-chain
the controller's plan names - plain decoding, any one level below the top, or a bottom and the
middle - with the plan's gammas, and a drafting level may stop early on its own low confidence.
Those choices use only past outcomes and the drafting levels' own outputs, never the verifier's,
so the output keeps exactly the target's distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .controller import Controller
from .levels import HeadLevel, Level, ModelLevel, PromptLookup, ViewLevel
from .sampling import draw, verify


class Chain:
    """Levels bottom to top with gammas[i] tokens gathered per call by level i; or, with a
    controller, the levels it may combine (alternative bottoms first, named as the controller
    names them), run as its plans say. `clock` times the passes the controller learns from."""

    def __init__(self, levels: list[Level], gammas: list[int], controller: Controller | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        top = levels[-1]
        if not isinstance(top, ModelLevel):
            raise ValueError("the top of a chain is a model")
        if controller is None and len(gammas) != len(levels) - 1:
            raise ValueError("one gamma per level below the top")
        self.levels = levels
        self.gammas = gammas
        self.top = top
        top.stats.is_top = True
        self.controller = controller
        self.clock = clock
        self.by_name = {level.name: level for level in levels}
        for level in levels:
            level.clock = clock
        self.lookup = next((level for level in levels if isinstance(level, PromptLookup)), None)
        self.views = [level for level in levels if isinstance(level, ViewLevel)]

    def snapshot(self) -> list[Any]:
        return [level.snapshot() for level in self.levels]

    def restore(self, states: list[Any]) -> None:
        for level, state in zip(self.levels, states):
            level.restore(state)

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """Every level reads the prompt (the top's cache may already hold part of it); the top's
        distribution after it [V]."""
        probs = self.top.score(prompt, [])[0]
        for level in self.levels[:-1]:
            if isinstance(level, ViewLevel):
                level.follow_top()
                level.index_prompt()
            elif isinstance(level, ModelLevel):  # a draft model reads the prompt now, not in the first step
                level.score(prompt, [])
            elif isinstance(level, PromptLookup):  # so the first cycle costs what later ones do
                level.index(prompt)
            elif isinstance(level, HeadLevel):  # its window's rows, from the features the prompt's passes left
                level.catch_up(prompt)
        for level in self.levels:  # the prompt's passes say nothing of a decoding pass's cost
            level.passes.clear()
        return probs

    def step(self, context: list[int], generator: torch.Generator | None) -> list[int]:
        """New tokens after `context` (at least one): one cycle, ending with one pass of the top."""
        start = self.clock()
        if self.controller is None:
            active, gammas = self.levels, self.gammas
        else:
            match = self.lookup.has_proposal(context) if self.lookup is not None else None
            plan = self.controller.plan(len(context), match)
            active = [self.by_name[name] for name in plan.levels] + [self.top]
            gammas = plan.gammas
        new, _, _ = self._verify_step(active, gammas, len(active) - 1, context, generator)
        for view in self.views:
            view.follow_top()
        if self.controller is not None:
            self.controller.observe_cycle(self.clock() - start)
        return new

    def _observe(self, level: Level) -> None:
        """Tell the controller of the level's passes since the last look."""
        if self.controller is not None:
            for rows, seconds, overhead in level.passes:
                if overhead:
                    self.controller.observe_overhead(level.name, overhead)
                self.controller.observe_pass(level.name, rows, seconds)
        level.passes.clear()

    def _gather(
        self, active: list[Level], gammas: list[int], i: int, context: list[int], generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None, list[float] | None]:
        """At least `gammas[i]` tokens sampled from level i's distribution (fewer when the bottom
        has nothing to propose, or the controller stops the level early), those distributions,
        and the level's own confidence in each."""
        level, want = active[i], gammas[i]
        controller = self.controller

        def keep_going(k: int, confidence: float) -> bool:
            return controller is None or controller.should_continue(level.name, k, confidence)

        if i == 0:
            drafts, q, confidence = level.propose(context, want, generator, keep_going)
            self._observe(level)
            return drafts, q, confidence
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        confidence: list[float] = []
        while len(tokens) < want:
            new, p, conf = self._verify_step(active, gammas, i, context + tokens, generator)
            for j, token in enumerate(new):
                tokens.append(token)
                probs.append(p[j])
                confidence.append(conf[j])
                # the run may end after any token drawn before `want`: the rest of this step is dropped
                if len(tokens) < want and not keep_going(len(tokens), conf[j]):
                    want = len(tokens)
                    break
        return tokens, torch.stack(probs), confidence

    def _verify_step(
        self, active: list[Level], gammas: list[int], i: int, context: list[int], generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor, list[float]]:
        """One verification at level i of `active`: drafts from level i-1 (none for a lone
        level), one forward pass, accept/resample. Returns the new tokens, level i's
        distributions for them and its confidence in them."""
        level = active[i]
        assert isinstance(level, ModelLevel)
        drafts: list[int] = []
        q, q_confidence = None, None
        if i > 0:
            drafts, q, q_confidence = self._gather(active, gammas, i - 1, context, generator)
        p = level.score(context, drafts)
        self._observe(level)
        if drafts:
            accepted, next_token = verify(drafts, q, p, generator, greedy=level.greedy)
            drafter = active[i - 1]
            drafter.stats.record(len(drafts), accepted)
            if self.controller is not None:
                self.controller.observe_verification(drafter.name, len(drafts), accepted, q_confidence, level.name)
        else:
            accepted, next_token = 0, draw(p[0], level.params, generator)
        level.rollback(len(context) + accepted)
        for lower in active[:i]:
            lower.rollback(len(context) + accepted)
        new = drafts[:accepted] + [next_token]
        confidence = level.confidences(p, new) if i < len(active) - 1 else []
        return new, p[: accepted + 1], confidence
