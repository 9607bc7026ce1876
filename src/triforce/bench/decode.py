"""`triforce bench decode`: every decoding method side by side on real long documents.

One process, one prefill per context (the prompt cache serves every method after the first),
repeats interleaved across methods, medians. Greedy runs check that every method produced the
autoregressive tokens. Per-level acceptance and where the time goes are kept for every run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..corpus import document_tokens
from ..generation import TriForce
from ..loading import LoadedModel, load
from .common import copy_bandwidth_gbs, machine, markdown_table, median, peak_rss_mb

LOSSLESS = ("autoregressive", "speculative", "retrieval", "streaming", "triforce")


def variants(methods: list[str], drafts: list[str]) -> list[tuple[str, str | None]]:
    """(method, draft) pairs: methods with a bottom level run once per draft."""
    out: list[tuple[str, str | None]] = []
    for method in methods:
        if method in ("speculative", "triforce"):
            out += [(method, d) for d in drafts]
        else:
            out.append((method, None))
    return out


def label(method: str, draft: str | None) -> str:
    if draft is None:
        return method
    return f"{method}[{'ngram' if draft == 'ngram' else 'draft'}]"


def time_per_level(stats: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per generated token spent in each level (and in retrieval rebuilds)."""
    n = max(1, stats["new_tokens"])
    out = {}
    for level in stats["levels"]:
        out[level["name"]] = round(1000 * level["time_s"] / n, 2)
        if level.get("rebuilds"):
            out["rebuild"] = round(1000 * level["rebuild_s"] / n, 2)
    return out


def run(
    contexts: list[int],
    new_tokens: int = 128,
    temperatures: list[float] | None = None,
    methods: list[str] | None = None,
    drafts: list[str] | None = None,
    repeats: int = 1,
    document: str = "vim",
    knobs: dict[str, int] | None = None,
    out: Path | None = None,
    target: LoadedModel | None = None,
    log: Any = print,
) -> dict[str, Any]:
    temperatures = temperatures if temperatures is not None else [0.0, 0.6]
    methods = methods or list(LOSSLESS)
    drafts = drafts or ["ngram"]
    knobs = knobs or {}
    bandwidth = copy_bandwidth_gbs()
    target = target or load(None, dtype="bf16")
    draft_models: dict[str, LoadedModel | str] = {}
    for d in drafts:
        draft_models[d] = "ngram" if d == "ngram" else load(d, dtype=target.decoder.dtype)
    combos = variants(methods, drafts)
    raw: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for ctx in contexts:
        ids = document_tokens(target.tokenizer, document, ctx)
        engine = TriForce(target, None, method="autoregressive", progress=False, **knobs)
        t0 = time.perf_counter()
        engine.generate(ids, max_new_tokens=1)
        prefill_s = time.perf_counter() - t0
        log(f"context {ctx}: prefill {prefill_s:.1f} s")
        results: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for r in range(repeats):
            for temp in temperatures:
                reference = None
                for method, draft in combos:
                    engine.configure(method=method, draft=draft_models[draft] if draft else None)
                    result = engine.generate(
                        ids, max_new_tokens=new_tokens, temperature=temp, top_p=0.9 if temp > 0 else 1.0,
                        seed=1000 + r, ignore_eos=True,
                    )
                    s = result.stats
                    if method == "autoregressive":
                        reference = result.token_ids
                    entry = {
                        "context": ctx, "repeat": r, "temperature": temp, "method": label(method, draft),
                        "ms_per_token": s["ms_per_token"], "levels": s["levels"], "time_per_level": time_per_level(s),
                        "same_as_autoregressive": (result.token_ids == reference) if temp == 0 and reference else None,
                    }
                    raw.append(entry)
                    results.setdefault((entry["method"], temp), []).append(entry)
                    accept = [lv.get("draft_acceptance_rate") for lv in s["levels"][:-1]]
                    log(f"  ctx {ctx} T={temp} r{r} {entry['method']:<22} {s['ms_per_token']:7.1f} ms/token  "
                        f"acceptance {accept}  ms/token by level {entry['time_per_level']}"
                        + ("" if entry["same_as_autoregressive"] in (None, True) else "  MISMATCH"))
        for temp in temperatures:
            base = median([e["ms_per_token"] for e in results[("autoregressive", temp)]]) if (
                "autoregressive", temp) in results else None
            for method, draft in combos:
                entries = results[(label(method, draft), temp)]
                ms = median([e["ms_per_token"] for e in entries])
                row = {
                    "context": ctx, "temperature": temp, "method": label(method, draft), "ms_per_token": round(ms, 2),
                    "speedup": round(base / ms, 2) if base else None, "prefill_s": round(prefill_s, 1),
                    "acceptance": [
                        median([e["levels"][i].get("draft_acceptance_rate") or 0 for e in entries])
                        for i in range(len(entries[0]["levels"]) - 1)
                    ],
                    "time_per_level": entries[len(entries) // 2]["time_per_level"],
                    "exact": None if temp > 0 else all(e["same_as_autoregressive"] for e in entries),
                }
                summary.append(row)
    header = ["context", "T", "method", "ms/token", "speedup", "acceptance (bottom..)", "ms/token by level", "exact"]
    table = markdown_table(header, [
        [r["context"], r["temperature"], r["method"], r["ms_per_token"], r["speedup"],
         ", ".join(f"{a:.3f}" for a in r["acceptance"]) or "-",
         ", ".join(f"{k} {v}" for k, v in r["time_per_level"].items()),
         {None: "-", True: "yes", False: "NO"}[r["exact"]]]
        for r in summary
    ])
    log(table)
    report = {
        "machine": machine(), "copy_bandwidth_gbs": round(bandwidth, 1), "document": document,
        "new_tokens": new_tokens, "repeats": repeats, "knobs": knobs, "peak_rss_mb": round(peak_rss_mb(), 1),
        "summary": summary, "raw": raw, "markdown": table,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.json").write_text(json.dumps(report, indent=2))
        (out / "decode.md").write_text(table + "\n")
    return report
