"""The engine on the embedded model: greedy equals transformers, sampling is reproducible, it stops,
streams, returns its results, caches prompts, and sizes its memory before allocating it."""

from __future__ import annotations

import pytest
import torch

from triforce.engine import Engine
from triforce.errors import SettingError
from triforce.settings import EngineSettings

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is the largest planet in the solar system?\nA:",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(embedded_fp32, hf_embedded, prompt):
    ids = embedded_fp32.tokenizer.encode(prompt)
    engine = Engine(embedded_fp32)
    ours = engine.generate(ids, max_new_tokens=48, temperature=0.0).token_ids
    with torch.no_grad():
        out = hf_embedded.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs
    assert len(ours) == 48 or ours[-1] in embedded_fp32.config.eos_token_ids


def test_seeded_sampling_is_reproducible(embedded_fp32):
    engine = Engine(embedded_fp32)
    kwargs = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=50)
    a = engine.generate(PROMPTS[0], seed=123, **kwargs).token_ids
    b = engine.generate(PROMPTS[0], seed=123, **kwargs).token_ids
    c = engine.generate(PROMPTS[0], seed=124, **kwargs).token_ids
    assert a == b
    assert a != c


def test_stop_string_ends_generation_and_is_not_returned(embedded_fp32):
    engine = Engine(embedded_fp32)
    free = engine.generate(PROMPTS[0], max_new_tokens=40).text
    word = free.split()[3]  # a word the model does produce
    result = engine.generate(PROMPTS[0], max_new_tokens=40, stop=[word])
    assert result.finish_reason == "stop"
    assert word not in result.text
    assert free.startswith(result.text)


def test_max_new_tokens_and_eos(embedded_fp32):
    engine = Engine(embedded_fp32)
    result = engine.generate(PROMPTS[2], max_new_tokens=5)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    chat = engine.generate("Say only the word yes.", chat=True, max_new_tokens=64)
    assert chat.finish_reason == "eos"
    assert chat.token_ids[-1] in embedded_fp32.config.eos_token_ids


def test_streaming_yields_the_same_text(embedded_fp32):
    engine = Engine(embedded_fp32)
    generation = engine.stream(PROMPTS[0], max_new_tokens=30)
    pieces = [piece for piece in generation if piece]
    assert "".join(pieces) == generation.result.text
    assert len(pieces) > 5


def test_prompt_cache_reuses_the_common_prefix_only(embedded_fp32):
    engine = Engine(embedded_fp32)
    tok = embedded_fp32.tokenizer
    base = tok.encode("The history of the printing press begins in Germany around 1440 with Gutenberg.")
    first = engine.generate(base, max_new_tokens=12)
    again = engine.generate(base, max_new_tokens=12)
    assert again.token_ids == first.token_ids
    assert again.stats["cached_prompt_tokens"] == len(base)
    edited = list(base)
    edited[5] = tok.encode(" Spain")[0]  # differs in the middle: only the first 5 tokens are reusable
    fresh = Engine(embedded_fp32).generate(edited, max_new_tokens=12)
    reused = engine.generate(edited, max_new_tokens=12)
    assert reused.stats["cached_prompt_tokens"] == 5
    assert reused.token_ids == fresh.token_ids


def test_a_longer_run_keeps_the_cached_prompt(embedded_fp32):
    """A run needing a larger cache than the prompt's first run grows the cache and keeps the
    prompt's KV (it used to be dropped and the whole prompt prefilled again)."""
    engine = Engine(embedded_fp32)
    prompt = embedded_fp32.tokenizer.encode("Water boils at one hundred degrees Celsius at sea level, but")
    engine.generate(prompt, max_new_tokens=1)
    longer = engine.generate(prompt, max_new_tokens=60, ignore_eos=True)
    assert longer.stats["cached_prompt_tokens"] == len(prompt)
    assert engine._full.capacity >= len(prompt) + 60
    assert longer.token_ids == Engine(embedded_fp32).generate(prompt, max_new_tokens=60, ignore_eos=True).token_ids


def test_results_are_returned_and_a_stream_can_be_abandoned(embedded_fp32):
    engine = Engine(embedded_fp32)
    generation = engine.stream(PROMPTS[0], max_new_tokens=30)
    assert generation.result is None
    next(generation)  # the prefill and the first token
    generation.close()
    assert generation.result is None and not hasattr(engine, "last_result")
    again = engine.generate(PROMPTS[0], max_new_tokens=5)  # the engine stays usable
    assert len(again.token_ids) == 5 and again.stats["cached_prompt_tokens"] > 0


def test_settings_are_checked_before_any_work(embedded_fp32):
    engine = Engine(embedded_fp32, EngineSettings(max_context=16))
    for kwargs, setting in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                            (dict(num_samples=0), "num_samples"), (dict(max_new_tokens=20), "max_context")):
        with pytest.raises(SettingError) as info:
            engine.stream(PROMPTS[0], **kwargs)
        assert info.value.setting == setting
    with pytest.raises(SettingError, match="prompt is empty"):
        engine.stream("   ")


def test_switching_the_method_keeps_the_cached_prompt(embedded_fp32):
    engine = Engine(embedded_fp32, EngineSettings(method="triforce", draft="ngram", budget=16))
    first = engine.generate(PROMPTS[1], max_new_tokens=16)
    engine.configure(method="autoregressive", draft=None)
    plain = engine.generate(PROMPTS[1], max_new_tokens=16)
    assert plain.token_ids == first.token_ids
    assert plain.stats["cached_prompt_tokens"] == first.prompt_tokens
    assert [level["name"] for level in plain.stats["levels"]] == ["target"]


@pytest.mark.parametrize("method", ["autoregressive", "speculative", "triforce"])
def test_memory_estimate_covers_what_a_run_allocates(embedded_fp32, method):
    """The estimate comes from the caches' own sizing: the KV the engine holds after a run is
    at most what it estimated for that run, and the full cache is all of it without a draft."""
    from triforce.cache import FullCache

    engine = Engine(embedded_fp32, EngineSettings(method=method, draft=None if method == "autoregressive" else "ngram"))
    result = engine.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    capacity = engine.capacity_for(result.prompt_tokens + 12)
    assert engine.memory_held() == FullCache.bytes_for(embedded_fp32.config, capacity, embedded_fp32.decoder.dtype)
    assert engine.memory_held() <= engine.memory_needed(capacity)


@pytest.mark.parametrize("kernels, slope", [("avx512", 0.1), ("avx2", 0.5), ("pytorch", 0.8)])
def test_the_controller_prices_extra_rows_by_the_kernels(small_vocab_models, monkeypatch, kernels, slope):
    """The adaptive controller's prior cost per extra row follows the kernels the target runs on."""
    import triforce.engine

    target, _ = small_vocab_models
    monkeypatch.setattr(target.decoder, "kernels", kernels)
    made, real = [], triforce.engine.Controller

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(triforce.engine, "Controller", spy)
    Engine(target, EngineSettings(method="triforce", draft="ngram")).generate([1, 5, 6, 7, 5, 6], max_new_tokens=2,
                                                                            ignore_eos=True)
    assert made and all(c._costs["target"].rho == slope for c in made)
