"""OpenAI requests in the engine's terms, and the engine's results as OpenAI responses.

Unsupported parameters are refused with HTTP 400 and an OpenAI-style error body, never ignored;
a `triforce` object in a request sets the method and knobs for that request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import SettingError, TriforceError
from ..metrics import COUNTERS, drafting_levels
from ..settings import EngineSettings

# Parameters OpenAI clients send that we do not implement: refused when set to anything but their
# neutral value (so default-filled client requests still work).
NEUTRAL = {
    "n": 1, "logprobs": False, "top_logprobs": None, "logit_bias": None, "presence_penalty": 0,
    "frequency_penalty": 0, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
    "parallel_tool_calls": None, "echo": False, "best_of": 1, "suffix": None, "response_format": None,
    "service_tier": None, "store": False, "metadata": None, "modalities": None, "audio": None,
    "prediction": None, "reasoning_effort": None, "web_search_options": None,
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "user",
          "triforce"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_KEYS = COMMON | {"prompt"}
# the engine settings a request may set, in its `triforce` object
EXTENSION_KEYS = {"method", "budget", "gamma", "draft_gamma", "chunk_size", "sink", "window", "rebuild_every"}
# request fields named differently from the engine's settings
FIELDS = {"max_new_tokens": "max_tokens"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def from_engine_error(exc: TriforceError) -> RequestError:
    """An engine error in the request's words: a setting is named by its request field."""
    if not isinstance(exc, SettingError):
        return RequestError(400, str(exc))
    field = FIELDS.get(exc.setting, exc.setting)
    return RequestError(400, f"'{field}' {exc.problem}", field)


@dataclass
class Request:
    """What a request asks of the engine."""

    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]  # temperature, top_p, top_k, seed
    stop: list[str]
    settings: EngineSettings
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"'{key}' must be a number", key)
    if not low <= value <= high:
        raise RequestError(400, f"'{key}' must be between {low} and {high}, got {value}", key)
    return float(value)


def _integer(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{key}' must be an integer", key)
    if value < low or (high is not None and value > high):
        raise RequestError(400, f"'{key}' must be an integer >= {low}" + (f" and <= {high}" if high else ""), key)
    return value


def _messages(body: dict, tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise RequestError(400, "each message needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(400, "only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, "message content must be a string or text parts", "messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    try:
        return tokenizer.encode_chat(clean)
    except TriforceError as exc:
        raise RequestError(400, str(exc), "messages") from None


def _prompt(body: dict, tokenizer: Any, vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError(400, "'prompt' is empty", "prompt")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise RequestError(400, "'prompt' has a token id outside the vocabulary", "prompt")
        return list(prompt)
    raise RequestError(400, "'prompt' must be a string, or a list of token ids (one prompt per request)", "prompt")


def parse_request(body: Any, kind: str, served: Any) -> Request:
    """A request body as the engine's terms; `served` is the Server (its target, model_id,
    max_context and default settings)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    allowed = CHAT_KEYS if kind == "chat" else COMPLETION_KEYS
    for key, value in body.items():
        if key in allowed:
            continue
        if key in NEUTRAL:
            if value == NEUTRAL[key] or (value is None):
                continue
            raise RequestError(400, f"'{key}' is not supported by this server", key, "unsupported_parameter")
        raise RequestError(400, f"unrecognized request argument: '{key}'", key, "unsupported_parameter")
    model = body.get("model")
    if model is not None and model != served.model_id:
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{served.model_id}'",
                           "model", "model_not_found")
    tok = served.target.tokenizer
    if kind == "chat":
        prompt_ids = _messages(body, tok)
    else:
        prompt_ids = _prompt(body, tok, served.target.config.vocab_size)
    context = served.max_context
    if len(prompt_ids) >= context:
        raise RequestError(400, f"the prompt has {len(prompt_ids)} tokens; this server's context is {context}",
                           "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    max_tokens = _integer(body, "max_completion_tokens", 1) if kind == "chat" else None
    max_tokens = max_tokens or _integer(body, "max_tokens", 1)
    room = context - len(prompt_ids)
    if max_tokens is None:
        max_tokens = min(room, 16 if kind == "completion" else 1024)
    elif max_tokens > room:
        raise RequestError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds this "
                                f"server's context of {context}", "max_tokens", "context_length_exceeded")
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 1e-9, 1.0, 1.0)
    top_k = _integer(body, "top_k", 0) or 0
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "'seed' must be an integer", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError(400, "'stream_options' supports only include_usage", "stream_options")
    return Request(kind=kind, prompt_ids=prompt_ids, max_tokens=max_tokens,
                   sampling={"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed},
                   stop=stop, settings=_settings(body.get("triforce"), served.settings), stream=stream,
                   include_usage=bool(options.get("include_usage")))


def _settings(overrides: Any, defaults: EngineSettings) -> EngineSettings:
    """The server's settings with a request's `triforce` object applied."""
    if overrides is None:
        return defaults
    if not isinstance(overrides, dict) or set(overrides) - EXTENSION_KEYS:
        raise RequestError(400, f"'triforce' accepts only {', '.join(sorted(EXTENSION_KEYS))}", "triforce")
    try:
        return defaults.replace(**overrides)
    except SettingError as exc:
        if exc.setting == "draft":
            message = f"this server has no draft model for method {overrides.get('method')}"
        else:
            message = f"'triforce.{exc.setting}' {exc.problem}"
        raise RequestError(400, message, "triforce") from None


# -- responses -------------------------------------------------------------------------------------
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(result: Any) -> dict[str, Any]:
    levels = [{k: level[k] for k in ("name", *COUNTERS, "draft_acceptance_rate", "mean_acceptance_length")}
              for level in drafting_levels(result.stats)]
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "total_tokens": result.prompt_tokens + len(result.token_ids),
        "speculative": {"method": result.stats["method"], "levels": levels,
                        "ms_per_token": result.stats["ms_per_token"]},
    }


def chunk(kind: str, ident: str, created: int, model: str, delta: dict | None = None, text: str | None = None,
          finish: str | None = None) -> dict[str, Any]:
    """One streamed chunk (Server-Sent Events) of a chat or completion response."""
    if kind == "chat":
        return {"id": f"chatcmpl-{ident}", "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    return {"id": f"cmpl-{ident}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def full_response(kind: str, ident: str, created: int, model: str, result: Any) -> dict[str, Any]:
    finish = FINISH.get(result.finish_reason, "stop")
    if kind == "chat":
        return {"id": f"chatcmpl-{ident}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": finish, "logprobs": None}],
                "usage": usage(result)}
    return {"id": f"cmpl-{ident}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(result)}
