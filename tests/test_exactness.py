"""TriForce is lossless: greedy output equals autoregressive for every preset, and sampled output
has exactly the target's distribution (chi-square against the enumerated joint distribution)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import triforce
from triforce.cache import FullCache
from triforce.distill import prune_output_layer
from triforce.engine import Engine
from triforce.errors import TriforceError
from triforce.head import FeatureHead, random_head
from triforce.model import Segment
from triforce.sampling import SamplingParams, warp
from triforce.settings import EngineSettings

from .conftest import VOCAB


def exact_joint(model, prompt: list[int], params: SamplingParams, length: int = 3) -> dict[tuple, float]:
    """P(x1..xn | prompt) under the warped target, by enumeration."""
    dec = model.decoder
    dec.prepare(len(prompt) + length + 1)

    def dist(prefix: list[int]) -> torch.Tensor:
        cache = FullCache(model.config, len(prefix) + 1, dtype=torch.float32)
        logits = dec.forward([Segment(torch.tensor(prefix), cache, 1)])[0][0]
        return warp(logits, params)

    joint = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, pr in joint.items():
            if pr == 0:
                continue
            d = dist(prompt + list(seq))
            for token in range(VOCAB):
                if d[token] > 0:
                    nxt[seq + (token,)] = pr * float(d[token])
        joint = nxt
    return joint


def chi_square(samples: list[list[int]], joint: dict[tuple, float]) -> tuple[float, int]:
    """Pearson statistic, pooling outcomes expected fewer than 5 times into one bin."""
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    assert set(counts) <= set(joint), "sampled a sequence the target gives zero probability"
    stat, bins, pooled_e, pooled_o = 0.0, 0, 0.0, 0
    for seq, pr in joint.items():
        e, o = n * pr, counts.get(seq, 0)
        if e < 5:
            pooled_e += e
            pooled_o += o
        else:
            stat += (o - e) ** 2 / e
            bins += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        bins += 1
    return stat, bins - 1


PRESETS = {
    "autoregressive": ("autoregressive", None),
    "speculative": ("speculative", "model"),
    "speculative-ngram": ("speculative", "ngram"),
    "retrieval": ("retrieval", None),
    "streaming": ("streaming", None),
    "triforce": ("triforce", "model"),
    "triforce-ngram": ("triforce", "ngram"),
    # the middle level on 4-bit, the draft on 8-bit copies of their weights
    "triforce-quantized": ("triforce", "model", {"retrieval_weights": "q4_0", "draft_weights": "q8_0"}),
    # fixed gammas: no controller, every cycle runs the whole chain
    "speculative-fixed": ("speculative", "model", {"gamma": 3}),
    "triforce-fixed": ("triforce", "model", {"gamma": 3, "draft_gamma": 2}),
    "triforce-ngram-fixed": ("triforce", "ngram", {"gamma": 3, "draft_gamma": 2}),
    # a random feature-level head whose vocabulary misses some of the target's likely tokens
    "speculative-head": ("speculative", "head"),
    "triforce-head": ("triforce", "head"),
    # the draft model with its output layer pruned to the same tokens (triforce distill --vocab)
    "speculative-pruned": ("speculative", "pruned"),
    "triforce-pruned": ("triforce", "pruned"),
}
HEAD_TOKENS = [0, 1, 2, 4, 5, 6, 8, 11]  # of the 12: a head or pruned draft never proposes 3, 7, 9 or 10
KNOBS = dict(budget=12, chunk_size=4, sink=2, window=6)  # gammas "auto" unless a preset fixes them


class TickClock:
    """A clock that advances one unit per reading: adaptive speculation then sees every pass cost
    the same and makes the same choices in every run, so the seeded tests stay deterministic."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now
SAMPLES = 10_000
ALPHA = 1e-3


_heads: dict[int, FeatureHead] = {}


def head_for(target) -> FeatureHead:
    if id(target) not in _heads:
        weights = random_head(target.config, torch.tensor(HEAD_TOKENS), seed=5, scale=0.3)
        _heads[id(target)] = FeatureHead(target.decoder, weights)
    return _heads[id(target)]


_pruned: dict[int, Any] = {}
_pruned_dir = tempfile.TemporaryDirectory(prefix="triforce-test-")  # removed when the tests end


