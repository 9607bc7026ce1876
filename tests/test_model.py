"""Our decoder against transformers' implementations (the correctness oracle), in fp32."""

from __future__ import annotations

import pytest
import torch

import triforce
from triforce import native
from triforce.cache import FullCache
from triforce.model import Segment

from .conftest import make_hf_model

ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}

CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-mqa-hd32": ("llama", {"num_key_value_heads": 1, "head_dim": 32, "hidden_size": 128}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    **{f"llama-rope-{name}": ("llama", {"max_position_embeddings": 32}) for name in ROPE if name != "default"},
}
SEQ = 64  # past max_position_embeddings=32 for the scaled cases, so the scaling matters


def rope_params(case: str) -> dict | None:
    name = case.removeprefix("llama-rope-") if case.startswith("llama-rope-") else "default"
    params = ROPE[name]
    return None if params is None else {**params, "rope_theta": 10000.0}


@pytest.fixture(scope="module", params=list(CASES))
def case_dir(request, tmp_path_factory, tokenizer_dir):
    arch, overrides = CASES[request.param]
    rope = rope_params(request.param)
    if rope is not None:
        overrides = {**overrides, "rope_parameters": rope}
    path = make_hf_model(tmp_path_factory.mktemp(request.param), tokenizer_dir, arch, **overrides)
    return request.param, path


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(loaded, ids, chunks=None):
    dec = loaded.decoder
    dec.prepare(len(ids))
    cache = FullCache(loaded.config, len(ids) + 4, dtype=dec.dtype)
    chunks = chunks or [len(ids)]
    outs, start = [], 0
    for size in chunks:
        piece = torch.tensor(ids[start : start + size])
        outs.append(dec.forward([Segment(piece, cache, size)])[0])
        start += size
    assert start == len(ids)
    return torch.cat(outs)


@pytest.mark.core
@pytest.mark.parametrize("isa", ["avx512", "avx2", "none"])
def test_logits_match_transformers(case_dir, isa):
    """Every kernel path (and PyTorch's) computes the reference model's logits."""
    if isa != "none" and isa not in native.cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    name, path = case_dir
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (SEQ,)).tolist()
    expected = hf_logits(path, ids)
    try:
        ran = native.set_isa(isa)
        loaded = triforce.load(path, dtype="fp32")
        assert loaded.decoder.fused == (isa != "none")
        assert loaded.decoder.kernels == ran == ("pytorch" if isa == "none" else isa)
        got = our_logits(loaded, ids)
    finally:
        native.set_isa(None)  # back to the environment's choice
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, f"{name}: max |logit difference| {diff}"


def test_auto_rope_scaling_is_yarn_past_trained_length_only(tmp_path, tokenizer_dir):
    from triforce.rope import resolve_scaling

    path = make_hf_model(tmp_path / "m", tokenizer_dir, max_position_embeddings=32)
    auto = triforce.load(path, dtype="fp32")  # rope_scaling="auto"
    plain = triforce.load(path, dtype="fp32", rope_scaling=None)
    assert resolve_scaling(auto.config, "auto", 32) is None
    yarn = resolve_scaling(auto.config, "auto", 64)
    assert yarn["rope_type"] == "yarn" and yarn["factor"] == 2.0
    short = list(range(3, 3 + 30))
    assert torch.equal(our_logits(auto, short), our_logits(plain, short))
    long = list(range(3, 3 + SEQ))
    assert (our_logits(auto, long) - our_logits(plain, long)).abs().max() > 1e-2


@pytest.mark.core
@pytest.mark.parametrize("dtype", ["fp32"])
def test_prefill_in_chunks_and_token_by_token_agree(tmp_path, tokenizer_dir, dtype):
    path = make_hf_model(tmp_path / "m", tokenizer_dir, num_key_value_heads=1)
    loaded = triforce.load(path, dtype=dtype)
    torch.manual_seed(2)
    ids = torch.randint(3, 300, (90,)).tolist()
    whole = our_logits(loaded, ids)
    chunked = our_logits(loaded, ids, [7, 33, 1, 20, 29])
    one_by_one = our_logits(loaded, ids, [1] * len(ids))
    assert (whole - chunked).abs().max() < 1e-5
    assert (whole - one_by_one).abs().max() < 1e-5


