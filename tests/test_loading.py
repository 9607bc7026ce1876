"""Loading GGUF files of every supported tensor type, HF directories, and refusing bad models."""

from __future__ import annotations

import json

import pytest
import torch

import triforce
from triforce.cache import FullCache
from triforce.errors import TriforceError
from triforce.model import Segment

from .conftest import make_hf_model
from .gguf_util import hf_gguf_logits, write_llama_gguf

TYPES = {
    "attn_q.weight": "Q4_K", "attn_k.weight": "Q6_K", "attn_v.weight": "Q8_0", "attn_output.weight": "Q4_0",
    "ffn_gate.weight": "Q4_1", "ffn_up.weight": "F16", "ffn_down.weight": "BF16", "token_embd.weight": "Q8_0",
    "output.weight": "F32",
}


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("gguf")
    hf_dir = make_hf_model(tmp / "hf", tokenizer_dir, hidden_size=256, intermediate_size=512, head_dim=64)
    return write_llama_gguf(hf_dir, tmp / "model.gguf", TYPES)


def test_gguf_with_every_quant_type_matches_transformers(gguf_model):
    ids = list(range(3, 70))
    expected = hf_gguf_logits(gguf_model, ids)
    loaded = triforce.load(gguf_model, dtype="fp32")
    dec = loaded.decoder
    dec.prepare(len(ids))
    cache = FullCache(loaded.config, len(ids), dtype=torch.float32)
    got = dec.forward([Segment(torch.tensor(ids), cache, len(ids))])[0]
    assert (got - expected).abs().max().item() < 1e-4
    assert loaded.config.architecture == "llama" and not loaded.config.tie_word_embeddings


def test_gguf_tokenizer_round_trips(gguf_model):
    tok = triforce.load(gguf_model, dtype="fp32").tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    assert tok.decode(tok.encode(text)) == text


def test_unsupported_gguf_architecture_is_named(tmp_path, tokenizer_dir, gguf_model):
    hf_dir = make_hf_model(tmp_path / "hf", tokenizer_dir, hidden_size=256, intermediate_size=512, head_dim=64)
    path = write_llama_gguf(hf_dir, tmp_path / "phi.gguf", {}, architecture="phi2")
    with pytest.raises(TriforceError, match="unsupported GGUF architecture 'phi2'"):
        triforce.load(path)


def test_unsupported_hf_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(TriforceError, match="unsupported architecture GPT2LMHeadModel"):
        triforce.load(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"GGUF\x03\x00\x00\x00garbage"])
def test_corrupt_gguf_is_refused(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(TriforceError, match="GGUF"):
        triforce.load(path)


def test_missing_and_hub_models_fail_at_once(tmp_path):
    with pytest.raises(TriforceError, match="does not exist"):
        triforce.load(tmp_path / "nope.gguf")
    with pytest.raises(TriforceError, match="never downloads"):
        triforce.load("HuggingFaceTB/SmolLM2-1.7B-Instruct")


def test_directory_missing_weights(tmp_path, tokenizer_dir):
    hf_dir = make_hf_model(tmp_path / "hf", tokenizer_dir)
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(TriforceError, match="no \\*.safetensors"):
        triforce.load(hf_dir)
