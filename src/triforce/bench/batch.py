"""`triforce bench batch`: throughput of batched decoding across batch sizes and contexts.

For each context, `max(batch sizes)` different slices of the document are prefilled once (one
engine each; every later run reuses its cached prompt). Then, for each batch size b and method,
the first b sequences decode together (batch.run_batch: one weight read per step for the whole
batch, attention per sequence). Reported per (context, batch, method): total tokens/s (all
sequences' new tokens over the batch's decoding time), per-sequence ms/token, mean sequences per
decoder pass, acceptance, speedup over batched autoregressive at the same batch size (and, for
autoregressive, over the smallest batch: ratios within each round, median over rounds), and for
autoregressive the achieved bandwidth (weights once + every sequence's KV, per step) against the
machine's copy bandwidth. Greedy runs check every sequence against its autoregressive tokens.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..batch import run_batch
from ..batcher import ForwardBatcher
from ..corpus import load_document
from ..engine import Engine
from ..errors import TriforceError
from ..loading import default_draft, load
from ..settings import METHODS, EngineSettings
from .common import (
    copy_bandwidth_gbs,
    exactness_note,
    load_drafts,
    machine,
    markdown_table,
    median,
    peak_rss_mb,
    write_report,
    yes_no,
)
from .plots import line_plot
from .quick import TINY_DRAFT, TINY_TARGET

DEFAULTS: dict[str, Any] = dict(
    contexts=[4096, 16384], batch_sizes=[1, 2, 4, 8], methods=["autoregressive", "streaming", "retrieval", "triforce"],
    drafts=["ngram"], new_tokens=64, temperature=0.0, repeats=1, document="vim", model=None, dtype="bf16",
    knobs={}, bandwidth_bytes=1 << 30,
)
QUICK: dict[str, Any] = dict(contexts=[256, 512], batch_sizes=[1, 2, 3], drafts=[TINY_DRAFT, "ngram"], new_tokens=8,
                             model=TINY_TARGET, dtype="fp32", knobs={"budget": 64}, bandwidth_bytes=1 << 24)

Config = tuple[str, str | None]  # (method, draft)


def validate(contexts: list[int], batch_sizes: list[int], methods: list[str], temperature: float) -> None:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise TriforceError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if math.isnan(temperature) or temperature < 0:
        raise TriforceError(f"temperature must be a number >= 0, got {temperature}")
    if min(contexts) < 2 or min(batch_sizes) < 1:
        raise TriforceError("contexts must be >= 2 tokens and batch sizes >= 1")


def name_of(config: Config) -> str:
    method, draft = config
    if draft is None:
        return method
    return f"{method}[{'ngram' if draft == 'ngram' else Path(draft).name}]"


def configs(methods: list[str], drafts: list[str]) -> list[Config]:
    plan: list[Config] = [("autoregressive", None)]
    for m in methods:
        if m in ("speculative", "triforce"):
            plan += [(m, d) for d in drafts]
        elif m != "autoregressive":
            plan.append((m, None))
    return plan


def prompts(tokenizer: Any, document: str, context: int, count: int) -> list[list[int]]:
    """`count` different `context`-token slices of the document (disjoint while it is long enough)."""
    ids = tokenizer.encode(load_document(document), add_special_tokens=False)
    if len(ids) < context:
        raise TriforceError(f"document {document!r} has {len(ids)} tokens; a context of {context} requested")
    room = len(ids) - context
    starts = [(i * context) % (room + 1) for i in range(count)]
    return [ids[s : s + context] for s in starts]


def run(
    contexts: list[int] | None = None,
    batch_sizes: list[int] | None = None,
    methods: list[str] | None = None,
    drafts: list[str] | None = None,
    new_tokens: int = 64,
    temperature: float = 0.0,
    repeats: int = 1,
    document: str = "vim",
    model: str | None = None,
    dtype: str = "bf16",
    knobs: dict[str, int] | None = None,
    bandwidth_bytes: int = 1 << 30,
    out: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    contexts = sorted(set(contexts or DEFAULTS["contexts"]))
    batch_sizes = sorted(set(batch_sizes or DEFAULTS["batch_sizes"]))
    methods = methods or DEFAULTS["methods"]
    validate(contexts, batch_sizes, methods, temperature)
    bandwidth = copy_bandwidth_gbs(bandwidth_bytes)
    log(f"copy bandwidth (read+write): {bandwidth:.1f} GB/s")
    target = load(model, dtype=dtype)
    draft_specs = drafts or DEFAULTS["drafts"]
    drafters = load_drafts([default_draft(target) if d == "default" else d for d in draft_specs], target)
    plan = configs(methods, list(drafters))
    weight_bytes = target.decoder.weight_bytes
    kv_per_token = target.decoder.kv_bytes_per_token()
    rows: list[dict[str, Any]] = []
    prefill_s: dict[int, float] = {}
    for context in contexts:
        seqs = prompts(target.tokenizer, document, context, max(batch_sizes))
        batcher = ForwardBatcher()
        engines = [Engine(target, EngineSettings(**(knobs or {})), batcher=batcher) for _ in seqs]
        t = [prefill_alone(engine, ids) for engine, ids in zip(engines, seqs)]
        prefill_s[context] = round(median(t), 2)
        log(f"context {context}: {len(seqs)} prompts prefilled, median {prefill_s[context]:.1f} s each")
        runs: dict[tuple[int, Config], list[dict[str, Any]]] = {}
        reference: dict[int, list[int]] = {}  # sequence -> its autoregressive tokens (greedy)
        for r in range(repeats):
            for bs in batch_sizes:
                for config in plan:
                    method, draft = config
                    for engine in engines[:bs]:
                        engine.configure(method=method, draft=drafters[draft] if draft else None)
                    entry = measure_batch(engines[:bs], seqs[:bs], new_tokens, temperature, seed=1000 + 97 * r)
                    tokens = entry.pop("tokens")
                    if temperature == 0:
                        if method == "autoregressive":
                            for i, seq_tokens in enumerate(tokens):
                                reference.setdefault(i, seq_tokens)
                        entry["exact"] = tokens == [reference.get(i) for i in range(bs)]
                    else:
                        entry["exact"] = None
                    runs.setdefault((bs, config), []).append(entry)
                    log(f"  r{r} {context} b{bs} {name_of(config):<26} {entry['tokens_per_s']:8.1f} tokens/s  "
                        f"{entry['ms_per_token']:7.1f} ms/token/seq  acceptance {entry['acceptance']}"
                        + ("" if entry["exact"] in (None, True) else "  MISMATCH"))
        for bs in batch_sizes:
            # Ratios are taken within each round (runs minutes apart drift by 10-20% here), then
            # their median: a slow round then slows both sides of its ratio.
            base = [e["tokens_per_s"] for e in runs[(bs, plan[0])]]
            base_b1 = [e["tokens_per_s"] for e in runs[(batch_sizes[0], plan[0])]]
            for config in plan:
                entries = runs[(bs, config)]
                mine = [e["tokens_per_s"] for e in entries]
                tps = median(mine)
                row = {
                    "context": context, "batch": bs, "method": name_of(config),
                    "tokens_per_s": round(tps, 2),
                    "ms_per_token": round(median([e["ms_per_token"] for e in entries]), 2),
                    "speedup_vs_batched_ar": round(median([a / b for a, b in zip(mine, base)]), 2),
                    "throughput_vs_first_batch_size": round(median([a / b for a, b in zip(mine, base_b1)]), 2)
                    if config == plan[0] else None,
                    "sequences_per_pass": round(median([e["sequences_per_pass"] for e in entries]), 2),
                    "acceptance": [round(median([e["acceptance"][i] for e in entries]), 3)
                                   for i in range(len(entries[0]["acceptance"]))],
                    "exact": None if any(e["exact"] is None for e in entries) else all(e["exact"] for e in entries),
                }
                if config == plan[0]:  # each step reads the weights once and every sequence's KV
                    step_bytes = weight_bytes + kv_per_token * bs * (context + new_tokens // 2)
                    row["achieved_gbs"] = round(step_bytes * tps / bs / 1e9, 1)
                rows.append(row)
    table = markdown_table(
        ["context", "batch", "method", "total tokens/s", "ms/token per sequence", "vs batched AR",
         "AR vs smallest batch", "sequences per pass", "acceptance (bottom..)", "achieved GB/s", "exact"],
        [[r["context"], r["batch"], r["method"], r["tokens_per_s"], r["ms_per_token"], r["speedup_vs_batched_ar"],
          r["throughput_vs_first_batch_size"] or "-", r["sequences_per_pass"],
          ", ".join(f"{a:.3f}" for a in r["acceptance"]) or "-", r.get("achieved_gbs", "-"), yes_no(r["exact"])]
         for r in rows])
    notes = [f"copy bandwidth {bandwidth:.1f} GB/s (read+write); peak RSS {peak_rss_mb():.0f} MB"]
    notes += exactness_note(target.decoder.dtype, [r["exact"] for r in rows]) + plot_batch(rows, out)
    table += "\n\n" + "\n".join(f"- {n}" for n in notes)
    log(table)
    report = {
        "machine": machine(), "copy_bandwidth_gbs": round(bandwidth, 1), "model": target.source,
        "dtype": str(target.decoder.dtype).removeprefix("torch."), "document": document, "contexts": contexts,
        "batch_sizes": batch_sizes, "new_tokens": new_tokens, "temperature": temperature, "repeats": repeats,
        "knobs": knobs or {}, "prefill_s": prefill_s, "peak_rss_mb": round(peak_rss_mb()), "rows": rows,
        "notes": notes, "markdown": table,
    }
    write_report(out, "batch", report)
    return report


def prefill_alone(engine: Engine, ids: list[int]) -> float:
    """Fill one engine's prompt cache, as a batch of one (its passes go through its batcher);
    seconds taken."""
    t0 = time.perf_counter()
    run_batch([engine], [dict(prompt=ids, max_new_tokens=1)], release=False)
    return time.perf_counter() - t0


def measure_batch(engines: list[Engine], seqs: list[list[int]], new_tokens: int, temperature: float,
                  seed: int) -> dict[str, Any]:
    """One batched run; throughput is every sequence's new tokens over the longest decoding time
    (the sequences start decoding together: their prompts are cached and of equal length)."""
    requests = [dict(prompt=ids, max_new_tokens=new_tokens, temperature=temperature,
                     top_p=0.9 if temperature > 0 else 1.0, seed=seed + i, ignore_eos=True)
                for i, ids in enumerate(seqs)]
    batch = run_batch(engines, requests, release=False)
    failed = [r for r in batch.results if isinstance(r, TriforceError)]
    if failed:
        raise failed[0]
    stats = [r.stats for r in batch.results]
    wall = max(s["decode_s"] for s in stats)
    levels = len(stats[0]["levels"]) - 1
    return {
        "tokens_per_s": sum(s["new_tokens"] for s in stats) / wall,
        "ms_per_token": median([s["ms_per_token"] for s in stats]),
        "sequences_per_pass": batch.sequence_passes / max(1, batch.passes),
        "acceptance": [median([s["levels"][i].get("draft_acceptance_rate") or 0.0 for s in stats])
                       for i in range(levels)],
        "tokens": [r.token_ids for r in batch.results],
    }


def plot_batch(rows: list[dict[str, Any]], out: Path | None) -> list[str]:
    """batch_tokens_per_s_<context>.png: total tokens/s against batch size, one line per method."""
    if out is None:
        return []
    for context in sorted({r["context"] for r in rows}):
        series: dict[str, list[tuple[float, float | None]]] = {}
        for r in rows:
            if r["context"] == context:
                series.setdefault(r["method"], []).append((r["batch"], r["tokens_per_s"]))
        note = line_plot(out / f"batch_tokens_per_s_{context}.png", series, f"batched decoding, context {context}",
                         "batch size", "total tokens/s")
        if note:
            return [note]
    return []