@pytest.mark.core
def test_prefill_chunks_agree_long_prompt_native_kernel(embedded_fp32):
    # Over the kernel's limit of queries per call the PyTorch path takes over; both must agree.
    ids = embedded_fp32.tokenizer.encode("The history of the Roman empire spans many centuries. " * 16)
    whole = our_logits(embedded_fp32, ids)
    chunked = our_logits(embedded_fp32, ids, [len(ids) - 70, 60, 10])
    steps = our_logits(embedded_fp32, ids, [len(ids) - 5, 1, 1, 1, 1, 1])
    halves = our_logits(embedded_fp32, ids, [len(ids) // 2, len(ids) - len(ids) // 2])  # both > 64 queries
    assert len(ids) // 2 > 64
    assert (whole - chunked).abs().max() < 1e-4
    assert (whole - steps).abs().max() < 1e-4
    assert (whole - halves).abs().max() < 1e-4


@pytest.mark.core
def test_bf16_rows_do_not_depend_on_how_the_prompt_is_split():
    """Where the kernel runs passes of any length (bf16 caches, AVX512-BF16, no AMX), a row's
    logits are bit-identical however the prompt was cut into passes (so its cached keys and
    values were too): the property that lets the prompt cache keep every row."""
    if not native.prefill_on_kernel(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this CPU prefills bf16 through flash attention")
    from triforce.corpus import document_tokens

    loaded = triforce.load(None, dtype="bf16")

    ids = document_tokens(loaded.tokenizer, "vim", 700, offset=3000)
    whole = our_logits(loaded, ids)
    assert torch.equal(whole, our_logits(loaded, ids, [300, 399, 1]))
    assert torch.equal(whole, our_logits(loaded, ids, [650] + [10] * 5))
    assert torch.equal(whole, our_logits(loaded, ids, [1] * 40 + [660]))


def test_embedded_gguf_logits_match_transformers(embedded_fp32, hf_embedded):
    ids = embedded_fp32.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    with torch.no_grad():
        expected = hf_embedded(torch.tensor([ids])).logits[0]
    got = our_logits(embedded_fp32, ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_embedded_model_on_its_own_blocks_matches_transformers(embedded_bf16, hf_embedded):
    """The embedded GGUF read from its Q4_1/Q8_0 blocks with bf16 activations, against
    transformers' fp32 run of the same file: the same next token at every position, and a KL
    divergence under 0.01 nats per position (bf16 rounding; measured 0.001-0.002)."""
    if embedded_bf16.decoder.dtype != torch.bfloat16:
        pytest.skip("no bf16 on this CPU")
    assert set(embedded_bf16.decoder.weight_formats) <= {"q4_1", "q8_0"}
    for text in ["The capital of France is Paris. The capital of Italy is",
                 "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]:
        ids = embedded_bf16.tokenizer.encode(text)
        with torch.no_grad():
            expected = hf_embedded(torch.tensor([ids])).logits[0]
        got = our_logits(embedded_bf16, ids)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        assert kl < 0.01


def test_embedded_tokenizer_matches_transformers(embedded_fp32):
    from transformers import AutoTokenizer

    from triforce.loading import embedded_model_path

    path = embedded_model_path()
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world!", "  leading spaces and\nnewlines\t tabs", "naïve café – 東京 🚀", "x=1+2; y = [3, 4]"]:
        assert embedded_fp32.tokenizer.encode(text) == hf(text)["input_ids"]
        assert embedded_fp32.tokenizer.decode(hf(text)["input_ids"]) == hf.decode(hf(text)["input_ids"],
                                                                                   skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert embedded_fp32.tokenizer.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_features_are_transformers_last_hidden_states(tmp_path, tokenizer_dir):
    """A pass that wants features leaves the final hidden state of every token (after the final norm),
    equal to transformers' last hidden state, also when the prompt runs in several passes."""
    from transformers import AutoModelForCausalLM

    from triforce.runner import Runner

    path = make_hf_model(tmp_path / "m", tokenizer_dir)
    torch.manual_seed(3)
    ids = torch.randint(3, 300, (80,)).tolist()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    loaded = triforce.load(path, dtype="fp32")
    dec = loaded.decoder
    dec.prepare(len(ids))
    segment = Segment(torch.tensor(ids), FullCache(loaded.config, len(ids), dtype=dec.dtype), 1, want_features=True)
    dec.forward([segment])
    assert segment.features.shape == expected.shape
    assert (segment.features - expected).abs().max() < 1e-4
    runner, features = Runner(dec, prefill_chunk=32), []
    runner.run(FullCache(loaded.config, len(ids), dtype=dec.dtype), ids, 1, features=features)
    assert [len(f) for f in features] == [32, 32, 16]
    assert (torch.cat(features) - expected).abs().max() < 1e-4
    plain = Segment(torch.tensor(ids[:5]), FullCache(loaded.config, 8, dtype=dec.dtype), 1)
    dec.forward([plain])
    assert plain.features is None  # not asked for, not kept
