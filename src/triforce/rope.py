"""Rotary position embeddings with the scalings Llama-family checkpoints use.

Frequencies follow the published formulas (linear, dynamic NTK, YaRN, Llama 3). They are fixed
for a whole generation from its context length, so that chunked and one-piece prefill rotate
every key identically; for dynamic NTK that is the length transformers would see in one forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import ModelConfig


def resolve_scaling(
    config: ModelConfig, override: dict[str, Any] | None | str, context_len: int
) -> dict[str, Any] | None:
    """The concrete scaling for a run of `context_len` tokens.

    "auto" keeps the checkpoint's own scaling; a model without one gets YaRN sized to the
    context once the context passes its trained length (measured best for SmolLM2, README).
    """
    trained = config.max_position_embeddings
    if override == "auto":
        if config.rope_scaling is not None:
            return config.rope_scaling
        if context_len <= trained:
            return None
        override = {"rope_type": "yarn", "factor": "auto", "original_max_position_embeddings": trained}
    if override is None:
        return None
    scaling = dict(override)
    if scaling.get("factor") == "auto":
        # sized to the context rounded up to a multiple of half the trained length, so a few more
        # or fewer new tokens keep the same scaling (and a cached prompt's keys stay valid)
        step = max(1, trained // 2)
        scaling["factor"] = max(1.0, -(-context_len // step) * step / trained)
    return scaling


def inv_freq_and_attention_factor(
    config: ModelConfig, scaling: dict[str, Any] | None, context_len: int
) -> tuple[torch.Tensor, float]:
    dim = config.head_dim
    base = config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq, 1.0
    rope_type = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "dynamic":
        trained = config.max_position_embeddings
        seq_len = max(context_len, trained)
        base = base * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if rope_type == "yarn":
        return _yarn(config, scaling, inv_freq, factor)
    if rope_type == "llama3":
        return _llama3(scaling, inv_freq, factor), 1.0
    raise ValueError(f"unknown rope type {rope_type}")


def _yarn(
    config: ModelConfig, scaling: dict[str, Any], inv_freq: torch.Tensor, factor: float
) -> tuple[torch.Tensor, float]:
    dim = config.head_dim
    base = config.rope_theta
    original = int(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    blended = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return blended, float(attention_factor)


def _llama3(scaling: dict[str, Any], inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos/sin for positions [0, capacity), computed once in float64 for accuracy at long range."""

    def __init__(
        self,
        config: ModelConfig,
        scaling: dict[str, Any] | None,
        context_len: int,
        capacity: int,
        device: torch.device | str = "cpu",
    ) -> None:
        inv_freq, attention_factor = inv_freq_and_attention_factor(config, scaling, context_len)
        self.scaling = scaling
        self.context_len = context_len
        # what determines the rotation of a position: tables with equal signatures agree on
        # every position both hold (capacity aside)
        dynamic = scaling is not None and scaling.get("rope_type") == "dynamic"
        self.signature = (repr(sorted((scaling or {}).items())), context_len if dynamic else None)
        self.capacity = capacity
        self.inv_freq = inv_freq
        angles = torch.arange(capacity, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.cos = (angles.cos() * attention_factor).to(torch.float32).to(device)
        self.sin = (angles.sin() * attention_factor).to(torch.float32).to(device)

    @staticmethod
    def bytes_for(config: ModelConfig, capacity: int) -> int:
        """Peak bytes of building a table: float64 angles and their cosine and scaled copy
        beside the float32 cos and sin it keeps (per position and frequency)."""
        return capacity * (config.head_dim // 2) * (3 * 8 + 2 * 4)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., T, H, D] (T tokens at `positions` [..., T]) in float32; returns x's dtype."""
        cos = self.cos[positions].unsqueeze(-2)  # [..., T, 1, D/2]
        sin = self.sin[positions].unsqueeze(-2)
        xf = x.float()
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def shift(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Re-rotate already rotated keys by `delta` positions (per token), without the YaRN
        magnitude factor: how StreamingLLM caches move keys to new slots."""
        angles = delta.to(torch.float64)[..., None] * self.inv_freq
        cos = angles.cos().to(torch.float32).unsqueeze(-2)
        sin = angles.sin().to(torch.float32).unsqueeze(-2)
        xf = x.float()
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
