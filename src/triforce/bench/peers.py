"""Other engines on the same prompts, in the same process: `triforce bench decode --peers`.

    hf               transformers `generate`, full cache, same weights and dtype (greedy, or
                     sampling with the same temperature and top-p)
    hf-assisted      transformers assisted generation with the same draft model directory
                     (`assistant_model=`; transformers' own draft-length schedule); needs a draft
                     model path in --drafts
    hf-lookup        transformers prompt lookup (`prompt_lookup_num_tokens=` our gamma)
    llamacpp         llama.cpp through llama-cpp-python, on the GGUF file itself
    llamacpp-lookup  the same with llama-cpp-python's prompt lookup (`LlamaPromptLookupDecoding`)

llama.cpp runs the GGUF's own quantised weights (4-bit for the embedded model: fewer bytes per
token than our bf16, and other numerics, so its greedy tokens rarely equal ours). Install it with
`pip install llama-cpp-python` (it builds llama.cpp from source: several minutes). Its CPU weight
repacking is turned off here (its AMX path crashes on some CPUs, as `--no-repack` does on the
llama.cpp command line).

Timing follows ours: a run's decode time goes from its first new token to its last, divided by
the number of new tokens; the prompt's prefill is timed apart. EOS is suppressed until the
requested length (transformers `min_new_tokens`). RoPE scaling follows ours (YaRN sized to the
context past the trained length), so greedy outputs are comparable. A peer whose package is not
installed, or that needs something this run lacks, is skipped with a one-line note.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import TriforceError
from ..loading import resolve_model

PEERS = ("hf", "hf-assisted", "hf-lookup", "llamacpp", "llamacpp-lookup")
ENGINE = {"hf": "transformers", "llamacpp": "llama.cpp"}
INSTALL = {"transformers": "pip install transformers",
           "llama_cpp": "pip install -e '.[llamacpp]' (llama-cpp-python, builds from source, about 10 minutes)"}


@dataclass
class PeerRun:
    tokens: list[int]
    prefill_s: float
    ms_per_token: float


class Peer(Protocol):
    def generate(self, ids: list[int], new_tokens: int, temperature: float, top_p: float, seed: int,
                 scaling: dict[str, Any] | None) -> PeerRun: ...


def _package(name: str) -> str:
    return "llama_cpp" if name.startswith("llamacpp") else "transformers"


def engine_of(name: str) -> str:
    return ENGINE[name.split("-")[0]]


def parse(names: list[str]) -> list[str]:
    """--peers: "auto" means every peer (those not installed, or not fitting the run, are then
    skipped: see start()), "none" none at all."""
    if names in (["none"], []):
        return []
    if names == ["auto"]:
        return list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise TriforceError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}, auto or none")
    return list(dict.fromkeys(names))


class _FirstTokenClock:
    """A transformers streamer that notes when the first new tokens arrive (the first put() is
    the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_model(source: Path, dtype: torch.dtype, scaling: dict[str, Any] | None = None) -> Any:
    """transformers' own load of a model directory or GGUF file, with our RoPE scaling."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    where = dict(pretrained_model_name_or_path=str(source)) if source.is_dir() else dict(
        pretrained_model_name_or_path=str(source.parent), gguf_file=source.name)
    config = AutoConfig.from_pretrained(**where)
    if scaling is not None:
        if hasattr(config, "rope_parameters"):  # transformers >= 5
            config.rope_parameters = {**(config.rope_parameters or {}), **scaling}
        else:
            config.rope_scaling = dict(scaling)
    return AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=dtype).eval()


class HFPeer:
    """transformers generate: plain, assisted by a draft model, or with prompt lookup."""

    def __init__(self, source: Path, dtype: torch.dtype, models: dict[str, Any], assistant: Path | None = None,
                 lookup: int | None = None) -> None:
        self.source, self.dtype, self.models = source, dtype, models  # models: shared by the hf peers
        self.assistant_path, self.lookup = assistant, lookup
        self.assistant: Any = None

    def _model(self, scaling: dict[str, Any] | None) -> Any:
        key = json.dumps(scaling, sort_keys=True)
        if key not in self.models:
            self.models.clear()  # one target in memory at a time
            self.models[key] = hf_model(self.source, self.dtype, scaling)
        return self.models[key]

    def generate(self, ids: list[int], new_tokens: int, temperature: float, top_p: float, seed: int,
                 scaling: dict[str, Any] | None) -> PeerRun:
        model = self._model(scaling)
        eos = model.generation_config.eos_token_id
        clock = _FirstTokenClock()
        kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock,
                                      do_sample=temperature > 0, pad_token_id=eos[0] if isinstance(eos, list) else eos)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        if self.assistant_path is not None:
            if self.assistant is None:
                self.assistant = hf_model(self.assistant_path, self.dtype)
            kwargs["assistant_model"] = self.assistant
        if self.lookup:
            kwargs["prompt_lookup_num_tokens"] = self.lookup
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), **kwargs)
        end = time.perf_counter()
        tokens = out[0, len(ids):].tolist()[:new_tokens]
        first = clock.first or end
        return PeerRun(tokens, first - start, 1000 * (end - first) / max(1, len(tokens)))


class LlamaCppPeer:
    """llama.cpp via llama-cpp-python's token generator (prompt prefix reused across runs)."""

    def __init__(self, gguf: Path, lookup: int | None = None) -> None:
        self.gguf, self.lookup = gguf, lookup
        self.llm: Any = None
        self.key: Any = None

    def _llm(self, n_ctx: int, scaling: dict[str, Any] | None) -> Any:
        key = (n_ctx, json.dumps(scaling, sort_keys=True))
        if self.key == key:
            return self.llm
        import llama_cpp
        from llama_cpp import llama_cpp as api

        kwargs: dict[str, Any] = dict(n_ctx=n_ctx, n_threads=torch.get_num_threads(),
                                      n_threads_batch=torch.get_num_threads(), verbose=False)
        if self.lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=self.lookup)
            # llama-cpp-python keeps logits of every position when drafting but sizes that array
            # from this flag: without it a prompt past n_batch (512) tokens fails (0.3.36).
            kwargs["logits_all"] = True
        if scaling is not None and scaling.get("rope_type") == "yarn":
            kwargs.update(rope_scaling_type=api.LLAMA_ROPE_SCALING_TYPE_YARN,
                          rope_freq_scale=1.0 / float(scaling["factor"]),
                          yarn_orig_ctx=int(scaling.get("original_max_position_embeddings") or 0))
        default_params = api.llama_model_default_params

        def no_repack() -> Any:
            params = default_params()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = False
            return params

        self.llm = None
        api.llama_model_default_params = no_repack
        try:
            self.llm = llama_cpp.Llama(str(self.gguf), **kwargs)
        finally:
            api.llama_model_default_params = default_params
        self.key = key
        return self.llm

    def generate(self, ids: list[int], new_tokens: int, temperature: float, top_p: float, seed: int,
                 scaling: dict[str, Any] | None) -> PeerRun:
        llm = self._llm(len(ids) + new_tokens + 64, scaling)
        llm.set_seed(seed)
        tokens: list[int] = []
        start = time.perf_counter()
        first = None
        for token in llm.generate(ids, temp=temperature, top_p=top_p if temperature > 0 else 1.0, top_k=0,
                                  min_p=0.0, repeat_penalty=1.0):
            first = first or time.perf_counter()
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        end = time.perf_counter()
        first = first or end
        return PeerRun(tokens, first - start, 1000 * (end - first) / max(1, len(tokens)))


