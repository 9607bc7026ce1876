"""Tokenizers and chat templates, from tokenizer.json (fast `tokenizers`) and a Jinja template.

Loading through `tokenizers` directly keeps start-up short; transformers is only imported to
convert tokenizers that have no tokenizer.json (GGUF metadata, sentencepiece-only directories),
and the result is cached so that happens once per model file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as FastTokenizer

from .errors import TriforceError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """encode/decode text and render chat prompts the way the model was trained to read them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        path = directory / "tokenizer.json"
        if not path.exists():
            raise TriforceError(f"no tokenizer.json in {directory}")
        try:
            self.backend = FastTokenizer.from_file(str(path))
        except Exception as exc:
            raise TriforceError(f"cannot read {path}: {exc}") from None
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_path = directory / "chat_template.jinja"
        self.chat_template: str | None = (
            template_path.read_text() if template_path.exists() else config.get("chat_template")
        )
        if isinstance(self.chat_template, list):  # named templates: use the default one
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self.backend.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.backend.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None

    # -- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def vocabulary(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    # -- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TriforceError("this model has no chat template; pass the prompt as plain text")
        if self._template is None:
            self._template = _compile(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added on top (as
        # transformers' apply_chat_template(tokenize=True) does).
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _compile(template: str):  # noqa: ANN202 - a jinja2 Template
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TriforceError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