def pruned_for(draft) -> Any:
    """The draft model with its output layer pruned to HEAD_TOKENS."""
    if id(draft) not in _pruned:
        where = Path(_pruned_dir.name) / f"pruned-{len(_pruned)}"
        shutil.copytree(draft.path, where)
        prune_output_layer(where, torch.tensor(HEAD_TOKENS))
        _pruned[id(draft)] = triforce.load(where, dtype="fp32")
    return _pruned[id(draft)]


def make_engine(target, draft, preset: str, batcher=None) -> Engine:
    method, draft_kind, *extra = PRESETS[preset]
    d = {"model": draft, "ngram": "ngram", "head": head_for(target) if draft_kind == "head" else None,
         "pruned": pruned_for(draft) if draft_kind == "pruned" else None}.get(draft_kind)
    return Engine(target, EngineSettings(method=method, draft=d, **KNOBS, **(extra[0] if extra else {})),
                  batcher=batcher, clock=TickClock())


# A prompt long enough that the sparse levels really drop context (budget 12, window 6).
PROMPT = [1] + [3 + (i * 7) % (VOCAB - 3) for i in range(29)] + [4, 5, 6, 4, 5]


@pytest.mark.parametrize("setting", [(0.6, 0.9), (1.0, 1.0)], ids=["t0.6-p0.9", "t1.0"])
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.core) if p == "triforce" else p for p in PRESETS])
def test_sampling_distribution_is_the_targets(small_vocab_models, preset, setting):
    """10^4 seeded samples of the first 3 tokens vs the exact joint distribution.

    Pearson chi-square at significance 1e-3 (pooled bins with expected count < 5). Seeds are
    fixed, so the outcome is deterministic. Power: see test_distribution_test_catches_the_
    reference_bug, where the same statistic rejects the known non-lossless variant.
    """
    from scipy.stats import chi2

    target, draft = small_vocab_models
    temperature, top_p = setting
    params = SamplingParams(temperature, top_p)
    joint = exact_joint(target, PROMPT, params)
    engine = make_engine(target, draft, preset)
    result = engine.generate(PROMPT, max_new_tokens=3, temperature=temperature, top_p=top_p, seed=1234,
                             num_samples=SAMPLES, ignore_eos=True)
    samples = result.samples
    assert len(samples) == SAMPLES and all(len(s) == 3 for s in samples)
    stat, df = chi_square(samples, joint)
    critical = chi2.ppf(1 - ALPHA, df)
    assert stat < critical, f"{preset}: chi-square {stat:.1f} >= {critical:.1f} (df {df})"


def spec_module():
    import triforce.chain

    return triforce.chain


def buggy_verify(drafts, q, p, generator, greedy=False):
    """The reference's verification: on rejection it resamples from p, not from max(0, p - q).
    (Only sampling runs use it: `greedy` is never set here.)"""
    assert not greedy
    from triforce.sampling import draw

    params = SamplingParams(1.0)
    for i, token in enumerate(drafts):
        if torch.rand(1, generator=generator).item() * q[i, token] >= p[i, token]:
            return i, draw(p[i], params, generator)
    return len(drafts), draw(p[len(drafts)], params, generator)


def test_distribution_test_catches_the_reference_bug(small_vocab_models, monkeypatch):
    """The public reference resamples from p (not the residual max(0, p - q)) on rejection.
    With that bug the same test must reject: this is the test's power, shown rather than claimed."""
    from scipy.stats import chi2

    monkeypatch.setattr(spec_module(), "verify", buggy_verify)
    target, draft = small_vocab_models
    params = SamplingParams(1.0, 1.0)
    joint = exact_joint(target, PROMPT, params)
    engine = make_engine(target, draft, "speculative-fixed")  # a draft model's drafts at every step
    result = engine.generate(PROMPT, max_new_tokens=3, temperature=1.0, seed=1234, num_samples=SAMPLES,
                             ignore_eos=True)
    stat, df = chi_square(result.samples, joint)
    assert stat > chi2.ppf(1 - ALPHA, df)


# Four prompts of different lengths decoded as one batch (lengths 9 to 45 tokens).
BATCH_PROMPTS = [PROMPT, PROMPT[:9], [1] + [3 + (i * 5) % (VOCAB - 3) for i in range(44)], PROMPT[:22]]


BATCH_SAMPLES = 1250  # per prompt: 5000 in all (the power test below shows it is enough)


