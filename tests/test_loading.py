"""Loading GGUF files of every supported tensor type, HF directories, and refusing bad models."""

from __future__ import annotations

import json
import shutil

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


def logits(loaded, ids):
    dec = loaded.decoder
    dec.prepare(len(ids))
    cache = FullCache(loaded.config, len(ids), dtype=dec.dtype)
    return dec.forward([Segment(torch.tensor(ids), cache, len(ids))])[0]


def test_gguf_blocks_are_read_as_they_are_and_give_the_dense_logits(gguf_model):
    """By default a GGUF's quantized matrices stay in their blocks (bf16 compute), and every
    weight decodes to the value the dense path rounds it to, summed in the same order: the
    logits are the dense path's bit for bit. A fused projection mixing a block format with a
    dense type (gate Q4_1, up F16 here) is read dense."""
    from triforce import native
    from triforce.quant import kernel_supports

    if not kernel_supports("q4_0"):
        pytest.skip("no quantized-projection kernel on this CPU")
    ids = list(range(3, 70))
    blocks = triforce.load(gguf_model, dtype="bf16")
    dense = triforce.load(gguf_model, dtype="bf16", weights="bf16")
    assert {"q4_k", "q6_k", "q8_0", "q4_0", "dense"} <= set(blocks.decoder.weight_formats)
    assert set(dense.decoder.weight_formats) == {"dense"}
    assert blocks.decoder.weight_bytes < dense.decoder.weight_bytes
    if native._cpu_has_amx():  # AMX tiles sum the dense path's products in another order
        pytest.skip("this CPU's dense path runs on AMX tiles")
    assert torch.equal(logits(blocks, ids), logits(dense, ids))


def test_a_gguf_tensor_of_an_unsupported_type_is_named(tmp_path, tokenizer_dir):
    hf_dir = make_hf_model(tmp_path / "hf", tokenizer_dir, hidden_size=256, intermediate_size=512, head_dim=64)
    path = write_llama_gguf(hf_dir, tmp_path / "odd.gguf", {"attn_v.weight": "I32"})
    with pytest.raises(TriforceError, match="blk.0.attn_v.weight uses unsupported type I32"):
        triforce.load(path)


def test_a_truncated_gguf_is_refused(tmp_path):
    from triforce.loading import embedded_model_path

    data = embedded_model_path().read_bytes()
    path = tmp_path / "half.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TriforceError, match="not a readable GGUF file"):
        triforce.load(path)


def test_quantizing_at_load_is_cached(tmp_path, tokenizer_dir, monkeypatch):
    """--weights q4_0 on a directory quantizes its projections once; the next load reads them
    from the cache directory (same blocks), and a weights value that is not a format is named."""
    from triforce import loading, quant

    monkeypatch.setenv("TRIFORCE_CACHE", str(tmp_path / "cache"))
    hf_dir = make_hf_model(tmp_path / "hf", tokenizer_dir, hidden_size=256, intermediate_size=512, head_dim=64)
    first = triforce.load(hf_dir, dtype="bf16", weights="q4_0")
    files = list((tmp_path / "cache" / "weights").iterdir())
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(quant, "quantize", lambda *a: calls.append(a))
    again = triforce.load(hf_dir, dtype="bf16", weights="q4_0")
    assert not calls and set(again.decoder.weight_formats) == set(first.decoder.weight_formats)
    ids = list(range(3, 40))
    assert torch.equal(logits(first, ids), logits(again, ids))
    with pytest.raises(triforce.SettingError, match="weights must be one of"):
        loading.load(hf_dir, weights="int3")


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


def test_a_pruned_output_layer_loads_and_a_bad_token_map_is_refused(tmp_path, tokenizer_dir):
    """A draft whose output layer covers only token_map's tokens: those tokens' logits are the
    whole model's, every other token's -inf; a token map that does not fit its model is one line."""
    from safetensors.torch import load_file, save_file

    from triforce.distill import prune_output_layer

    whole = make_hf_model(tmp_path / "whole", tokenizer_dir)
    ids = torch.tensor([1, 5, 9, 14, 20, 7])
    logits = {}
    kept = torch.tensor([2, 3, 5, 8, 13, 21, 34])
    pruned = tmp_path / "pruned"
    shutil.copytree(whole, pruned)
    prune_output_layer(pruned, kept)
    for name, where in (("whole", whole), ("pruned", pruned)):
        model = triforce.load(where, dtype="fp32")
        model.decoder.prepare(len(ids))
        logits[name] = model.decoder.forward([Segment(ids, FullCache(model.config, len(ids), dtype=torch.float32),
                                                      len(ids))])[0]
    # the same rows of the output layer (a BLAS call of another width may sum in another order)
    assert torch.allclose(logits["pruned"][:, kept], logits["whole"][:, kept], rtol=0, atol=1e-5)
    others = torch.ones(logits["whole"].shape[1], dtype=torch.bool)
    others[kept] = False
    assert torch.all(logits["pruned"][:, others] == float("-inf"))
    file = pruned / "model.safetensors"
    weights = load_file(str(file))
    vocab = weights["model.embed_tokens.weight"].shape[0]
    for token_map, lm_head, message in (
        (torch.tensor([2, 3, 3, 5, 8, 13, 21]), None, f"token_map must list distinct token ids below {vocab}"),
        (torch.tensor([2, 3, 5, 8, 13, 21, vocab]), None, f"token_map must list distinct token ids below {vocab}"),
        (kept, weights["lm_head.weight"][:5], r"one row per token_map entry \(7\), got 5"),
    ):
        save_file({**weights, "token_map": token_map,
                   "lm_head.weight": weights["lm_head.weight"] if lm_head is None else lm_head}, str(file))
        with pytest.raises(TriforceError, match=message):
            triforce.load(pruned, dtype="fp32")