def start(names: list[str], model: str | None, dtype: torch.dtype, draft_dir: str | None, gamma: int,
          log: Any = print, auto: bool = False) -> tuple[dict[str, Peer], list[str]]:
    """The peers that can run here, and a note for each one that cannot (with `auto`, only for
    missing packages: peers that do not fit this run are left out silently)."""
    source, _ = resolve_model(model)
    gguf = source if source.is_file() and source.suffix.lower() == ".gguf" else None
    peers: dict[str, Peer] = {}
    notes: list[str] = []
    shared: dict[str, Any] = {}
    for name in names:
        package = _package(name)
        if importlib.util.find_spec(package) is None:
            notes.append(f"peer {name} skipped: {package} is not installed; {INSTALL[package]}")
        elif name == "hf-assisted" and draft_dir is None:
            notes.append("peer hf-assisted skipped: it needs a draft model directory in --drafts")
        elif package == "llama_cpp" and gguf is None:
            notes.append(f"peer {name} skipped: llama.cpp needs a GGUF model, not {source}")
        elif package == "llama_cpp":
            peers[name] = LlamaCppPeer(gguf, lookup=gamma if name.endswith("lookup") else None)
        else:
            assistant = Path(draft_dir) if name == "hf-assisted" and draft_dir else None
            peers[name] = HFPeer(source, dtype, shared, assistant, lookup=gamma if name == "hf-lookup" else None)
    if auto:
        notes = [n for n in notes if "is not installed" in n]
    for note in notes:
        log(note)
    return peers, notes
