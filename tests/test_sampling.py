"""Warping and speculative acceptance."""

from __future__ import annotations

import math

import pytest
import torch

from triforce import sampling
from triforce.errors import TriforceError
from triforce.sampling import SamplingParams, _sample, verify, warp


def test_greedy_is_exact_argmax_without_nan():
    logits = torch.tensor([[1.0, 3.0, float("-inf"), 2.9], [float("-inf"), float("-inf"), 0.0, -1.0]])
    probs = warp(logits, SamplingParams(0.0))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    assert not torch.isnan(probs).any()


def test_warp_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for t, p, k in [(0.6, 0.9, 0), (1.0, 1.0, 5), (0.7, 0.5, 10), (1.3, 0.95, 3), (0.6, 1e-6, 0)]:
        scores = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(None, scores)
        expected = scores.softmax(-1)
        got = warp(logits, SamplingParams(t, p, k))
        assert torch.allclose(got, expected, atol=1e-6), (t, p, k)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_invalid_sampling_parameters_are_refused(kwargs, message):
    with pytest.raises(TriforceError, match=message):
        SamplingParams(**kwargs)


def test_verify_greedy_accepts_while_argmax_agrees():
    V = 5
    eye = torch.eye(V)
    drafts = [1, 2, 3]
    q = eye[drafts]
    p = eye[[1, 2, 4, 0]]  # the verifier agrees on two, then prefers 4
    assert verify(drafts, q, p, torch.Generator().manual_seed(0)) == (2, 4)
    p_all = eye[[1, 2, 3, 0]]
    assert verify(drafts, q, p_all, torch.Generator().manual_seed(0)) == (3, 0)
    # the greedy shortcut (no uniforms, no multinomial draw) gives the same answers
    assert verify(drafts, q, p, None, greedy=True) == (2, 4)
    assert verify(drafts, q, p_all, None, greedy=True) == (3, 0)
    assert verify(drafts, q, eye[[0, 2, 3, 1]], None, greedy=True) == (0, 0)


def test_verify_greedy_shortcut_equals_the_general_rule_on_one_hot_rows():
    torch.manual_seed(0)
    V, gen = 50, torch.Generator().manual_seed(3)
    eye = torch.eye(V)
    for _ in range(300):
        n = int(torch.randint(1, 7, ()))
        drafts = torch.randint(0, V, (n,)).tolist()
        # the verifier agrees on a random prefix, then picks at random
        agree = int(torch.randint(0, n + 1, ()))
        p_tokens = drafts[:agree] + torch.randint(0, V, (n + 1 - agree,)).tolist()
        p = eye[p_tokens]
        assert verify(drafts, eye[drafts], p, None, greedy=True) == verify(drafts, eye[drafts], p, gen)


def test_verify_never_accepts_a_token_the_verifier_cannot_produce():
    # p(x) = 0 must reject even when the uniform draw is 0 (strict inequality)
    q = torch.tensor([[0.0, 1.0, 0.0]])
    p = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    for seed in range(200):
        accepted, token = verify([1], q, p, torch.Generator().manual_seed(seed))
        assert accepted == 0 and token in (0, 2)


def test_single_step_speculative_sampling_is_lossless():
    """One draft from q, verified against p: the emitted first token is distributed as p.

    60k trials; chi-square test at significance 1e-3 (df = 5, critical value 20.5). With these
    p and q the test has power ~1 against the classic bug of resampling from p instead of the
    residual (that emits ~0.17 extra mass on token 0, a chi-square in the thousands).
    """
    torch.manual_seed(0)
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.40, 0.05, 0.20, 0.05, 0.25, 0.05])
    n = 60_000
    gen = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    counts = torch.zeros(6)
    pp, qq = p.unsqueeze(0).expand(2, -1), q.unsqueeze(0)
    for d in drafts:
        accepted, token = verify([d], qq, pp, gen)
        counts[d if accepted else token] += 1
    expected = p * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, chi2


def test_top_p_over_a_flat_large_vocabulary_matches_transformers():
    """Mass spread over more than the first stage's candidates exercises the later stages."""
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(1)
    logits = torch.cat([torch.randn(2, 3000) * 0.01, torch.randn(2, 3000) * 5])  # flat rows, peaked rows
    expected = TopPLogitsWarper(0.9)(None, logits.clone()).softmax(-1)
    got = warp(logits, SamplingParams(1.0, 0.9))
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got[:2] > 0).sum(-1).min() > sampling.TOP_P_STAGES[0]  # the flat rows kept more than the first stage


def test_top_p_is_the_same_whichever_stage_decides(monkeypatch):
    """Rows whose kept sets range from one token to most of a 49K vocabulary: the staged top-p equals a
    full sort of every row, bit for bit."""
    torch.manual_seed(2)
    logits = torch.cat([torch.randn(3, 49152) * s for s in (12.0, 4.0, 2.0, 0.5)])
    staged = warp(logits, SamplingParams(1.0, 0.9))
    kept = (staged > 0).sum(-1)
    assert kept.min() < sampling.TOP_P_STAGES[0] < kept.max() and kept.max() > sampling.TOP_P_STAGES[-1]
    monkeypatch.setattr(sampling, "TOP_P_STAGES", ())
    assert torch.equal(staged, warp(logits, SamplingParams(1.0, 0.9)))


def test_top_p_keeps_every_token_tied_at_the_boundary_so_a_row_alone_decides():
    """Three tokens tie where the mass reaches top_p: all three are kept (a sort would keep one or two, in an
    order that may depend on the rows beside it), and the row warps the same alone and among other rows."""
    row = torch.tensor([4.0, 2.0, 2.0, 2.0, 0.0, -1.0])
    probs = row.softmax(-1)
    top_p = float(probs[0] + probs[1] * 1.5)  # reached within the tie
    got = warp(row.unsqueeze(0), SamplingParams(1.0, top_p))[0]
    assert ((got > 0) == torch.tensor([True, True, True, True, False, False])).all()
    others = torch.randn(5, 6) * 3
    batch = warp(torch.cat([others[:2], row.unsqueeze(0), others[2:]]), SamplingParams(1.0, top_p))
    assert torch.equal(batch[2], got)


def test_a_draw_from_a_sparse_distribution_follows_it():
    """Drawing among the nonzero entries: 20k draws from 5 tokens of a 50K vocabulary; chi-square at
    significance 1e-4 (df = 4, critical value 23.5); a draw that ignored the weights (uniform over the
    support) would score in the thousands."""
    probs = torch.zeros(50_000)
    support = torch.tensor([7, 1000, 1001, 32_000, 49_999])
    probs[support] = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    gen = torch.Generator().manual_seed(4)
    n = 20_000
    draws = torch.tensor([_sample(probs, gen) for _ in range(n)])
    assert bool(torch.isin(draws, support).all())
    counts = torch.stack([(draws == t).sum() for t in support]).float()
    expected = probs[support] * n
    assert ((counts - expected) ** 2 / expected).sum().item() < 23.5
