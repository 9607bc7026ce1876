"""Write small GGUF files for tests: a llama model from an HF directory, with chosen tensor types."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}  # per 256 weights


def _random_k_quant(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a k-quant type with sane fp16 scales (gguf-py cannot quantize these)."""
    nbytes = BLOCK_BYTES[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.0004).tobytes(), dtype=np.uint8)
    if kind == "Q4_K":  # d, dmin first
        blocks[:, :, 0:2] = scale
        blocks[:, :, 2:4] = scale
    else:  # Q6_K: d last
        blocks[:, :, nbytes - 2 : nbytes] = scale
    return blocks.reshape(rows, cols // 256 * nbytes)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's layout for llama Q/K rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_dir: Path, out: Path, types: dict[str, str], architecture: str = "llama") -> Path:
    """Convert an HF llama directory to GGUF; `types` maps GGUF tensor-name suffixes to types."""
    import gguf
    from gguf.quants import quantize
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    weights = {k: v.float().numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    writer = gguf.GGUFWriter(str(out), architecture)
    a = architecture
    writer.add_uint32(f"{a}.block_count", cfg["num_hidden_layers"])
    writer.add_uint32(f"{a}.context_length", cfg["max_position_embeddings"])
    writer.add_uint32(f"{a}.embedding_length", cfg["hidden_size"])
    writer.add_uint32(f"{a}.feed_forward_length", cfg["intermediate_size"])
    writer.add_uint32(f"{a}.attention.head_count", cfg["num_attention_heads"])
    writer.add_uint32(f"{a}.attention.head_count_kv", cfg["num_key_value_heads"])
    writer.add_float32(f"{a}.rope.freq_base", 10000.0)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    writer.add_uint32(f"{a}.vocab_size", cfg["vocab_size"])
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"<extra_{i}>" for i in range(cfg["vocab_size"] - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    merges = tok["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                   "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                   "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                   "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                   "mlp.down_proj.weight": "ffn_down.weight"}
    for name, w in weights.items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            gname = f"blk.{index}.{layer_names[rest]}"
        else:
            gname = names[name]
        if gname.endswith("attn_q.weight"):
            w = _permute(w, cfg["num_attention_heads"])
        elif gname.endswith("attn_k.weight"):
            w = _permute(w, cfg["num_key_value_heads"])
        kind = next((t for suffix, t in types.items() if gname.endswith(suffix)), "F32") if w.ndim == 2 else "F32"
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        if kind in BLOCK_BYTES:
            data = _random_k_quant(*w.shape, kind, rng)
        elif kind == "F32":
            data = w.astype(np.float32)
        elif kind == "I32":  # a type no model weight uses, and gguf-py cannot dequantize
            data = w.astype(np.int32)
        else:
            data = quantize(w.astype(np.float32), qtype)
        writer.add_tensor(gname, data, raw_shape=data.shape if kind in ("F32", "I32") else None, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def hf_gguf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]
