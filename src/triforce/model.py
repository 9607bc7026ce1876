"""The decoder: a Llama-family transformer running sequences' tokens on the KV caches it is given.

One file, explicit tensors, no framework (in the spirit of gpt-fast). Projections are fused
(q|k|v and gate|up) so that a decoding step issues few large matrix-vector products. A pass
runs one or more segments - each a sequence's new tokens on that sequence's own cache - with
the tokens stacked, so every weight is read once for all of them; a batch of one is the normal
case. Attention is per segment, on the keys its cache lets it see.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from . import native, quant
from .attention import KVSlot, attend_layer
from .config import ModelConfig
from .errors import TriforceError
from .quant import QuantizedTensor, QuantLinear
from .rope import RotaryTable, resolve_scaling

if TYPE_CHECKING:
    from .parallel import Group


class KVCache(Protocol):
    """What the decoder needs from a cache (cache.py has the implementations)."""

    record_queries: bool  # whether saw_queries wants the pass's rotated queries

    def positions(self, num_tokens: int) -> torch.Tensor: ...  # [T] RoPE positions

    def slot(self, layer: int) -> KVSlot: ...

    def saw_queries(self, layer: int, q: torch.Tensor) -> None: ...

    def commit(self, num_tokens: int) -> None: ...

    def visible_rows(self) -> int: ...  # rows a query at the current length reads


@dataclass
class Segment:
    """One sequence's part of a pass: its new tokens [T] (int64), the cache they extend, and how
    many of the last positions need logits (0 for a prefill chunk that only fills the cache).
    With `want_features`, the pass leaves in `features` the final hidden state of every token
    [T, hidden] (after the final norm: what the output layer reads), for a feature-level draft
    head."""

    tokens: torch.Tensor
    cache: KVCache
    scored: int = 0
    want_features: bool = False
    features: torch.Tensor | None = None
    hidden_in: torch.Tensor | None = None  # a draft head's input features [T, hidden] (head.py)


class Linear:
    """A projection y = x W^T (+ b) over dense weights: the native packed-bf16 kernel on CPUs that
    have it (it runs at memory bandwidth where PyTorch's bf16 matrix-vector path does not), else
    F.linear."""

    format = "dense"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.native = None
        self.weight: torch.Tensor | None = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and native.packed_linear_supported():
            self.native = native.PackedLinear(weight, bias)
            self.weight = None  # the packed copy replaces it

    @property
    def nbytes(self) -> int:
        if self.native is not None:
            return self.native.nbytes
        assert self.weight is not None
        return self.weight.numel() * self.weight.element_size()

    def dense(self) -> torch.Tensor:
        """The weight [N, K] in float32 (to derive a quantized copy)."""
        if self.native is None:
            assert self.weight is not None
            return self.weight.float()
        return self.native.unpacked().float()

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.native is not None:
            return self.native(x, out_dtype or torch.bfloat16)
        y = row_exact_linear(x, self.weight, self.bias)
        return y if out_dtype is None else y.to(out_dtype)


ROW_BLOCK = 8  # rows per F.linear call in passes of up to native.MAX_KERNEL_QUERIES rows


def row_exact_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear whose rows do not depend on the rows beside them, in passes of up to
    MAX_KERNEL_QUERIES rows (decoding, verification, batches): BLAS picks its kernel and summation
    order by the row count, so the rows go in zero-padded blocks of ROW_BLOCK, one shape for every
    such pass (a row's bits were then found the same in every position of the block). Longer
    passes (prefill) take one call."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    if M > native.MAX_KERNEL_QUERIES:
        return F.linear(x, weight, bias)
    pad = -M % ROW_BLOCK
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    y = torch.cat([F.linear(x2[i : i + ROW_BLOCK], weight, bias) for i in range(0, M + pad, ROW_BLOCK)])
    return y[:M].view(*shape, -1)


Projection = Linear | QuantLinear
Weight = torch.Tensor | QuantizedTensor


def projection(parts: list[Weight], bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> Projection:
    """y = x [parts stacked along N]^T + bias: read from the parts' quantized blocks where the
    kernel takes them all (bf16 on a CPU with the kernel), else from dense weights in `dtype`
    (quantized parts dequantized here: slower, and exact within itself)."""
    if all(isinstance(p, QuantizedTensor) for p in parts) and quantized_projections_run(parts, dtype, device):
        return QuantLinear(parts, bias)
    dense = [p.dequantize(torch.float32) if isinstance(p, QuantizedTensor) else p for p in parts]
    weight = (dense[0] if len(dense) == 1 else torch.cat(dense)).to(device=device, dtype=dtype).contiguous()
    return Linear(weight, bias)


def quantized_projections_run(parts: list[QuantizedTensor], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the quantized-projection kernel takes these parts for this compute dtype and device."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    lib = native.library()
    return all(quant.kernel_supports(p.format) and lib.tf_quant_format_ok(p.format.code, p.shape[1]) for p in parts)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Projection
    o: Projection
    mlp_norm: torch.Tensor
    gate_up: Projection
    down: Projection

    def projections(self) -> dict[str, Projection]:
        return {"qkv": self.qkv, "o": self.o, "gate_up": self.gate_up, "down": self.down}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and scale in the model dtype, as the reference implementations do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Decoder:
    """A Llama / Mistral / Qwen2 decoder over preallocated caches.

    `weights` maps Hugging Face names to dense tensors or, for projections and the embedding, to
    quantized blocks (QuantizedTensor), which the decoder reads directly where the kernel runs.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, Weight],
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        rope_scaling: dict[str, Any] | None | str = "auto",
        group: Group | None = None,
        vocab_rows: tuple[int, ...] = (),
    ) -> None:
        self.config = config
        # Tensor parallelism (parallel.py): this decoder is one rank's shard; its output and down
        # projections' partial sums are summed over the ranks, its output-head rows gathered.
        self.group = group
        self.vocab_rows = vocab_rows
        self.shard_tag = ""  # which shard, where a cached copy of the weights is named by it
        self.dtype = dtype
        self.device = torch.device(device)
        self.rope_override = rope_scaling
        self._rope: RotaryTable | None = None
        self._rope_owner: Decoder = self  # a quantized copy shares its original's rotary table
        self._rope_lock = threading.Lock()  # replacing the table is check-then-set
        self._copies: dict[str, Decoder] = {}
        # Native glue kernels on CPU (see native.py); the PyTorch path stays for other devices.
        self.fused = self.device.type == "cpu" and native.library() is not None
        # Which kernels this model's passes run on, for the statistics: "avx512", "avx2", "neon" or
        # "pytorch" (also any non-CPU device, where PyTorch's own kernels run).
        self.kernels = native.kernels() if self.fused else "pytorch"

        def dense(name: str) -> torch.Tensor:
            w = weights.pop(name)
            if isinstance(w, QuantizedTensor):
                w = w.dequantize(torch.float32)
            return w.to(device=self.device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return dense(name) if name in weights else None

        def proj(*names: str, bias: torch.Tensor | None = None) -> Projection:
            return projection([weights.pop(n) for n in names], bias, dtype, self.device)

        embed = weights.pop("model.embed_tokens.weight")
        # A draft with a pruned vocabulary (`triforce distill --vocab K`): its output layer covers
        # only the tokens token_map lists; every other token gets logit -inf (probability zero,
        # which speculative sampling handles exactly: such tokens come from the verifier's residual).
        token_map = weights.pop("token_map", None)
        if token_map is not None and group is not None:
            raise TriforceError("a model with a pruned vocabulary (token_map) does not run under tensor parallelism")
        self.token_map = token_map.long().to(self.device) if token_map is not None else None
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            biases = [maybe(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            bqkv = None
            if any(b is not None for b in biases):
                sizes = (config.num_heads * config.head_dim, *(2 * [config.num_kv_heads * config.head_dim]))
                zeros = [torch.zeros(n, dtype=dtype, device=self.device) for n in sizes]
                bqkv = torch.cat([b if b is not None else z for b, z in zip(biases, zeros)])
            self.layers.append(
                LayerWeights(
                    attn_norm=dense(p + "input_layernorm.weight"),
                    qkv=proj(*(p + f"self_attn.{n}_proj.weight" for n in "qkv"), bias=bqkv),
                    o=proj(p + "self_attn.o_proj.weight"),
                    mlp_norm=dense(p + "post_attention_layernorm.weight"),
                    gate_up=proj(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    down=proj(p + "mlp.down_proj.weight"),
                )
            )
        self.norm = dense("model.norm.weight")
        tied = "lm_head.weight" not in weights or config.tie_word_embeddings
        self.lm_head = projection([embed if tied else weights.pop("lm_head.weight")], None, dtype, self.device)
        # The embedding: rows looked up from the tied output head's blocks where it reads them,
        # else a dense table.
        self.embed_rows: QuantLinear | None = None
        self.embed: torch.Tensor | None = None
        if tied and isinstance(self.lm_head, QuantLinear):
            self.embed_rows = self.lm_head
        elif isinstance(embed, QuantizedTensor) and quantized_projections_run([embed], dtype, self.device):
            self.embed_rows = QuantLinear([embed])
        else:
            self.embed = embed.dequantize(torch.float32) if isinstance(embed, QuantizedTensor) else embed
            self.embed = self.embed.to(device=self.device, dtype=dtype).contiguous()
        self.weight_bytes = self._weight_bytes()

    # -- sizes -------------------------------------------------------------------------------
    def _weight_bytes(self) -> int:
        """Bytes of weights a decoding step reads (embedding rows aside)."""
        total = self.norm.numel() * self.norm.element_size() + self.lm_head.nbytes
        for layer in self.layers:
            total += sum(x.nbytes for x in layer.projections().values())
            total += 2 * layer.attn_norm.numel() * layer.attn_norm.element_size()
        return total

    @property
    def weight_formats(self) -> dict[str, int]:
        """Bytes of projection weights per storage format ("dense", "q4_1", ...)."""
        out: dict[str, int] = {}
        for lin in [self.lm_head] + [p for layer in self.layers for p in layer.projections().values()]:
            for fmt, nbytes in _formats(lin).items():
                out[fmt] = out.get(fmt, 0) + nbytes
        return out

    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8)

    # -- quantized copies --------------------------------------------------------------------
    def dense_projections(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every projection's weight [N, K] in float32, by name ("layers.3.qkv", "lm_head"), one
        at a time (all of them at once would be four bytes per parameter)."""
        for i, layer in enumerate(self.layers):
            for name, lin in layer.projections().items():
                yield f"layers.{i}.{name}", lin.dense()
        yield "lm_head", self.lm_head.dense()

    def with_projections(self, parts: dict[str, QuantizedTensor]) -> Decoder:
        """A copy of this decoder whose projections read `parts` (named as `dense_projections`
        names them); norms, embedding, biases and the rotary table are this decoder's."""
        copy = object.__new__(Decoder)
        copy.__dict__.update(self.__dict__)
        copy._copies = {}
        copy._rope_owner = self._rope_owner

        def rebuilt(name: str, old: Projection) -> Projection:
            bias = old.bias if getattr(old, "bias", None) is not None else None
            return projection([parts[name]], bias, self.dtype, self.device)

        copy.layers = [
            LayerWeights(layer.attn_norm, rebuilt(f"layers.{i}.qkv", layer.qkv), rebuilt(f"layers.{i}.o", layer.o),
                         layer.mlp_norm, rebuilt(f"layers.{i}.gate_up", layer.gate_up),
                         rebuilt(f"layers.{i}.down", layer.down))
            for i, layer in enumerate(self.layers)
        ]
        copy.lm_head = rebuilt("lm_head", self.lm_head)
        copy.weight_bytes = copy._weight_bytes()
        return copy

    # -- rotary table ------------------------------------------------------------------------
    @property
    def rope(self) -> RotaryTable | None:
        return self._rope_owner._rope

    def prepare(self, context_len: int, capacity: int | None = None) -> None:
        """Fix the rotary frequencies for a run whose sequence reaches `context_len` tokens."""
        if self._rope_owner is not self:
            self._rope_owner.prepare(context_len, capacity)
            return
        with self._rope_lock:  # sequences of a batch (and their copies on other ranks) prepare from their threads
            self._prepare_rope(context_len, capacity)

    def _prepare_rope(self, context_len: int, capacity: int | None) -> None:
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
        self._rope = RotaryTable(self.config, scaling, context_len, capacity, self.device)

    # -- forward -----------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embeddings [T, hidden] of token ids [T]."""
        tokens = tokens.to(self.device)
        if self.embed_rows is not None:
            return self.embed_rows.rows(tokens, self.dtype)
        return F.embedding(tokens, self.embed)

    @torch.inference_mode()
    def forward(self, segments: list[Segment], residuals: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run each segment's tokens after what its cache holds; return, per segment, float32
        logits [scored, V] of its last `scored` positions. residuals: if a list, the residual
        stream [N, hidden] entering each layer is appended (used to fit a draft's basis)."""
        cfg = self.config
        spans = segment_spans(segments, self.rope)
        eps = cfg.rms_norm_eps
        tokens = segments[0].tokens if len(segments) == 1 else torch.cat([seg.tokens for seg in segments])
        h = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            if residuals is not None:
                residuals.append(h)
            h = run_layer(layer, i, h, spans, self.rope, cfg, self.fused, self.group)
        for cache, a, b, _ in spans:
            cache.commit(b - a)
        for seg, (_, a, b, _) in zip(segments, spans):
            if seg.want_features:
                seg.features = rms_norm(h[a:b], self.norm, eps)
        # the hidden states whose logits are wanted, then one output projection for all
        rows = scored_rows(h, segments, spans)
        if rows is None:
            return [torch.empty(0, cfg.vocab_size) for _ in segments]
        logits = self.lm_head(rms_norm(rows, self.norm, eps), out_dtype=torch.float32)
        if self.group is not None:
            logits = self.group.gather_columns(logits, self.vocab_rows)
        if self.token_map is not None:
            full = logits.new_full((logits.shape[0], cfg.vocab_size), float("-inf"))
            full[:, self.token_map] = logits
            logits = full
        return split_scored(logits, segments)


Span = tuple[KVCache, int, int, torch.Tensor]  # a segment's cache, its rows [a, b) of the pass, positions


def segment_spans(segments: list[Segment], rope: RotaryTable | None) -> list[Span]:
    """Where each segment's tokens sit in a pass's stacked rows, and their RoPE positions."""
    spans, start = [], 0
    for seg in segments:
        length = int(seg.tokens.shape[0])
        positions = seg.cache.positions(length)
        if rope is None or int(positions.max()) >= rope.capacity:
            need = int(positions.max()) + 1
            raise ValueError(f"rotary table holds {rope.capacity if rope else 0} positions, need {need}")
        spans.append((seg.cache, start, start + length, positions))
        start += length
    return spans


def scored_rows(h: torch.Tensor, segments: list[Segment], spans: list[Span]) -> torch.Tensor | None:
    """The rows of a pass's stacked hidden states whose logits its segments want (None if none)."""
    picked = [h[b - seg.scored : b] for seg, (_, _, b, _) in zip(segments, spans) if seg.scored]
    if not picked:
        return None
    return picked[0] if len(picked) == 1 else torch.cat(picked)


def split_scored(logits: torch.Tensor, segments: list[Segment]) -> list[torch.Tensor]:
    """Per segment, its `scored` rows of logits computed for all segments' scored rows together."""
    out, at = [], 0
    for seg in segments:
        out.append(logits[at : at + seg.scored])
        at += seg.scored
    return out


def run_layer(layer: LayerWeights, index: int, h: torch.Tensor, spans: list[Span], rope: RotaryTable,
              cfg: ModelConfig, fused: bool, group: Group | None = None) -> torch.Tensor:
    """One decoder layer over the stacked rows h [N, hidden]; each span attends on layer `index` of its
    own cache. Returns the residual stream after the layer. With a tensor-parallel `group`, `layer` is
    this rank's shard and the output projections' float32 partial sums are summed over the ranks."""
    nq, nkv, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    norm = native.rms_norm if fused else rms_norm
    N = h.shape[0]
    x = norm(h, layer.attn_norm, eps)
    qkv = layer.qkv(x).view(N, nq + 2 * nkv, hd)
    layer_spans = [(cache.slot(index), a, b, pos) for cache, a, b, pos in spans]
    attn, queries = attend_layer(qkv, layer_spans, rope, nq, fused)
    for cache, a, b, _ in spans:
        if cache.record_queries:
            cache.saw_queries(index, queries[a:b])
    h = h + _summed(layer.o, attn.reshape(N, nq * hd), group)
    x = norm(h, layer.mlp_norm, eps)
    gate_up = layer.gate_up(x)
    if fused:  # row by row the same at any size, so a batch or a verification rounds as one step
        act = native.silu_mul(gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
    return h + _summed(layer.down, act, group)


def _summed(proj: Projection, x: torch.Tensor, group: Group | None) -> torch.Tensor:
    if group is None:
        return proj(x)
    return group.all_reduce(proj(x, out_dtype=torch.float32)).to(x.dtype)


def _formats(lin: Projection) -> dict[str, int]:
    if not isinstance(lin, QuantLinear):
        return {"dense": lin.nbytes}
    out: dict[str, int] = {}
    for s in lin.segments:
        nbytes = s.n * lin.in_features // s.format.block_size * s.format.block_bytes
        out[s.format.name] = out.get(s.format.name, 0) + nbytes
    return out
