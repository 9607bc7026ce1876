"""`triforce bench engine`: our decoder against transformers' generate on the embedded model.

Same prompts (real text), same dtype, in one process; repeats interleaved across engines and
medians reported. Also reports the machine's copy bandwidth and each engine's achieved
bandwidth: (weight bytes + KV bytes at that context) / time per token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..corpus import document_tokens
from ..engine import Engine
from ..loading import embedded_model_path, load
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


def measure_ours(engine: Engine, ids: list[int], new_tokens: int) -> dict[str, float]:
    engine.release()  # every repeat prefills afresh, as transformers does: the prompt cache would keep it all
    result = engine.generate(ids, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return {"prefill_s": result.stats["prefill_s"], "ms_per_token": result.stats["ms_per_token"],
            "cached_prompt_tokens": result.stats["cached_prompt_tokens"]}


def run(
    contexts: list[int],
    new_tokens: int = 32,
    repeats: int = 3,
    document: str = "vim",
    with_transformers: bool = True,
    out: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth_gbs()
    log(f"copy bandwidth (read+write): {bandwidth:.1f} GB/s")
    target = load(None, dtype=dtype)
    engine = Engine(target)
    hf = transformers_model(dtype) if with_transformers else None
    weight_bytes = target.decoder.weight_bytes
    kv_per_token = target.decoder.kv_bytes_per_token()
    raw: list[dict[str, Any]] = []
    rows = []
    for ctx in contexts:
        ids = document_tokens(target.tokenizer, document, ctx)
        runs: dict[str, list[dict[str, float]]] = {"triforce": [], "transformers": []}
        for r in range(repeats):
            for name in runs:
                if name == "transformers" and hf is None:
                    continue
                m = measure_ours(engine, ids, new_tokens) if name == "triforce" else measure_transformers(
                    hf, ids, new_tokens)
                m.update(engine=name, context=ctx, repeat=r)
                raw.append(m)
                runs[name].append(m)
                log(f"  ctx {ctx} repeat {r} {name}: prefill {m['prefill_s']:.2f} s, {m['ms_per_token']:.1f} ms/token")
        bytes_per_token = weight_bytes + kv_per_token * (ctx + new_tokens // 2)
        floor_ms = 1000 * bytes_per_token / (bandwidth * 1e9)
        ours = median([m["ms_per_token"] for m in runs["triforce"]])
        row = {
            "context": ctx,
            "ours_ms": round(ours, 2),
            "ours_prefill_s": round(median([m["prefill_s"] for m in runs["triforce"]]), 2),
            "floor_ms": round(floor_ms, 2),
            "ours_vs_floor": round(ours / floor_ms, 2),
            "ours_gbs": round(bytes_per_token / ours / 1e6, 1),
        }
        if runs["transformers"]:
            theirs = median([m["ms_per_token"] for m in runs["transformers"]])
            row.update(
                hf_ms=round(theirs, 2),
                hf_prefill_s=round(median([m["prefill_s"] for m in runs["transformers"]]), 2),
                speedup_vs_hf=round(theirs / ours, 2),
                hf_gbs=round(bytes_per_token / theirs / 1e6, 1),
            )
        rows.append(row)
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
    header = ["context", "ours ms/token", "floor ms", "ours/floor", "ours GB/s", "ours prefill s"]
    if with_transformers:
        header += ["transformers ms/token", "speedup", "transformers prefill s"]
    table_rows = []
    for r in rows:
        line = [r["context"], r["ours_ms"], r["floor_ms"], r["ours_vs_floor"], r["ours_gbs"], r["ours_prefill_s"]]
        if with_transformers:
            line += [r.get("hf_ms"), r.get("speedup_vs_hf"), r.get("hf_prefill_s")]
        table_rows.append(line)
    report["markdown"] = markdown_table(header, table_rows)
    log(report["markdown"])
    write_report(out, "engine", report)
    return report
