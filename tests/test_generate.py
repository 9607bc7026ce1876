"""Generation on the embedded model: greedy equals transformers, sampling is reproducible, stops."""

from __future__ import annotations

import pytest
import torch

from triforce.generation import TriForce

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is the largest planet in the solar system?\nA:",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(embedded_fp32, hf_embedded, prompt):
    ids = embedded_fp32.tokenizer.encode(prompt)
    engine = TriForce(embedded_fp32, method="autoregressive")
    ours = engine.generate(ids, max_new_tokens=48, temperature=0.0).token_ids
    with torch.no_grad():
        out = hf_embedded.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs
    assert len(ours) == 48 or ours[-1] in embedded_fp32.config.eos_token_ids


def test_seeded_sampling_is_reproducible(embedded_fp32):
    engine = TriForce(embedded_fp32)
    kwargs = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=50)
    a = engine.generate(PROMPTS[0], seed=123, **kwargs).token_ids
    b = engine.generate(PROMPTS[0], seed=123, **kwargs).token_ids
    c = engine.generate(PROMPTS[0], seed=124, **kwargs).token_ids
    assert a == b
    assert a != c


def test_stop_string_ends_generation_and_is_not_returned(embedded_fp32):
    engine = TriForce(embedded_fp32)
    free = engine.generate(PROMPTS[0], max_new_tokens=40).text
    word = free.split()[3]  # a word the model does produce
    result = engine.generate(PROMPTS[0], max_new_tokens=40, stop=[word])
    assert result.finish_reason == "stop"
    assert word not in result.text
    assert free.startswith(result.text)


def test_max_new_tokens_and_eos(embedded_fp32):
    engine = TriForce(embedded_fp32)
    result = engine.generate(PROMPTS[2], max_new_tokens=5)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    chat = engine.generate("Say only the word yes.", chat=True, max_new_tokens=64)
    assert chat.finish_reason == "eos"
    assert chat.token_ids[-1] in embedded_fp32.config.eos_token_ids


def test_streaming_yields_the_same_text(embedded_fp32):
    engine = TriForce(embedded_fp32)
    pieces = list(engine.stream(PROMPTS[0], max_new_tokens=30))
    assert "".join(pieces) == engine.last_result.text
    assert len(pieces) > 5


def test_prompt_cache_reuses_the_common_prefix_only(embedded_fp32):
    engine = TriForce(embedded_fp32)
    tok = embedded_fp32.tokenizer
    base = tok.encode("The history of the printing press begins in Germany around 1440 with Gutenberg.")
    first = engine.generate(base, max_new_tokens=12)
    again = engine.generate(base, max_new_tokens=12)
    assert again.token_ids == first.token_ids
    assert again.stats["cached_prompt_tokens"] == len(base)
    edited = list(base)
    edited[5] = tok.encode(" Spain")[0]  # differs in the middle: only the first 5 tokens are reusable
    fresh = TriForce(embedded_fp32).generate(edited, max_new_tokens=12)
    reused = engine.generate(edited, max_new_tokens=12)
    assert reused.stats["cached_prompt_tokens"] == 5
    assert reused.token_ids == fresh.token_ids


def test_a_longer_run_keeps_the_cached_prompt(embedded_fp32):
    """A run needing a larger cache than the prompt's first run grows the cache and keeps the
    prompt's KV (it used to be dropped and the whole prompt prefilled again)."""
    engine = TriForce(embedded_fp32)
    prompt = embedded_fp32.tokenizer.encode("Water boils at one hundred degrees Celsius at sea level, but")
    engine.generate(prompt, max_new_tokens=1)
    longer = engine.generate(prompt, max_new_tokens=60, ignore_eos=True)
    assert longer.stats["cached_prompt_tokens"] == len(prompt)
    assert engine._full.capacity >= len(prompt) + 60
    assert longer.token_ids == TriForce(embedded_fp32).generate(prompt, max_new_tokens=60, ignore_eos=True).token_ids
