"""An engine's settings as one validated value: the method (a chain of levels), its draft, its knobs."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import SettingError
from .formats import FORMATS


@dataclass(frozen=True)
class LevelSpec:
    """A level below the top of a chain: which model runs it, on which kind of cache.

    model: "draft" (the draft model, or prompt lookup when the draft is "ngram") or "target".
    cache: "full" (its own full cache), "streaming" (StreamingLLM: the draft's own small cache,
    or a view of the target's full cache), or "retrieval" (a view of the target's full cache).
    """

    model: str
    cache: str


# Each method's levels, bottom to top; the top (the target on its full cache) is implied. The
# level just below the top gathers `gamma` tokens per verification, the one below it
# `draft_gamma`.
METHODS: dict[str, tuple[LevelSpec, ...]] = {
    "autoregressive": (),
    "speculative": (LevelSpec("draft", "full"),),
    "retrieval": (LevelSpec("target", "retrieval"),),
    "streaming": (LevelSpec("target", "streaming"),),
    "triforce": (LevelSpec("draft", "streaming"), LevelSpec("target", "retrieval")),
}

def method_needs_draft(method: str) -> bool:
    """Whether a method has a level that the draft (a model, or prompt lookup) runs."""
    return any(spec.model == "draft" for spec in METHODS[method])


# the values "auto" lets the controller choose from; a top level reading its cache from disk makes
# longer verifications pay
AUTO_GAMMAS = range(1, 9)
AUTO_GAMMAS_OFFLOAD = range(1, 17)
# the most rows a decoding or verification pass of a cache on disk adds (longer passes are prompt chunks)
OFFLOAD_PASS_ROWS = 64
AUTO_DRAFT_GAMMAS = range(1, 5)

# (lowest value, what it is) of each integer knob
_INTEGERS = {
    "budget": (1, "rows a retrieval cache reads"),
    "chunk_size": (1, "rows per retrieval chunk"),
    "sink": (0, "StreamingLLM sink rows"),
    "window": (1, "StreamingLLM window rows"),
    "rebuild_every": (1, "full verifications between retrieval re-selections"),
    "prefill_chunk": (1, "prompt tokens per prefill pass"),
}


@dataclass(frozen=True)
class EngineSettings:
    """How an engine decodes. Every field is checked here, once; `replace` checks again.

    draft: a loaded draft model (`triforce.load(...)`), a feature-level draft head loaded for the
    target (`triforce.load_head(...)`), "ngram" (prompt lookup, no model), or None; the methods
    with a "draft" level need one.
    gamma, draft_gamma: tokens gathered per full verification, and drafted by the bottom per
    middle-level step: a number, or "auto" (adaptive speculation: before each cycle a controller
    picks them, which levels run, and whether to speculate at all, from measured costs and
    acceptance; with a draft model, prompt lookup joins it as an alternative bottom).
    retrieval_weights, draft_weights: the weights the target-on-retrieval-cache level and the
    draft model read: "model" (the model's own) or a block format ("q4_0", ...) to run on a
    quantized copy. Lossless either way: these levels only draft, and the top level verifies
    with the target's own weights.
    kv_offload: a directory for the target's full KV cache beyond `kv_ram_budget` bytes of RAM
    (default: half the memory available when the cache is made); the file is removed when the
    cache is freed unless `kv_offload_keep`. The levels below the top keep their rows in RAM.
    """

    method: str = "autoregressive"
    draft: Any = None
    gamma: int | str = "auto"
    draft_gamma: int | str = "auto"
    budget: int = 4096
    chunk_size: int = 8
    sink: int = 16
    window: int = 256
    rebuild_every: int = 1
    prefill_chunk: int = 1024
    max_context: int | None = None
    retrieval_weights: str = "model"
    draft_weights: str = "model"
    kv_offload: str | None = None
    kv_ram_budget: int | None = None
    kv_offload_keep: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SettingError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, (low, _) in _INTEGERS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SettingError(name, f"must be an integer >= {low}, got {value!r}")
        for name in ("gamma", "draft_gamma"):
            value = getattr(self, name)
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SettingError(name, f"must be 'auto' or an integer >= 1, got {value!r}")
        if self.max_context is not None and (
            not isinstance(self.max_context, int) or isinstance(self.max_context, bool) or self.max_context < 2
        ):
            raise SettingError("max_context", f"must be an integer >= 2, got {self.max_context!r}")
        if isinstance(self.draft, str) and self.draft != "ngram":
            raise SettingError("draft", f"must be a loaded model, a draft head or 'ngram', got {self.draft!r}")
        if self.draft is not None and not isinstance(self.draft, str) and not (
                hasattr(self.draft, "decoder") or hasattr(self.draft, "token_map")):
            kind = type(self.draft).__name__
            raise SettingError("draft", f"must be a loaded model, a draft head or 'ngram', got {kind}")
        for name in ("retrieval_weights", "draft_weights"):
            value = getattr(self, name)
            if value != "model" and value not in FORMATS:
                raise SettingError(name, f"must be 'model' or one of {', '.join(FORMATS)}, got {value!r}")
        if self.kv_offload is not None and (not isinstance(self.kv_offload, str) or not self.kv_offload):
            raise SettingError("kv_offload", f"must be a directory, got {self.kv_offload!r}")
        if self.kv_ram_budget is not None:
            budget = self.kv_ram_budget
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
                raise SettingError("kv_ram_budget", f"must be a number of bytes >= 1, got {self.kv_ram_budget!r}")
            if self.kv_offload is None:
                raise SettingError("kv_ram_budget", "needs an offload directory for the rows beyond it")
        if self.kv_offload is not None and sum(self.gammas) + 1 > OFFLOAD_PASS_ROWS:
            raise SettingError("gamma", f"plus draft_gamma must be below {OFFLOAD_PASS_ROWS} with kv_offload, got "
                                        f"{self.gamma} and {self.draft_gamma}")
        if not isinstance(self.kv_offload_keep, bool):
            raise SettingError("kv_offload_keep", f"must be true or false, got {self.kv_offload_keep!r}")
        if self.needs_draft and self.draft is None:
            raise SettingError("draft", f"is needed by method {self.method}: a draft model or 'ngram'")

    @property
    def levels(self) -> tuple[LevelSpec, ...]:
        return METHODS[self.method]

    @property
    def needs_draft(self) -> bool:
        return method_needs_draft(self.method)

    @property
    def adaptive(self) -> bool:
        """Whether a controller chooses the levels and gammas of each cycle (one of the gammas
        the method uses is "auto")."""
        return "auto" in [self.draft_gamma, self.gamma][-len(self.levels):] if self.levels else False

    @property
    def gamma_choices(self) -> range | tuple[int]:
        if self.gamma != "auto":
            return (int(self.gamma),)
        return AUTO_GAMMAS if self.kv_offload is None else AUTO_GAMMAS_OFFLOAD

    @property
    def draft_gamma_choices(self) -> range | tuple[int]:
        return AUTO_DRAFT_GAMMAS if self.draft_gamma == "auto" else (int(self.draft_gamma),)

    @property
    def gammas(self) -> list[int]:
        """Tokens each level below the top gathers per call, bottom to top (the largest a
        controller may choose, for "auto")."""
        largest = [max(self.draft_gamma_choices), max(self.gamma_choices)]
        return largest[-len(self.levels):] if self.levels else []

    @property
    def rows_past_context(self) -> int:
        """Cache rows a step may write past its context: the top verifies `gamma` drafts, or,
        below a middle level, up to `gamma + draft_gamma` (the middle level's last verification
        may overshoot `gamma` by `draft_gamma`)."""
        return sum(self.gammas)

    def replace(self, **changes: Any) -> EngineSettings:
        """A copy with `changes`, checked like the original; unknown names are refused."""
        known = {f.name for f in fields(self)}
        for name in changes:
            if name not in known:
                raise SettingError(name, f"is not a setting; settings are {', '.join(sorted(known))}")
        return replace(self, **changes)

    @property
    def draft_name(self) -> str | None:
        """What the draft is, for reports: "ngram", the model's (or head's) source, or None."""
        if self.draft is None or isinstance(self.draft, str):
            return self.draft
        return self.draft.source