@pytest.fixture
def one_thread():
    # Tiny models: intra-op thread hand-offs cost more than the work and slow batching 1.7x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batched_chi_square(target, draft, preset: str, temperature: float, top_p: float) -> tuple[float, int]:
    """BATCH_SAMPLES seeded samples of the first 3 tokens per prompt, all four prompts decoding as
    one batch; the four Pearson statistics (independent samples) add up, as do their degrees of
    freedom."""
    from triforce.batch import run_batch
    from triforce.batcher import ForwardBatcher

    batcher = ForwardBatcher()
    engines = [make_engine(target, draft, preset, batcher) for _ in BATCH_PROMPTS]
    requests = [dict(prompt=p, max_new_tokens=3, temperature=temperature, top_p=top_p, seed=99 + i,
                     num_samples=BATCH_SAMPLES, ignore_eos=True) for i, p in enumerate(BATCH_PROMPTS)]
    run = run_batch(engines, requests)
    assert run.sequence_passes > run.passes  # the sequences really shared passes
    total, df = 0.0, 0
    for prompt, result in zip(BATCH_PROMPTS, run.results):
        stat, bins = chi_square(result.samples, exact_joint(target, prompt, SamplingParams(temperature, top_p)))
        total, df = total + stat, df + bins
    return total, df


@pytest.mark.parametrize("preset", list(PRESETS))
def test_batched_sampling_distribution_is_the_targets(small_vocab_models, preset, one_thread):
    """The distribution test in batched mode (T 0.6, top-p 0.9): 5000 samples over four prompts of
    different lengths; chi-square at significance 1e-3. Power: the next test."""
    from scipy.stats import chi2

    stat, df = batched_chi_square(*small_vocab_models, preset, 0.6, 0.9)
    assert stat < chi2.ppf(1 - ALPHA, df), f"{preset}: chi-square {stat:.1f} (df {df})"


def test_batched_distribution_test_catches_the_reference_bug(small_vocab_models, monkeypatch, one_thread):
    from scipy.stats import chi2

    monkeypatch.setattr(spec_module(), "verify", buggy_verify)
    stat, df = batched_chi_square(*small_vocab_models, "speculative-fixed", 0.6, 0.9)
    assert stat > chi2.ppf(1 - ALPHA, df)


@pytest.mark.core
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "autoregressive"])
def test_greedy_equals_autoregressive_small_vocab(small_vocab_models, preset):
    target, draft = small_vocab_models
    ar = make_engine(target, draft, "autoregressive").generate(PROMPT, max_new_tokens=40, ignore_eos=True)
    out = make_engine(target, draft, preset).generate(PROMPT, max_new_tokens=40, ignore_eos=True)
    assert out.token_ids == ar.token_ids


def test_num_samples_prefills_once_and_restores(small_vocab_models):
    target, draft = small_vocab_models
    engine = make_engine(target, draft, "triforce")
    result = engine.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=7, num_samples=20, ignore_eos=True)
    assert len(result.samples) == 20 and len({tuple(s) for s in result.samples}) > 1
    assert result.stats["levels"][-1]["forward_calls"] > 0
    greedy = engine.generate(PROMPT, max_new_tokens=6, num_samples=3, ignore_eos=True)
    assert greedy.samples[0] == greedy.samples[1] == greedy.samples[2] == greedy.token_ids


def test_draft_with_other_vocabulary_is_refused(small_vocab_models, embedded_fp32):
    target, _ = small_vocab_models
    with pytest.raises(TriforceError, match="vocabulary"):
        Engine(embedded_fp32, EngineSettings(method="speculative", draft=target))


def test_every_knob_combination_small(small_vocab_models):
    """Odd gammas, budgets not multiples of the chunk size, rebuilds at a stride."""
    target, draft = small_vocab_models
    ar = make_engine(target, draft, "autoregressive").generate(PROMPT, max_new_tokens=25, ignore_eos=True).token_ids
    for gamma, dgamma, budget, chunk, rebuild in itertools.product((1, 5), (1, 3), (7, 100), (3, 8), (1, 4)):
        engine = Engine(target, EngineSettings(method="triforce", draft=draft, gamma=gamma, draft_gamma=dgamma,
                                               budget=budget, chunk_size=chunk, sink=1, window=5,
                                               rebuild_every=rebuild))
        out = engine.generate(PROMPT, max_new_tokens=25, ignore_eos=True).token_ids
        assert out == ar, (gamma, dgamma, budget, chunk, rebuild)


