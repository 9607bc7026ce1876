"""A feature-level draft head (EAGLE-style): one decoder layer that predicts the target's next final
hidden state from its current one and the next token's embedding, and drafts over a pruned vocabulary.

Row j of the head reads (f[j-1], e[x[j]]): the target's final hidden state at the previous token (after its
final norm: what its output layer reads) and the embedding of token j, fused by one projection; one decoder
layer of the target's shape, on the head's own StreamingLLM cache, turns it into a prediction of f[j], and the
target's own output rows for the head's K tokens (`token_map`) give its distribution of token j+1. Every other
token has probability zero under the head, which speculative sampling handles exactly: such tokens come only
from the verifier's residual. When drafting several tokens the head feeds its predicted features back.

A head is stored as a directory: `head.safetensors` (fc.weight [H, 2H], the layer's weights under
Hugging Face names with the `layer.` prefix, token_map [K]) and `head.json` (what target it was trained for).
Embedding and output rows are the target's, read from the loaded target, never stored twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import TriforceError
from .model import Decoder, LayerWeights, Segment, projection, run_layer, scored_rows, segment_spans, split_scored
from .rope import RotaryTable

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
FORMAT = "triforce-feature-head-1"
LAYER_NAMES = {
    "attn_norm": "layer.input_layernorm.weight",
    "q": "layer.self_attn.q_proj.weight",
    "k": "layer.self_attn.k_proj.weight",
    "v": "layer.self_attn.v_proj.weight",
    "o": "layer.self_attn.o_proj.weight",
    "mlp_norm": "layer.post_attention_layernorm.weight",
    "gate": "layer.mlp.gate_proj.weight",
    "up": "layer.mlp.up_proj.weight",
    "down": "layer.mlp.down_proj.weight",
}


def target_signature(config: ModelConfig) -> dict[str, Any]:
    """What a head must agree on with its target: widths, attention shape and vocabulary."""
    return {"hidden_size": config.hidden_size, "vocab_size": config.vocab_size, "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
            "intermediate_size": config.intermediate_size}


def is_head_directory(path: str | Path) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


def expected_shapes(config: ModelConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    h, hd = config.hidden_size, config.head_dim
    return {
        "fc.weight": (h, 2 * h),
        LAYER_NAMES["attn_norm"]: (h,),
        LAYER_NAMES["q"]: (config.num_heads * hd, h),
        LAYER_NAMES["k"]: (config.num_kv_heads * hd, h),
        LAYER_NAMES["v"]: (config.num_kv_heads * hd, h),
        LAYER_NAMES["o"]: (h, config.num_heads * hd),
        LAYER_NAMES["mlp_norm"]: (h,),
        LAYER_NAMES["gate"]: (config.intermediate_size, h),
        LAYER_NAMES["up"]: (config.intermediate_size, h),
        LAYER_NAMES["down"]: (h, config.intermediate_size),
        "token_map": (vocab,),
    }


class FeatureHead:
    """The head over a loaded target decoder (whose embedding and output rows it reads)."""

    def __init__(self, target: Decoder, weights: dict[str, torch.Tensor], where: str = "the head") -> None:
        cfg = target.config
        token_map = weights.get("token_map")
        if token_map is None or token_map.dim() != 1:
            raise TriforceError(f"{where}: no token_map")
        for name, shape in expected_shapes(cfg, token_map.shape[0]).items():
            if name not in weights:
                raise TriforceError(f"{where}: missing {name}")
            if tuple(weights[name].shape) != shape:
                raise TriforceError(
                    f"{where} was made for another target: {name} is {tuple(weights[name].shape)}, this target "
                    f"needs {shape}")
        token_map = token_map.long()
        if len(token_map) and (int(token_map.min()) < 0 or int(token_map.max()) >= cfg.vocab_size
                               or len(token_map.unique()) != len(token_map)):
            raise TriforceError(f"{where}: token_map must list distinct token ids below {cfg.vocab_size}")
        self.target = target
        self.config = dataclasses.replace(cfg, num_layers=1)  # the shape of its cache
        self.dtype, self.device = target.dtype, target.device
        self.fused = target.fused
        dt, dev = self.dtype, self.device

        def dense(name: str) -> torch.Tensor:
            return weights[name].to(device=dev, dtype=dt).contiguous()

        n = LAYER_NAMES
        self.fc = projection([weights["fc.weight"]], None, dt, dev)
        self.layer = LayerWeights(
            attn_norm=dense(n["attn_norm"]),
            qkv=projection([weights[n["q"]], weights[n["k"]], weights[n["v"]]], None, dt, dev),
            o=projection([weights[n["o"]]], None, dt, dev),
            mlp_norm=dense(n["mlp_norm"]),
            gate_up=projection([weights[n["gate"]], weights[n["up"]]], None, dt, dev),
            down=projection([weights[n["down"]]], None, dt, dev),
        )
        self.token_map = token_map.to(dev)
        rows = target.lm_head.dense()[token_map]  # the target's own output rows for the head's tokens
        self.lm_head = projection([rows], None, dt, dev)
        self.vocab_size = cfg.vocab_size
        self.rope: RotaryTable | None = None
        self.source = where
        layer_bytes = sum(p.nbytes for p in self.layer.projections().values())
        self.weight_bytes = self.fc.nbytes + self.lm_head.nbytes + layer_bytes

    @property
    def pruned_vocab(self) -> int:
        return int(self.token_map.shape[0])

    def prepare(self, capacity: int) -> None:
        """A rotary table for a cache of `capacity` slots (the head's positions are its cache slots)."""
        if self.rope is None or self.rope.capacity < capacity:
            self.rope = RotaryTable(self.config, None, capacity, capacity, self.device)

    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8)

    @torch.inference_mode()
    def forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Like Decoder.forward, each segment carrying `hidden_in` [T, H] (f[j-1] for each of its tokens): float32
        logits [scored, V] of the last `scored` rows (-inf outside the token map); with `want_features`, the
        predicted final hidden states [T, H] are left in the segment's `features`."""
        spans = segment_spans(segments, self.rope)
        tokens = segments[0].tokens if len(segments) == 1 else torch.cat([seg.tokens for seg in segments])
        inputs = [seg.hidden_in for seg in segments]
        if any(x is None or x.shape != (len(seg.tokens), self.config.hidden_size) for x, seg in zip(inputs, segments)):
            raise ValueError("each segment of a head's pass carries hidden_in [T, hidden]")
        feats = torch.cat(inputs).to(self.dtype) if len(inputs) > 1 else inputs[0].to(self.dtype)
        h = self.fc(torch.cat([feats, self.target.embed_tokens(tokens)], dim=-1))
        h = run_layer(self.layer, 0, h, spans, self.rope, self.config, self.fused)
        for cache, a, b, _ in spans:
            cache.commit(b - a)
        for seg, (_, a, b, _) in zip(segments, spans):
            if seg.want_features:
                seg.features = h[a:b]
        rows = scored_rows(h, segments, spans)
        if rows is None:
            return [torch.empty(0, self.vocab_size) for _ in segments]
        small = self.lm_head(rows, out_dtype=torch.float32)
        logits = torch.full((small.shape[0], self.vocab_size), float("-inf"), device=small.device)
        logits[:, self.token_map] = small
        return split_scored(logits, segments)


