"""Model configuration shared by every loader: what the decoder needs to know, nothing more."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingError, TriforceError

# Architectures the decoder implements. They differ only in details the config below captures
# (q/k/v biases for Qwen2); anything else is refused by name rather than run wrongly.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    # {"rope_type": ..., "factor": ..., ...} as in transformers; None means plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise TriforceError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ROPE_TYPES:
                raise TriforceError(
                    f"unsupported RoPE scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
                )


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the new `rope_parameters` or the old `rope_theta`/`rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    old = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**old, **params}
    merged.pop("rope_theta", None)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": rope_type, **merged}
    if rope_type in ("yarn", "llama3"):
        scaling.setdefault(
            "original_max_position_embeddings",
            cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")),
        )
    return float(theta), scaling


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dictionary."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
        arch = model_type
    if arch is None:
        named = ", ".join(archs) or model_type or "unknown"
        raise TriforceError(
            f"unsupported architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    # A sliding window changes attention itself: contexts longer than it are refused (Mistral
    # v0.2+ and most Qwen2 configs turn it off).
    window = cfg.get("sliding_window")
    if arch == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    theta, scaling = _rope_from_hf(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    config = ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        rope_scaling=scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        extra={"sliding_window": window or None},
    )
    config.validate()
    return config


def parse_rope_scaling(spec: str, original_max: int) -> dict[str, Any] | None | str:
    """Parse a RoPE scaling setting (`--rope-scaling` on the command line).

    Forms: "auto" (the model's own scaling, or YaRN sized to the context past the trained
    length), "none", "<type>" (factor sized to the context), "<type>:<factor>".
    Returns "auto", None, or a scaling dict whose factor may be "auto".
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return "auto"
    if spec in ("none", "default"):
        return None
    name, _, factor_text = spec.partition(":")
    aliases = {"ntk": "dynamic", "dynamic-ntk": "dynamic"}
    name = aliases.get(name, name)
    if name not in ROPE_TYPES or name == "default":
        raise SettingError(
            "rope_scaling", f"must be auto, none, linear, dynamic, yarn or llama3, optionally with :FACTOR "
            f"(e.g. yarn:4), got {spec!r}"
        )
    factor: float | str = "auto"
    if factor_text:
        try:
            factor = float(factor_text)
        except ValueError:
            raise SettingError("rope_scaling", f"factor must be a number, got {factor_text!r}") from None
        if not math.isfinite(factor) or factor < 1.0:
            raise SettingError("rope_scaling", f"factor must be >= 1, got {factor_text}")
    scaling: dict[str, Any] = {"rope_type": name, "factor": factor}
    if name in ("yarn", "llama3"):
        scaling["original_max_position_embeddings"] = original_max
    if name == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return scaling