def _ar_tokens(target, draft, prompt, n):
    return make_engine(target, draft, "autoregressive").generate(prompt, max_new_tokens=n, ignore_eos=True).token_ids


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "autoregressive"])
def test_eos_inside_an_accepted_run_stops_where_autoregressive_stops(small_vocab_models, preset):
    target, draft = small_vocab_models
    ar = _ar_tokens(target, draft, PROMPT, 30)
    stop_token = ar[12]
    first = ar.index(stop_token)
    engine = make_engine(target, draft, preset)
    engine._eos_ids = lambda: {stop_token}
    out = engine.generate(PROMPT, max_new_tokens=30)
    assert out.token_ids == ar[: first + 1]
    assert out.finish_reason == "eos"


@pytest.mark.parametrize("max_new", [1, 2, 5, 7])
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "autoregressive"])
def test_max_new_tokens_reached_inside_a_draft(small_vocab_models, preset, max_new):
    target, draft = small_vocab_models
    ar = _ar_tokens(target, draft, PROMPT, 10)
    out = make_engine(target, draft, preset).generate(PROMPT, max_new_tokens=max_new, ignore_eos=True)
    assert out.token_ids == ar[:max_new] and out.finish_reason == "length"


@pytest.mark.parametrize("prompt_len", [1, 3, 9, 13])  # < chunk (4), < budget (12), < sink + window (8)
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "autoregressive"])
def test_short_prompts(small_vocab_models, preset, prompt_len):
    target, draft = small_vocab_models
    prompt = PROMPT[:prompt_len]
    ar = _ar_tokens(target, draft, prompt, 20)
    out = make_engine(target, draft, preset).generate(prompt, max_new_tokens=20, ignore_eos=True)
    assert out.token_ids == ar


def test_streaming_draft_on_a_long_prompt_stays_in_its_position_range(small_vocab_models):
    """A prompt far longer than sink + window: the draft's cache keeps re-rotating keys into its
    slots (a forward at a position past its capacity would raise), and output stays exact."""
    target, draft = small_vocab_models
    prompt = [1] + [3 + (i * 5 + i // 7) % (VOCAB - 3) for i in range(400)]
    engine = Engine(target, EngineSettings(method="triforce", draft=draft, gamma=3, draft_gamma=2, budget=24,
                                           chunk_size=4, sink=2, window=6))
    ar = _ar_tokens(target, draft, prompt, 60)
    out = engine.generate(prompt, max_new_tokens=60, ignore_eos=True)
    assert out.token_ids == ar
    cache = engine._draft_cache
    assert cache.capacity == 2 + 6 + cache.slack and cache.length > 400


@pytest.mark.parametrize("method, retrieval_weights", [("speculative", "model"), ("retrieval", "model"),
                                                       ("streaming", "model"), ("triforce", "model"),
                                                       ("retrieval", "q4_0"), ("triforce", "q4_0")])
@pytest.mark.core
def test_bf16_greedy_equals_autoregressive_on_a_real_document(embedded_bf16, method, retrieval_weights):
    """Exact in bf16 too, not only fp32, on the embedded model's own 4-bit blocks: a
    verification of several tokens rounds each row exactly as a one-token decoding step does
    (attention splits keys at fixed boundaries; projections and glue work row by row), so even
    near-ties resolve the same way. Also with the middle level on a 4-bit copy of the weights."""
    from triforce.corpus import document_tokens

    if embedded_bf16.decoder.dtype != torch.bfloat16:
        pytest.skip("no bf16 on this CPU")
    prompt = document_tokens(embedded_bf16.tokenizer, "vim", 1500, offset=20000)
    ar = Engine(embedded_bf16).generate(prompt, max_new_tokens=64, ignore_eos=True)
    engine = Engine(embedded_bf16, EngineSettings(method=method, draft="ngram", budget=256, window=128,
                                                  retrieval_weights=retrieval_weights))
    out = engine.generate(prompt, max_new_tokens=64, ignore_eos=True)
    assert out.token_ids == ar.token_ids


def test_prompt_inside_the_draft_sink(small_vocab_models):
    """A prompt shorter than the draft's sink: rejected drafts roll back inside the sink."""
    target, draft = small_vocab_models
    prompt = [1, 4, 5, 6]
    ar = make_engine(target, draft, "autoregressive").generate(prompt, max_new_tokens=30, ignore_eos=True)
    for temperature, seed in ((0.0, None), (1.0, 5)):
        engine = Engine(target, EngineSettings(method="triforce", draft=draft, sink=16, window=8, budget=8,
                                               chunk_size=4))
        out = engine.generate(prompt, max_new_tokens=30, ignore_eos=True, temperature=temperature, seed=seed)
        assert len(out.token_ids) == 30
        if temperature == 0:
            assert out.token_ids == ar.token_ids
