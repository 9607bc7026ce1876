"""`triforce bench engine`: our decoder on each kernel path against transformers' generate.

The embedded model, the same prompts (real text) and dtype, in one process; repeats interleaved
across kernel paths and engines, medians reported. Also reports the machine's copy bandwidth
and each path's achieved bandwidth: (weight bytes + KV bytes at that context) / time per token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import native
from ..corpus import document_tokens
from ..engine import Engine
from ..errors import TriforceError
from ..loading import default_draft, embedded_model_path, load
from ..settings import EngineSettings
from .common import copy_bandwidth_gbs, machine, markdown_table, median, peak_rss_mb, write_report
from .peers import hf_model


class _StepClock:
    """A transformers LogitsProcessor that only records when each generation step happens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def transformers_model(dtype: torch.dtype) -> Any:
    return hf_model(embedded_model_path(), dtype)


def measure_transformers(model: Any, ids: list[int], new_tokens: int) -> dict[str, float]:
    from transformers import LogitsProcessorList

    clock = _StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            logits_processor=LogitsProcessorList([clock]), pad_token_id=model.config.eos_token_id,
        )
    end = time.perf_counter()
    # step i's logits exist at times[i]; the first marks the end of prefill
    decode = end - clock.times[0]
    return {"prefill_s": clock.times[0] - start, "ms_per_token": 1000 * decode / (new_tokens - 1 + 1e-9)}


def measure_ours(engine: Engine, ids: list[int], new_tokens: int, fresh: bool = True) -> dict[str, float]:
    if fresh:  # prefill afresh, as transformers does: the prompt cache would keep it all
        engine.release()
    result = engine.generate(ids, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return {"prefill_s": result.stats["prefill_s"], "ms_per_token": result.stats["ms_per_token"],
            "cached_prompt_tokens": result.stats["cached_prompt_tokens"], "tokens": result.token_ids}


def run(
    contexts: list[int],
    new_tokens: int = 32,
    repeats: int = 3,
    document: str = "vim",
    with_transformers: bool = True,
    out: Path | None = None,
    log: Any = print,
    isas: list[str] | None = None,
) -> dict[str, Any]:
    """Plain decoding and `triforce` (its default draft) on each kernel path in `isas` (default:
    the one that runs; see native.ISA_CHOICES), and transformers' generate, repeats interleaved.
    Each repeat prefills plain decoding afresh; `triforce` then reuses that prompt cache."""
    dtype = torch.bfloat16
    for isa in isas or []:
        if isa not in native.ISA_CHOICES[1:]:
            raise TriforceError(f"unknown --isa {isa!r}; choose from {', '.join(native.ISA_CHOICES[1:])}")
    bandwidth = copy_bandwidth_gbs()
    log(f"copy bandwidth (read+write): {bandwidth:.1f} GB/s")
    paths: dict[str, tuple[str | None, Engine]] = {}  # by the kernels that run: (the ISA chosen, its engine)
    try:
        for isa in isas or [None]:  # None: the environment's choice
            kernels = native.set_isa(isa)
            target = load(None, dtype=dtype)
            draft_name = default_draft(target)
            draft = "ngram" if draft_name == "ngram" else load(draft_name, dtype=dtype)
            paths[kernels] = isa, Engine(target, EngineSettings(method="autoregressive", draft=draft))
            log(f"kernels {kernels}: {target.source}, draft {paths[kernels][1].settings.draft_name}")
        first = next(iter(paths.values()))[1]
        hf = transformers_model(dtype) if with_transformers else None
        weight_bytes = first.target.decoder.weight_bytes
        kv_per_token = first.target.decoder.kv_bytes_per_token()
        raw: list[dict[str, Any]] = []
        rows = []
        for ctx in contexts:
            ids = document_tokens(first.target.tokenizer, document, ctx)
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for r in range(repeats):
                for kernels, (isa, engine) in paths.items():
                    native.set_isa(isa)
                    for method in ("autoregressive", "triforce"):
                        engine.configure(method=method)
                        m = measure_ours(engine, ids, new_tokens, fresh=method == "autoregressive")
                        runs.setdefault((kernels, method), []).append(m)
                        raw.append({**m, "engine": "triforce", "kernels": kernels, "method": method, "context": ctx,
                                    "repeat": r})
                        log(f"  ctx {ctx} repeat {r} {kernels} {method}: prefill {m['prefill_s']:.2f} s, "
                            f"{m['ms_per_token']:.1f} ms/token")
                if hf is not None:
                    m = measure_transformers(hf, ids, new_tokens)
                    runs.setdefault(("transformers", "autoregressive"), []).append(m)
                    raw.append({**m, "engine": "transformers", "context": ctx, "repeat": r})
                    log(f"  ctx {ctx} repeat {r} transformers: prefill {m['prefill_s']:.2f} s, "
                        f"{m['ms_per_token']:.1f} ms/token")
            bytes_per_token = weight_bytes + kv_per_token * (ctx + new_tokens // 2)
            floor_ms = 1000 * bytes_per_token / (bandwidth * 1e9)
            base = median([m["ms_per_token"] for m in runs[next(iter(paths)), "autoregressive"]])
            for kernels in [*paths, "transformers"]:
                if (kernels, "autoregressive") not in runs:
                    continue
                plain = runs[kernels, "autoregressive"]
                ms = median([m["ms_per_token"] for m in plain])
                row = {"context": ctx, "kernels": kernels, "ms": round(ms, 2),
                       "prefill_s": round(median([m["prefill_s"] for m in plain]), 2),
                       "vs_first": round(ms / base, 2), "vs_floor": round(ms / floor_ms, 2),
                       "gbs": round(bytes_per_token / ms / 1e6, 1), "floor_ms": round(floor_ms, 2)}
                if (kernels, "triforce") in runs:
                    spec = runs[kernels, "triforce"]
                    tf_ms = median([m["ms_per_token"] for m in spec])
                    row.update(triforce_ms=round(tf_ms, 2), triforce_speedup=round(ms / tf_ms, 2),
                               identical=all(a["tokens"] == b["tokens"] for a, b in zip(plain, spec)))
                rows.append(row)
    finally:
        native.set_isa(None)
    for m in raw:
        m.pop("tokens", None)
    report = {
        "machine": machine(),
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "document": document,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rows": rows,
        "raw": raw,
    }
    report["markdown"] = markdown_table(
        ["context", "kernels", "plain ms/token", "x first", "plain GB/s", "of floor", "prefill s",
         "triforce ms/token", "speedup", "identical"],
        [[r["context"], r["kernels"], r["ms"], r["vs_first"], r["gbs"], r["vs_floor"], r["prefill_s"],
          r.get("triforce_ms", "-"), r.get("triforce_speedup", "-"), r.get("identical", "-")] for r in rows])
    report["markdown"] += (f"\n\n- plain decoding's floor: (weights + KV at the context) / copy bandwidth "
                           f"{bandwidth:.1f} GB/s; 'x first' is plain decoding's time against the first row's; "
                           f"triforce uses its default draft and prompt lookup, greedy, {new_tokens} tokens")
    log(report["markdown"])
    write_report(out, "engine", report)
    return report