def load_head(path: str | Path, target: Any) -> FeatureHead:
    """A head directory for `target` (a loaded model, or its decoder), checked against it: a head made for
    another target is refused."""
    from safetensors.torch import load_file

    target = getattr(target, "decoder", target)

    directory = Path(path)
    where = f"draft head {directory}"
    try:
        meta = json.loads((directory / HEAD_CONFIG).read_text())
        weights = load_file(str(directory / HEAD_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise TriforceError(f"{where}: cannot read it ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise TriforceError(f"{where}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    wanted = target_signature(target.config)
    made_for = meta.get("target", {})
    differs = [k for k, v in wanted.items() if made_for.get(k) != v]
    if differs:
        detail = ", ".join(f"{k} {made_for.get(k)} vs {wanted[k]}" for k in differs)
        raise TriforceError(f"{where} was made for another target ({detail})")
    head = FeatureHead(target, weights, where)
    head.source = str(directory)
    return head


def save_head(directory: str | Path, config: ModelConfig, weights: dict[str, torch.Tensor],
              extra: dict[str, Any] | None = None) -> None:
    """Write a head directory for a target of `config` (weights as FeatureHead takes them)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / HEAD_WEIGHTS))
    meta = {"format": FORMAT, "target": target_signature(config), "vocab": int(weights["token_map"].shape[0]),
            **(extra or {})}
    (out / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def random_head(config: ModelConfig, token_map: torch.Tensor, seed: int = 0,
                scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random head weights for a target of `config` (tests; the start of training)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(config, len(token_map)).items():
        if name == "token_map":
            out[name] = token_map.long()
        elif len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            out[name] = torch.randn(shape, generator=g) * scale
    return out
