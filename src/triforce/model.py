"""The decoder: a Llama-family transformer reading and writing whatever KV cache it is given.

One file, explicit tensors, no framework (in the spirit of gpt-fast). Projections are fused
(q|k|v and gate|up) so that a decoding step issues few large matrix-vector products; attention
is delegated to the cache, which alone knows which keys a query may see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from . import native
from .attention import AttentionJob
from .cache import attend_qkv_batch
from .config import ModelConfig
from .errors import TriforceError
from .rope import RotaryTable, resolve_scaling


class KVCache(Protocol):
    """What the decoder needs from a cache (see cache.py for the implementations)."""

    def positions(self, num_tokens: int) -> torch.Tensor: ...  # [B, T] RoPE positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def attend_qkv(
        self, layer: int, qkv: torch.Tensor, rope: Any, positions: torch.Tensor, num_heads: int
    ) -> torch.Tensor: ...

    def store_qkv(  # attend_qkv's first half: the cache write, leaving the attention as jobs
        self, layer: int, qkv: torch.Tensor, rope: Any, positions: torch.Tensor, num_heads: int
    ) -> list[AttentionJob]: ...

    def commit(self, num_tokens: int) -> None: ...


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
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        logits_for: str | torch.Tensor = "all",
        residuals: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run `tokens` [B, T] after what `cache` holds; return float32 logits.

        logits_for: "all" ([B, T, V]), "last" ([B, V]) or "none" (prefill chunks that only fill
        the cache). residuals: if a list, the residual stream entering each layer is appended
        (used to fit a draft's basis).
        """
        return self._run(tokens, [(cache, tokens.shape[1], logits_for)], residuals)[0]

    def forward_batch(self, requests: list[tuple[torch.Tensor, KVCache, str | torch.Tensor]]) -> list[torch.Tensor]:
        """Several sequences in one pass, each `(tokens [1, T_i], its cache, logits_for)`: the
        tokens are stacked so every weight is read once for all of them; attention runs per
        sequence against its own cache. Returns each request's logits as `forward` would."""
        tokens = torch.cat([t for t, _, _ in requests], dim=1)
        return self._run(tokens, [(cache, t.shape[1], which) for t, cache, which in requests])

    @torch.inference_mode()
    def _run(
        self,
        tokens: torch.Tensor,
        segments: list[tuple[KVCache, int, str | torch.Tensor]],
        residuals: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        cfg = self.config
        B, N = tokens.shape
        spans, start = [], 0
        for cache, length, _ in segments:
            positions = cache.positions(length)
            if self.rope is None or int(positions.max()) >= self.rope.capacity:
                need = int(positions.max()) + 1
                raise ValueError(f"rotary table holds {self.rope.capacity if self.rope else 0} positions, need {need}")
            spans.append((cache, start, start + length, positions))
            start += length
        nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        flat_positions = torch.cat([pos[0] for *_, pos in spans]) if len(spans) > 1 else None
        h = F.embedding(tokens, self.embed)
        fused = self.fused
        norm = native.rms_norm if fused else rms_norm

        def attend(i: int, qkv: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
            if fused:  # rotary embedding, cache write and attention in two native calls
                return cache.attend_qkv(i, qkv, self.rope, positions, nq)
            qk = self.rope.rotate(qkv[:, :, : nq + nkv], positions)
            return cache.attend(i, qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nkv :])

        for i, layer in enumerate(self.layers):
            if residuals is not None:
                residuals.append(h)
            x = norm(h, layer.attn_norm, eps)
            qkv = layer.qkv(x).view(B, N, nq + 2 * nkv, hd)
            if len(spans) == 1:
                attn = attend(i, qkv, spans[0][0], spans[0][3])
            elif fused:  # the whole batch's rotation, cache writes and attention in one call
                attn = attend_qkv_batch(i, qkv, self.rope, spans, flat_positions, nq)
            else:
                attn = torch.cat([attend(i, qkv[:, a:b], cache, pos) for cache, a, b, pos in spans], dim=1)
            h = h + layer.o(attn.reshape(B, N, nq * hd))
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
        picked, shapes = [], []
        for (_, a, b, _), (_, _, which) in zip(spans, segments):
            part = h[:, a:b]
            if isinstance(which, str):
                if which == "none":
                    shapes.append(None)
                    continue
                if which == "last":
                    part = part[:, -1]
            else:
                part = part[:, which]
            shapes.append(part.shape[:-1])
            picked.append(part.reshape(-1, part.shape[-1]))
        if not picked:
            return [torch.empty(0) for _ in segments]
        rows = picked[0] if len(picked) == 1 else torch.cat(picked)
        logits = self.lm_head(rms_norm(rows, self.norm, eps), out_dtype=torch.float32)
        out, at = [], 0
        for shape in shapes:
            if shape is None:
                out.append(torch.empty(0))
                continue
            n = shape.numel()
            out.append(logits[at : at + n].view(*shape, -1))
            at += n
        return out

    __call__ = forward
