"""Warping logits into the distribution a sampler draws from, drawing, and lossless draft acceptance.

Every level of a speculative chain warps its logits with the same parameters, so "the target's
distribution" below always means the warped one. Greedy decoding (temperature 0) is the limit
case: the warped distribution is one-hot at the argmax, and the acceptance rule then reduces to
"accept while the argmaxes agree, else emit the verifier's argmax" - exactly, with no division
by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SettingError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise SettingError("temperature", f"must be a finite number >= 0, got {t}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
            raise SettingError("top_p", f"must be in (0, 1], got {p}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise SettingError("top_k", f"must be an integer >= 0 (0 disables it), got {k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] (float32) after temperature, top-k then top-p (transformers' order)."""
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scores = logits / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = _top_p(scores, params.top_p)
    return scores.softmax(-1)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of highest-scoring tokens whose mass reaches top_p (at least one),
    and every token tied with the last of them, so that the set depends on the row alone.

    Sorting the whole vocabulary for every position is the slow part of sampling (~3 ms over 49K
    tokens); the kept set is almost always among the few hundred best tokens, so the best
    TOP_P_STAGES[0] are sorted, then the next stage's count for rows they do not cover, and the
    whole row only past the last stage. Each stage takes the same sorted prefix, so the result
    is the same whichever one decides.
    """
    vocab = scores.shape[-1]
    flat = scores.reshape(-1, vocab)
    probs = flat.softmax(-1)
    threshold = torch.empty(flat.shape[0], 1)
    pending = torch.arange(flat.shape[0])
    for k in (*TOP_P_STAGES, vocab):
        k = min(k, vocab)
        top = torch.topk(probs[pending], k, dim=-1).values  # sorted, descending
        mass = top.cumsum(-1)
        covered = (mass[:, -1] >= top_p) | (k == vocab)
        first = (mass < top_p).sum(-1, keepdim=True).clamp_(max=k - 1)  # where the mass reaches top_p
        threshold[pending[covered]] = top.gather(-1, first)[covered]
        pending = pending[~covered]
        if not len(pending):
            break
    return flat.masked_fill(probs < threshold, float("-inf")).reshape(scores.shape)


TOP_P_STAGES = (256, 4096)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """A token drawn from probabilities [V] (summing to 1 up to rounding). Warped rows are mostly
    zeros: drawing among the nonzero entries alone costs a fraction of a draw over all V."""
    support = probs.reshape(-1).nonzero().flatten()
    return int(support[torch.multinomial(probs.reshape(-1)[support], 1, generator=generator)])


def draw(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a warped distribution [V]: its argmax when greedy (no random draw, so a
    greedy run consumes no randomness), else a sample."""
    if params.greedy:
        return int(probs.argmax())
    return _sample(probs, generator)


def verify(
    draft_tokens: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
    greedy: bool = False,
) -> tuple[int, int]:
    """Speculative sampling over one run of drafts.

    draft_probs [n, V]: the drafter's (warped) distributions the drafts were sampled from;
    target_probs [n + 1, V]: the verifier's at the same positions plus one more.
    Returns (number accepted, next token): the next token comes from the normalised residual
    max(0, p - q) at the first rejection, or from p after the last draft if all were accepted.
    The result is distributed exactly as sampling from the verifier alone.

    greedy: the distributions are one-hot (temperature 0), where the rule reduces to "accept
    while the verifier's token is the draft, then emit the verifier's token"; that is taken
    directly, because drawing from a one-hot row with torch.multinomial costs about 1 ms over a
    49K vocabulary, several times a decoding step's bookkeeping.
    """
    n = len(draft_tokens)
    idx = torch.tensor(draft_tokens, dtype=torch.long).unsqueeze(1)
    p = target_probs[:n].gather(1, idx).squeeze(1)
    if greedy:
        misses = (p == 0).nonzero()
        accepted = int(misses[0, 0]) if len(misses) else n
        return accepted, int(target_probs[accepted].argmax())
    if n:
        q = draft_probs.gather(1, idx).squeeze(1)
        uniforms = torch.rand(n, generator=generator)
        # accept iff u * q < p (u < p/q without dividing; q > 0 for a sampled draft): with u in
        # [0, 1) that has probability min(1, p/q), and p = 0 rejects even when u is exactly 0
        rejected = (uniforms * q >= p).nonzero()
        if len(rejected):
            i = int(rejected[0, 0])
            residual = (target_probs[i] - draft_probs[i]).clamp_(min=0)
            total = residual.sum()
            if total <= 0:  # p == q exactly: any rejection is impossible in exact arithmetic
                residual = target_probs[i]
            return i, _sample(residual / residual.sum(), generator)
    return n, _sample(target_probs[n], generator)
