"""The decoder: a Llama-family transformer running sequences' tokens on the KV caches it is given.

One file, explicit tensors, no framework (in the spirit of gpt-fast). Projections are fused
(q|k|v and gate|up) so that a decoding step issues few large matrix-vector products. A pass
runs one or more segments - each a sequence's new tokens on that sequence's own cache - with
the tokens stacked, so every weight is read once for all of them; a batch of one is the normal
case. Attention is per segment, on the keys its cache lets it see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from . import native
from .attention import KVSlot, attend_layer
from .config import ModelConfig
from .errors import TriforceError
from .rope import RotaryTable, resolve_scaling


class KVCache(Protocol):
    """What the decoder needs from a cache (cache.py has the implementations)."""

    record_queries: bool  # whether saw_queries wants the pass's rotated queries

    def positions(self, num_tokens: int) -> torch.Tensor: ...  # [T] RoPE positions

    def slot(self, layer: int) -> KVSlot: ...

    def saw_queries(self, layer: int, q: torch.Tensor) -> None: ...

    def commit(self, num_tokens: int) -> None: ...


@dataclass
class Segment:
    """One sequence's part of a pass: its new tokens [T] (int64), the cache they extend, and how
    many of the last positions need logits (0 for a prefill chunk that only fills the cache)."""

    tokens: torch.Tensor
    cache: KVCache
    scored: int = 0


class Linear:
    """A projection y = x W^T (+ b): the native packed-bf16 kernel on CPUs that have it (it runs
    at memory bandwidth where PyTorch's bf16 matrix-vector path does not), else F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.native = None
        self.weight: torch.Tensor | None = weight
        self.bias = bias
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and native.packed_linear_supported():
            self.native = native.PackedLinear(weight, bias)
            self.weight = None  # the packed copy replaces it

    @property
    def nbytes(self) -> int:
        if self.native is not None:
            return self.native.nbytes
        assert self.weight is not None
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.native is not None:
            return self.native(x, out_dtype or torch.bfloat16)
        y = F.linear(x, self.weight, self.bias)
        return y if out_dtype is None else y.to(out_dtype)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and scale in the model dtype, as the reference implementations do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Decoder:
    """A Llama / Mistral / Qwen2 decoder over preallocated caches."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        rope_scaling: dict[str, Any] | None | str = "auto",
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.rope_override = rope_scaling
        self.rope: RotaryTable | None = None
        # Native glue kernels on CPU (see native.py); the PyTorch path stays for other devices.
        self.fused = self.device.type == "cpu" and native.library() is not None

        def take(name: str) -> torch.Tensor:
            return weights.pop(name).to(device=self.device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            q, k, v = take(p + "self_attn.q_proj.weight"), take(p + "self_attn.k_proj.weight"), take(
                p + "self_attn.v_proj.weight"
            )
            biases = [maybe(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            bqkv = None
            if any(b is not None for b in biases):
                sizes = (q.shape[0], k.shape[0], v.shape[0])
                zeros = [torch.zeros(n, dtype=dtype, device=self.device) for n in sizes]
                bqkv = torch.cat([b if b is not None else z for b, z in zip(biases, zeros)])
            gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
            self.layers.append(
                LayerWeights(
                    attn_norm=take(p + "input_layernorm.weight"),
                    qkv=Linear(torch.cat([q, k, v]).contiguous(), bqkv),
                    o=Linear(take(p + "self_attn.o_proj.weight")),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=Linear(torch.cat([gate, up]).contiguous()),
                    down=Linear(take(p + "mlp.down_proj.weight")),
                )
            )
        self.norm = take("model.norm.weight")
        lm_head = maybe("lm_head.weight")
        tied = lm_head is None or config.tie_word_embeddings
        self.lm_head = Linear(self.embed if tied else lm_head)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a decoding step reads (embedding rows aside)."""
        total = self.norm.numel() * self.norm.element_size() + self.lm_head.nbytes
        for layer in self.layers:
            total += sum(x.nbytes for x in (layer.qkv, layer.o, layer.gate_up, layer.down))
            total += 2 * layer.attn_norm.numel() * layer.attn_norm.element_size()
        return total

    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8)

    # -- rotary table ------------------------------------------------------------------------
    def prepare(self, context_len: int, capacity: int | None = None) -> None:
        """Fix the rotary frequencies for a run whose sequence reaches `context_len` tokens."""
        window = self.config.extra.get("sliding_window")
        if window and context_len > window:
            raise TriforceError(
                f"this model uses sliding-window attention over {window} tokens; contexts longer than that "
                f"({context_len} requested) are not supported"
            )
        scaling = resolve_scaling(self.config, self.rope_override, context_len)
        capacity = max(capacity or context_len, context_len)
        rope = self.rope
        if rope is not None and rope.scaling == scaling and rope.capacity >= capacity:
            if scaling is None or scaling.get("rope_type") != "dynamic" or rope.context_len == context_len:
                return
        self.rope = RotaryTable(self.config, scaling, context_len, capacity, self.device)

    # -- forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, segments: list[Segment], residuals: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run each segment's tokens after what its cache holds; return, per segment, float32
        logits [scored, V] of its last `scored` positions. residuals: if a list, the residual
        stream [N, hidden] entering each layer is appended (used to fit a draft's basis)."""
        cfg = self.config
        spans, start = [], 0
        for seg in segments:
            length = int(seg.tokens.shape[0])
            positions = seg.cache.positions(length)
            if self.rope is None or int(positions.max()) >= self.rope.capacity:
                need = int(positions.max()) + 1
                raise ValueError(f"rotary table holds {self.rope.capacity if self.rope else 0} positions, need {need}")
            spans.append((seg.cache, start, start + length, positions))
            start += length
        nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        tokens = segments[0].tokens if len(segments) == 1 else torch.cat([seg.tokens for seg in segments])
        h = F.embedding(tokens.to(self.device), self.embed)
        N = h.shape[0]
        fused = self.fused
        norm = native.rms_norm if fused else rms_norm
        for i, layer in enumerate(self.layers):
            if residuals is not None:
                residuals.append(h)
            x = norm(h, layer.attn_norm, eps)
            qkv = layer.qkv(x).view(N, nq + 2 * nkv, hd)
            layer_spans = [(cache.slot(i), a, b, pos) for cache, a, b, pos in spans]
            attn, queries = attend_layer(qkv, layer_spans, self.rope, nq, fused)
            for cache, a, b, _ in spans:
                if cache.record_queries:
                    cache.saw_queries(i, queries[a:b])
            h = h + layer.o(attn.reshape(N, nq * hd))
            x = norm(h, layer.mlp_norm, eps)
            gate_up = layer.gate_up(x)
            if fused:  # row by row the same at any size, so a batch or a verification rounds as one step
                act = native.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = F.silu(gate) * up
            h = h + layer.down(act)
        for cache, a, b, _ in spans:
            cache.commit(b - a)
        # the hidden states whose logits are wanted, then one output projection for all
        picked = [h[b - seg.scored : b] for seg, (_, _, b, _) in zip(segments, spans) if seg.scored]
        if not picked:
            return [torch.empty(0, cfg.vocab_size) for _ in segments]
        rows = picked[0] if len(picked) == 1 else torch.cat(picked)
        logits = self.lm_head(rms_norm(rows, self.norm, eps), out_dtype=torch.float32)
        out, at = [], 0
        for seg in segments:
            out.append(logits[at : at + seg.scored])
            at += seg.scored
        return out
