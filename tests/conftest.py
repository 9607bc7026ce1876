"""Shared fixtures: tiny random models saved as Hugging Face directories, and the embedded model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import triforce

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The quick brown fox jumps over "
    "the lazy dog. A journey of a thousand miles begins with a single step. To be, or not to be, that is the "
    "question. All happy families are alike; each unhappy family is unhappy in its own way. Call me Ishmael. "
    "In the beginning was the word, and numbers 0123456789 and punctuation: ; , . ! ? ( ) [ ] { } - _ = + * / "
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer (vocabulary 320) trained on a paragraph."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def make_hf_model(directory: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Randomly initialised transformers model saved as an HF directory with the test tokenizer."""
    import shutil

    import transformers

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    base = dict(
        vocab_size=len(vocab) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    base.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**base)).float().eval()
    with torch.no_grad():  # larger weights than the default init, so logits differ visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            else:  # norm weights around 1, biases around 0
                p.add_(torch.randn_like(p) * 0.05)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


@pytest.fixture(scope="session")
def embedded_fp32():
    import triforce

    return triforce.load(None, dtype="fp32")


@pytest.fixture(scope="session")
def hf_embedded():
    """transformers' own loading of the embedded GGUF (the correctness oracle), fp32."""
    from transformers import AutoModelForCausalLM

    from triforce.loading import embedded_model_path

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


VOCAB = 12


@pytest.fixture(scope="session")
def small_vocab_models(tmp_path_factory):
    """A target and a (different, random) draft over a 12-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tmp = tmp_path_factory.mktemp("small")
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    target = make_hf_model(tmp / "target", tok_dir, seed=3, num_hidden_layers=2, **common)
    draft = make_hf_model(tmp / "draft", tok_dir, seed=4, num_hidden_layers=1, **common)
    return triforce.load(target, dtype="fp32"), triforce.load(draft, dtype="fp32")


@pytest.fixture(scope="session")
def embedded_bf16():
    return triforce.load(None, dtype="bf16")
