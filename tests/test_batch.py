"""Batched generation: every sequence of a batch is exactly what it would be alone."""

from __future__ import annotations

import pytest
import torch

import triforce
from triforce.batch import generate_batch
from triforce.engine import Engine
from triforce.errors import TriforceError
from triforce.model import Decoder
from triforce.settings import EngineSettings

from .conftest import make_hf_model

PRESETS = ["autoregressive", "speculative", "retrieval", "streaming", "triforce"]
# small caches, so the sparse levels really are sparse at these lengths
KNOBS = dict(budget=24, chunk_size=4, sink=2, window=12, gamma=4, draft_gamma=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("batch")
    common = dict(max_position_embeddings=4096)
    target = make_hf_model(tmp / "target", tokenizer_dir, seed=11, **common)
    draft = make_hf_model(tmp / "draft", tokenizer_dir, seed=12, num_hidden_layers=1, **common)
    return triforce.load(target, dtype="fp32"), triforce.load(draft, dtype="fp32")


def prompts(vocab: int) -> list[list[int]]:
    """Very different lengths: shorter than one chunk, than the budget, and far longer."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 40, 300, 120)]


def settings(method, draft=None):
    return EngineSettings(method=method, draft=draft if method in ("speculative", "triforce") else None, **KNOBS)


def alone(target, draft, method, request):
    return Engine(target, settings(method, draft)).generate(**request)


@pytest.mark.core
@pytest.mark.parametrize("method", PRESETS)
def test_batch_equals_alone_greedy(models, method):
    target, draft = models
    requests = [dict(prompt=p, max_new_tokens=n, ignore_eos=True)
                for p, n in zip(prompts(target.config.vocab_size), (30, 9, 22, 15))]
    batched = generate_batch(target, requests, settings(method, draft))
    for request, result in zip(requests, batched):
        assert result.token_ids == alone(target, draft, method, request).token_ids
        assert len(result.token_ids) == request["max_new_tokens"]  # each left when it was done


@pytest.mark.parametrize("method", ["autoregressive", "triforce"])
def test_batch_sampling_is_per_sequence_reproducible(models, method):
    target, draft = models
    requests = [dict(prompt=p, max_new_tokens=12, temperature=t, top_p=0.9, seed=s, ignore_eos=True)
                for p, t, s in zip(prompts(target.config.vocab_size), (0.6, 1.0, 0.8, 1.0), (1, 2, 3, 4))]
    batched = generate_batch(target, requests, settings(method, draft))
    mates = generate_batch(target, requests[1:3], settings(method, draft))
    for request, result in zip(requests, batched):
        assert result.token_ids == alone(target, draft, method, request).token_ids
    assert [r.token_ids for r in mates] == [r.token_ids for r in batched[1:3]]


def test_a_step_reads_the_weights_once_for_the_batch(models, monkeypatch):
    target, draft = models
    sizes = []
    original = Decoder.forward

    def counting(self, segments, residuals=None):
        sizes.append(len(segments))
        return original(self, segments, residuals)

    monkeypatch.setattr(Decoder, "forward", counting)
    requests = [dict(prompt=p, max_new_tokens=10, ignore_eos=True) for p in prompts(target.config.vocab_size)]
    generate_batch(target, requests)
    assert sizes.count(4) >= 8  # the decoding steps ran all four sequences in one pass


def test_bad_request_and_memory_admission(models, monkeypatch):
    target, draft = models
    with pytest.raises(TriforceError, match="prompt"):
        generate_batch(target, [dict(max_new_tokens=3)])
    monkeypatch.setattr("triforce.cache.available_memory_bytes", lambda: 10_000)
    with pytest.raises(TriforceError, match="batch of 2 sequences"):
        generate_batch(target, [dict(prompt=[5, 6, 7]), dict(prompt=[8, 9])])


def test_one_failing_sequence_leaves_the_others_exact(models):
    target, draft = models
    ps = prompts(target.config.vocab_size)
    requests = [dict(prompt=ps[0], max_new_tokens=8), dict(prompt=ps[1], max_new_tokens=8, temperature=-1.0),
                dict(prompt=ps[3], max_new_tokens=8)]
    results = generate_batch(target, requests, settings("triforce", draft))
    assert isinstance(results[1], TriforceError)
    assert results[0].token_ids == alone(target, draft, "triforce", requests[0]).token_ids
    assert results[2].token_ids == alone(target, draft, "triforce", requests[2]).token_ids


def test_cli_batch_file_prints_one_json_line_per_request_in_order(tmp_path):
    import json

    from .test_cli import run_cli

    lines = [{"prompt": "The capital of France is", "max_new_tokens": 10},
             {"prompt": "Once upon a time", "max_new_tokens": 6, "temperature": 0.8, "seed": 3},
             {"prompt": "def add(a, b):", "max_new_tokens": 14}]
    batch = tmp_path / "requests.jsonl"
    batch.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    # a fixed gamma: under "auto" the plan follows measured speeds, so a seed fixes the distribution, not the sample
    out = run_cli("generate", "--batch-file", str(batch), "--method", "retrieval", "--budget", "8", "--gamma", "4",
                  "--quiet")
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [len(r["token_ids"]) for r in results] == [10, 6, 14]
    for line, result in zip(lines, results):
        args = ["generate", "--prompt", line["prompt"], "--max-new-tokens", str(line["max_new_tokens"]), "--json",
                "--quiet", "--method", "autoregressive"]
        if "seed" in line:  # a sample is reproduced by the same method and seed alone
            args += ["--temperature", "0.8", "--seed", "3", "--method", "retrieval", "--budget", "8", "--gamma", "4"]
        assert json.loads(run_cli(*args).stdout)["token_ids"] == result["token_ids"]


@pytest.mark.parametrize("content, fragment", [
    ('{"prompt": "hi"}\n{not json\n', "requests.jsonl:2: not valid JSON"),
    ('{"prompt": "hi", "logit_bias": 1}\n', "requests.jsonl:1: unknown key 'logit_bias'"),
    ('{"prompt": "hi", "temperature": -1}\n', "requests.jsonl:1: temperature"),
    ('{"max_new_tokens": 3}\n', "requests.jsonl:1: 'prompt' is missing"),
    ("\n", "has no requests"),
])
def test_cli_batch_file_errors(tmp_path, content, fragment):
    from .test_cli import assert_clean_error, run_cli

    batch = tmp_path / "requests.jsonl"
    batch.write_text(content)
    assert_clean_error(run_cli("generate", "--batch-file", str(batch)), fragment)


def test_an_engine_of_a_batch_refuses_to_run_outside_it(models):
    """Its passes would wait forever for a step nobody runs: it says so instead."""
    from triforce.batcher import ForwardBatcher

    engine = Engine(models[0], batcher=ForwardBatcher())
    with pytest.raises(RuntimeError, match="outside the batch"):
        engine.generate([5, 6, 7], max_new_tokens=2)
