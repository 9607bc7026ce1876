"""The draft shipped for the embedded SmolLM2: it loads (in triforce and in transformers), shares
the target's vocabulary, is the default draft, is small, and keeps TriForce exact."""

from __future__ import annotations

import pytest
import torch

from triforce.cache import FullCache
from triforce.corpus import document_tokens
from triforce.engine import Engine
from triforce.loading import SHIPPED_DRAFT, default_draft, load
from triforce.model import Segment
from triforce.settings import EngineSettings

pytestmark = pytest.mark.skipif(not (SHIPPED_DRAFT / "config.json").exists(), reason="no shipped draft")


@pytest.fixture(scope="module")
def shipped_fp32():
    return load(str(SHIPPED_DRAFT), dtype="fp32")


def test_shipped_draft_is_small_and_the_default(embedded_fp32):
    size = sum(p.stat().st_size for p in SHIPPED_DRAFT.rglob("*") if p.is_file())
    assert size <= 40 * 2**20
    assert default_draft(embedded_fp32) == str(SHIPPED_DRAFT)


def test_shipped_draft_shares_the_targets_vocabulary(shipped_fp32, embedded_fp32):
    assert shipped_fp32.config.vocab_size == embedded_fp32.config.vocab_size
    assert shipped_fp32.tokenizer.vocabulary() == embedded_fp32.tokenizer.vocabulary()


def test_shipped_draft_loads_in_transformers_with_the_same_logits(shipped_fp32):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(SHIPPED_DRAFT, torch_dtype=torch.float32).eval()
    ids = shipped_fp32.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    dec = shipped_fp32.decoder
    dec.prepare(len(ids))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
        ours = dec.forward([Segment(torch.tensor(ids), FullCache(shipped_fp32.config, len(ids), dtype=dec.dtype),
                                    len(ids))])[0]
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method", ["triforce", "speculative"])
def test_greedy_with_the_shipped_draft_equals_autoregressive(embedded_fp32, shipped_fp32, method):
    """On 3K tokens of a real document, with a budget below the context so retrieval is sparse."""
    prompt = document_tokens(embedded_fp32.tokenizer, "vim", 3000)
    baseline = Engine(embedded_fp32).generate(prompt, max_new_tokens=40).token_ids
    engine = Engine(embedded_fp32, EngineSettings(method=method, draft=shipped_fp32, budget=1024, window=256))
    result = engine.generate(prompt, max_new_tokens=40)
    assert result.token_ids == baseline
    bottom = result.stats["levels"][0]
    assert bottom["num_draft_tokens"] > 0
