"""`--quick`: a bench's whole pipeline in seconds, for smoke tests and CI.

A tiny random Llama target (2 layers) and a draft made of its first layer are written to a
temporary Hugging Face directory, with a small BPE tokenizer trained on the benchmark document;
contexts are short and few tokens are generated. The figures mean nothing; the code paths,
output files and lossless checks are the real ones.

Bench settings are merged here too: a flag the user gave wins, then the --quick preset, then the
bench's defaults. Presets name the tiny models by placeholder (TINY_TARGET, TINY_DRAFT); they are
created only when a setting still names them.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..corpus import load_document

TINY_TARGET = "<tiny-target>"
TINY_DRAFT = "<tiny-draft>"
TRAINED_LENGTH = 256  # short, so quick contexts past it exercise the RoPE scaling path
QK_SCALE = 3.0  # peaked attention, as trained models have (random ones attend almost uniformly)


def settings(args: Any, defaults: dict[str, Any], quick: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each default's value from args when given (not None), else from `quick`, else the default."""
    preset = {**defaults, **(quick or {})}
    return {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in preset.items()}


def write_tokenizer(directory: Path, text: str, vocab_size: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def write_tiny_models(directory: Path, document: str, seed: int = 0) -> tuple[str, str]:
    """(target, draft) directories: a random 2-layer Llama and a draft holding its first layer."""
    import shutil

    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok_dir = directory / "tokenizer"
    write_tokenizer(tok_dir, load_document(document)[:200_000])
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    base = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=TRAINED_LENGTH, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=2, **base)).float().eval()
    with torch.no_grad():  # larger than the default init, so logits are decisive
        for name, p in target.named_parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.05)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SCALE)
    draft = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=1, **base)).float().eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # layer 0, embeddings, norm, head
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        path = directory / name
        model.save_pretrained(str(path))
        for f in tok_dir.iterdir():
            shutil.copy(f, path / f.name)
        paths.append(str(path))
    return paths[0], paths[1]


def _swap(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, list):
        return list(dict.fromkeys(_swap(v, names) for v in value))
    return names.get(value, value) if isinstance(value, str) else value


@contextmanager
def materialized(config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`config` with the tiny-model placeholders replaced by real directories (alive inside the
    with block). With a user's --model, a tiny draft would not share its vocabulary: prompt
    lookup (ngram) stands in for it."""
    flat = [x for v in config.values() for x in (v if isinstance(v, list) else [v])]
    if TINY_TARGET not in flat and TINY_DRAFT not in flat:
        yield config
        return
    if config.get("model") != TINY_TARGET:
        yield {k: _swap(v, {TINY_DRAFT: "ngram"}) for k, v in config.items()}
        return
    with tempfile.TemporaryDirectory(prefix="triforce-quick-") as tmp:
        target, draft = write_tiny_models(Path(tmp), config.get("document", "vim").split(",")[0])
        yield {k: _swap(v, {TINY_TARGET: target, TINY_DRAFT: draft}) for k, v in config.items()}
