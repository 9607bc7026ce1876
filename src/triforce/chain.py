"""Hierarchical speculative decoding: a chain of levels, each verifying the one below.

    bottom --drafts--> level 1 --verifies, and so drafts--> ... --> top (target, full cache)

Level i gathers tokens by repeatedly asking level i-1 for `gammas[i-1]` drafts and verifying them
with one forward pass (speculative sampling: accept with min(1, p/q), else sample the residual).
The tokens a level emits are distributed exactly as its own model would sample them, so the level
above may treat them as drafts with q = that level's distribution. The top's output is therefore
distributed exactly as plain sampling from the target (token for token when greedy).
"""

from __future__ import annotations

from typing import Any

import torch

from .levels import Level, ModelLevel, ViewLevel
from .sampling import draw, verify


class Chain:
    """Levels bottom to top; gammas[i] is how many tokens level i gathers per call."""

    def __init__(self, levels: list[Level], gammas: list[int]) -> None:
        if len(gammas) != len(levels) - 1:
            raise ValueError("one gamma per level below the top")
        top = levels[-1]
        if not isinstance(top, ModelLevel):
            raise ValueError("the top of a chain is a model")
        self.levels = levels
        self.gammas = gammas
        self.top = top
        top.stats.is_top = True

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
            elif isinstance(level, ModelLevel):  # a draft model reads the prompt now, not in the first step
                level.score(prompt, [])
        return probs

    def _gather(
        self, i: int, context: list[int], want: int, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """At least `want` tokens sampled from level i's distribution (fewer only if the bottom
        has nothing to propose), with those distributions."""
        level = self.levels[i]
        if i == 0:
            return level.propose(context, want, generator)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        while len(tokens) < want:
            new, p = self._verify_step(i, context + tokens, generator)
            tokens += new
            probs.append(p)
        return tokens, torch.cat(probs)

    def _verify_step(
        self, i: int, context: list[int], generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor]:
        """One verification at level i: drafts from level i-1 (none for a lone level), one
        forward pass, accept/resample. Returns the new tokens and level i's distributions for
        them."""
        level = self.levels[i]
        drafts: list[int] = []
        q = None
        if i > 0:
            drafts, q = self._gather(i - 1, context, self.gammas[i - 1], generator)
        p = level.score(context, drafts)
        if drafts:
            accepted, next_token = verify(drafts, q, p, generator, greedy=level.greedy)
            self.levels[i - 1].stats.record(len(drafts), accepted)
        else:
            assert isinstance(level, ModelLevel)
            accepted, next_token = 0, draw(p[0], level.params, generator)
        level.rollback(len(context) + accepted)
        for lower in self.levels[:i]:
            lower.rollback(len(context) + accepted)
        return drafts[:accepted] + [next_token], p[: accepted + 1]

    def step(self, context: list[int], generator: torch.Generator | None) -> list[int]:
        """New tokens after `context` (at least one)."""
        new, _ = self._verify_step(len(self.levels) - 1, context, generator)
        for level in self.levels[:-1]:
            if isinstance(level, ViewLevel):
                level.follow_top()
        return new
