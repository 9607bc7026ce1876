"""`triforce bench kernels`: the native kernels' speed against the machine's memory bandwidth.

Attention: one call per layer over `layers` separate caches of the target's shape (allocated as
the engine allocates them), so each call streams its keys and values from memory as in a real
decoding step, not from a cache the previous call warmed. Reported per context, query tokens T
(1 = decoding, more = verifying a draft), thread count and multi-row path (staged or grouped,
alternating): microseconds per layer, the ratio to a 1-token pass, and GB/s of keys and values
read against the copy bandwidth. Projections: the target's own layers with M rows of input (one
decoding step of a batch of M, or a verification of M tokens), for each weights format asked
(dense bf16, a GGUF's own blocks, a quantized copy), the formats alternating: milliseconds per
pass over every layer and the output head, GB/s of weights read and multiply-adds per second,
which shows where the rows stop being free (the pass turns compute-bound). Both also in
multiply-adds per second, against the machine's measured ceiling for the kernels' multiply-add
instruction (threads running nothing but it: AVX512-BF16's pair dot product, AVX2's or NEON's
float32 multiply-add). Passes: attention and projections added up per context and
token count (where --rows has it), against the 1-token pass: a verification's cost in decoding
steps. Prefill: one chunk of `prefill_queries` new tokens after each context, on one layer,
through the kernel and through PyTorch's flash attention (what prefill uses where the kernel does
not take it), runs alternating, medians and their ratio.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import native
from ..attention import attend_torch
from ..cache import allocate_kv
from ..errors import TriforceError
from ..formats import WEIGHTS
from ..loading import load
from ..model import Linear
from .common import copy_bandwidth_gbs, machine, markdown_table, median, write_report

DEFAULTS: dict[str, Any] = dict(contexts=[2048, 8192], queries=[1, 2, 5, 7], rows=[1, 4, 8, 12, 16, 24, 32],
                                layers=None, repeats=7, model=None, bandwidth_bytes=1 << 30, prefill_queries=1024,
                                weights=["bf16", "auto"])
QUICK: dict[str, Any] = dict(contexts=[256], queries=[1, 5], rows=[1, 5], layers=2, repeats=1, bandwidth_bytes=1 << 24,
                             prefill_queries=96)


def _attention_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> None:
    for i in range(k.shape[0]):  # layer by layer: each call reads its own cold cache
        native.attention(q, k[i], v[i], context, context - q.shape[0], out_dtype=torch.bfloat16)


def _projection_pass(projections: list[Any], inputs: list[torch.Tensor]) -> None:
    for proj, x in zip(projections, inputs):
        proj(x)


def attention_paths(config: Any) -> list[str]:
    """The multi-row attention paths this CPU runs on bf16 caches of `config`'s shape: staged and
    grouped where the AVX512-BF16 kernel takes the head size, else the one there is ("-")."""
    return ["staged", "grouped"] if native.kernels() == "avx512" and config.head_dim % 32 == 0 else ["-"]


def attention_rows(config: Any, contexts: list[int], queries: list[int], layers: int, repeats: int,
                   thread_counts: list[int], bandwidth: float, peak: dict[int, float | None],
                   log: Any) -> list[dict[str, Any]]:
    """Per context, thread count, query tokens T (1 always, the base of the ratios) and path,
    token counts and paths alternating within each repeat: microseconds per layer, the ratio to
    the same path's 1-token pass, GB/s of keys and values read against the copy bandwidth and
    GMAC/s against the multiply-add ceiling of as many threads."""
    hq, hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    paths = attention_paths(config)
    counts = sorted({1, *queries})
    rows = []
    for context in contexts:
        shape = dataclasses.replace(config, num_layers=layers)
        k, v = allocate_kv(shape, context + max(counts), torch.bfloat16, "cpu")
        k.normal_()
        v.normal_()
        kv_bytes = 2 * hkv * context * hd * 2
        macs_per_query = 2 * hq * context * hd  # q.k and p.v for every query head
        qs = {t: torch.randn(t, hq, hd) for t in counts}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            # every token count and path takes its turn within each repeat, so the ratios to the
            # 1-token pass compare runs seconds apart, not minutes (shared machines drift)
            times = _alternating({(t, name): partial(_attention_pass, qs[t], k, v, context)
                                  for t in counts for name in paths}, repeats)
            one = {name: times[1, name] / layers for name in paths}
            for t in counts:
                for name in paths:
                    per_layer = times[t, name] / layers
                    gbs, gmacs = kv_bytes / per_layer / 1e9, t * macs_per_query / per_layer / 1e9
                    ceiling = peak.get(threads)
                    rows.append({"context": context, "queries": t, "threads": threads, "path": name,
                                 "us_per_layer": round(per_layer * 1e6, 1),
                                 "vs_one_query": round(per_layer / one[name], 2),
                                 "gbs": round(gbs, 3), "bandwidth_share": round(gbs / bandwidth, 3),
                                 "gmacs": round(gmacs, 3),
                                 "ceiling_share": round(gmacs / ceiling, 3) if ceiling else None})
                    log(f"attention {context} T={t} threads={threads} path={name}: {per_layer * 1e6:.0f} us/layer "
                        f"({per_layer / one[name]:.2f}x T=1), {gbs:.1f} GB/s ({gbs / bandwidth:.0%} of copy), "
                        f"{gmacs:.0f} GMAC/s" + (f" ({gmacs / ceiling:.0%} of ceiling)" if ceiling else ""))
    return rows


def _alternating(fns: dict[tuple[int, str], Any], repeats: int) -> dict[tuple[int, str], float]:
    """Median seconds of each (token count, path) call, all taking turns within each repeat."""
    staged = native.set_staged_attention(True) if any(name != "-" for _, name in fns) else None
    try:
        for (_, name), fn in fns.items():  # first touch and kernel build outside the clock
            if staged is not None:
                native.set_staged_attention(name == "staged")
            fn()
        times: dict[tuple[int, str], list[float]] = {key: [] for key in fns}
        for _ in range(repeats):
            for key, fn in fns.items():
                if staged is not None:
                    native.set_staged_attention(key[1] == "staged")
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    finally:
        if staged is not None:
            native.set_staged_attention(staged)
    return {key: median(ts) for key, ts in times.items()}


def pass_rows(attn: list[dict[str, Any]], proj: list[dict[str, Any]], layers: int,
              threads: int) -> list[dict[str, Any]]:
    """A whole pass of T tokens as the sum of its parts measured above (`layers` layers' attention
    at a context and the projections with T input rows, per weights format), against the 1-token
    pass: what a verification costs in decoding steps, before norms and glue."""
    proj_ms = {(r["weights"], r["rows"]): r["ms"] for r in proj}
    out = []
    for fmt in dict.fromkeys(r["weights"] for r in proj):
        for r in attn:
            if r["threads"] != threads or (fmt, r["queries"]) not in proj_ms or (fmt, 1) not in proj_ms:
                continue
            base = next(b for b in attn if (b["context"], b["threads"], b["path"], b["queries"]) ==
                        (r["context"], threads, r["path"], 1))
            attn_ms, base_ms = r["us_per_layer"] * layers / 1e3, base["us_per_layer"] * layers / 1e3
            total, one = attn_ms + proj_ms[fmt, r["queries"]], base_ms + proj_ms[fmt, 1]
            out.append({"context": r["context"], "queries": r["queries"], "path": r["path"], "weights": fmt,
                        "attention_ms": round(attn_ms, 2), "projection_ms": proj_ms[fmt, r["queries"]],
                        "pass_ms": round(total, 2), "vs_one_query": round(total / one, 2)})
    return out


def projection_rows(targets: dict[str, Any], rows_list: list[int], repeats: int, threads: int,
                    ceiling: float | None, log: Any) -> list[dict[str, Any]]:
    """Every layer's projections and the output head of each target (a weights format), the
    formats alternating within each repeat; the median per format and row count, with its GMAC/s
    against `ceiling` (the multiply-add ceiling of `threads` threads)."""
    torch.set_num_threads(threads)
    passes = {}
    for w, target in targets.items():
        dec = target.decoder
        projections = [p for layer in dec.layers for p in layer.projections().values()] + [dec.lm_head]
        if any(isinstance(p, Linear) and p.native is None for p in projections):
            raise TriforceError("the projection kernels need the native kernels (AVX512-BF16, AVX2 or NEON) and bf16 "
                                "weights")
        passes[w] = (projections, sum(p.nbytes for p in projections), sum(p.in_features * p.out_features
                                                                           for p in projections))
    rows = []
    for m in rows_list:
        inputs = {w: [torch.randn(m, p.in_features).bfloat16() for p in ps] for w, (ps, _, _) in passes.items()}
        times: dict[str, list[float]] = {w: [] for w in passes}
        for w, (ps, _, _) in passes.items():
            _projection_pass(ps, inputs[w])  # first touch outside the clock
        for _ in range(repeats):
            for w, (ps, _, _) in passes.items():
                t0 = time.perf_counter()
                _projection_pass(ps, inputs[w])
                times[w].append(time.perf_counter() - t0)
        for w, (_, nbytes, macs) in passes.items():
            seconds = median(times[w])
            gmacs = m * macs / seconds / 1e9
            rows.append({"weights": w, "mb": round(nbytes / 1e6, 1), "rows": m, "ms": round(seconds * 1e3, 2),
                         "gbs": round(nbytes / seconds / 1e9, 1), "gmacs": round(gmacs, 1),
                         "ceiling_share": round(gmacs / ceiling, 3) if ceiling else None})
            log(f"projections {w} M={m}: {seconds * 1e3:.2f} ms, {nbytes / seconds / 1e9:.1f} GB/s of weights, "
                f"{gmacs:.0f} GMAC/s" + (f" ({gmacs / ceiling:.0%} of ceiling)" if ceiling else ""))
    return rows


def prefill_rows(config: Any, contexts: list[int], new_tokens: int, repeats: int, log: Any) -> list[dict[str, Any]]:
    hq, hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    rows = []
    for context in contexts:
        total = context + new_tokens
        k, v = torch.randn(hkv, total, hd).bfloat16(), torch.randn(hkv, total, hd).bfloat16()
        q = torch.randn(new_tokens, hq, hd).bfloat16()
        paths = {"kernel": partial(native.attention, q, k, v, total, context, out_dtype=torch.bfloat16),
                 "flash": partial(attend_torch, q, k, v, total, context)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for fn in paths.values():
            fn()  # first touch outside the clock
        for _ in range(repeats):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        kernel_s, flash_s = median(times["kernel"]), median(times["flash"])
        macs = 2 * hq * new_tokens * (context + new_tokens / 2) * hd  # causal: half the new block
        rows.append({"context": context, "new_tokens": new_tokens, "kernel_ms": round(kernel_s * 1e3, 2),
                     "flash_ms": round(flash_s * 1e3, 2), "kernel_gmacs": round(macs / kernel_s / 1e9, 1),
                     "flash_gmacs": round(macs / flash_s / 1e9, 1), "kernel_speedup": round(flash_s / kernel_s, 2)})
        log(f"prefill {new_tokens} after {context}: kernel {kernel_s * 1e3:.1f} ms, flash {flash_s * 1e3:.1f} ms "
            f"per layer ({flash_s / kernel_s:.2f}x)")
    return rows


def run(contexts: list[int] | None = None, queries: list[int] | None = None, rows: list[int] | None = None,
        layers: int | None = None, repeats: int = 7, model: str | None = None, bandwidth_bytes: int = 1 << 30,
        prefill_queries: int = 1024, weights: list[str] | None = None, out: Path | None = None,
        log: Any = print) -> dict[str, Any]:
    if native.library() is None:
        raise TriforceError("the native kernels are unavailable here (no C compiler, or TRIFORCE_ISA=none)")
    contexts = contexts or DEFAULTS["contexts"]
    queries = queries or DEFAULTS["queries"]
    rows = rows or DEFAULTS["rows"]
    if min(contexts) < 1 or min(queries) < 1 or min(rows) < 1 or (layers is not None and layers < 1) or (
            prefill_queries < 1):
        raise TriforceError("contexts, query counts, row counts, layers and prefill queries must be positive")
    bandwidth = copy_bandwidth_gbs(bandwidth_bytes)
    log(f"copy bandwidth (read+write): {bandwidth:.1f} GB/s")
    weights = weights or DEFAULTS["weights"]
    bad = [w for w in weights if w not in WEIGHTS]
    if bad:
        raise TriforceError(f"unknown --weights {bad[0]!r}; choose from {', '.join(WEIGHTS)}")
    targets = {w: load(model, dtype="bf16", weights=w) for w in weights}
    target = targets[weights[0]]
    config = target.config
    layers = layers or config.num_layers
    all_threads = torch.get_num_threads()
    thread_counts = sorted({1, all_threads})
    peak = {t: native.mac_peak_gmacs(t, seconds=0.5 if repeats > 1 else 0.05) for t in thread_counts}
    ceiling = None
    chains: dict[str, float] = {}
    if None not in peak.values():
        ceiling = f"{native.mac_instruction()} ceiling: " + ", ".join(
            f"{g:.0f} GMAC/s with {t} thread(s)" for t, g in peak.items())
        # one thread, fewer independent chains: how many a loop needs to reach the ceiling
        chains = {str(c): round(native.mac_peak_gmacs(1, seconds=0.2 if repeats > 1 else 0.02, chains=c) or 0, 1)
                  for c in native.DOT_CHAINS}
        ceiling += "; one thread by independent chains: " + ", ".join(f"{c}: {g:.0f}" for c, g in chains.items())
        log(ceiling)
    try:
        attn = attention_rows(config, contexts, queries, layers, repeats, thread_counts, bandwidth, peak, log)
        proj = projection_rows(targets, rows, repeats, all_threads, peak.get(all_threads), log)
        prefill = prefill_rows(config, contexts, prefill_queries, repeats, log)
    finally:
        torch.set_num_threads(all_threads)
    passes = pass_rows(attn, proj, len(target.decoder.layers), all_threads)
    table = markdown_table(
        ["context", "query tokens", "threads", "path", "us per layer", "x 1 token", "KV GB/s", "of copy", "GMAC/s",
         "of ceiling"],
        [[r["context"], r["queries"], r["threads"], r["path"], r["us_per_layer"], r["vs_one_query"], r["gbs"],
          f"{r['bandwidth_share']:.0%}", r["gmacs"],
          f"{r['ceiling_share']:.0%}" if r["ceiling_share"] is not None else "-"] for r in attn])
    if passes:
        table += "\n\n" + markdown_table(
            ["context", "query tokens", "attention path", "weights", "attention ms", "projection ms", "pass ms",
             "x 1 token"],
            [[r["context"], r["queries"], r["path"], r["weights"], r["attention_ms"], r["projection_ms"], r["pass_ms"],
              r["vs_one_query"]] for r in passes])
    table += "\n\n" + markdown_table(
        ["weights", "weight MB", "input rows", "ms per pass", "weight GB/s", "GMAC/s", "of ceiling"],
        [[r["weights"], r["mb"], r["rows"], r["ms"], r["gbs"], r["gmacs"],
          f"{r['ceiling_share']:.0%}" if r["ceiling_share"] is not None else "-"] for r in proj])
    table += "\n\n" + markdown_table(
        ["prefill: new tokens after context", "kernel ms per layer", "flash ms per layer", "kernel GMAC/s",
         "flash GMAC/s", "kernel speedup"],
        [[f"{r['new_tokens']} after {r['context']}", r["kernel_ms"], r["flash_ms"], r["kernel_gmacs"],
          r["flash_gmacs"], r["kernel_speedup"]] for r in prefill])
    table += (f"\n\n- copy bandwidth {bandwidth:.1f} GB/s (read+write); attention over {layers} separate "
              f"{config.num_kv_heads}-KV-head caches per pass; projections over {len(target.decoder.layers)} layers")
    if ceiling is not None:
        table += f"\n- {ceiling}"
    log(table)
    report = {"machine": machine(), "copy_bandwidth_gbs": round(bandwidth, 1), "model": target.source,
              "mac_instruction": native.mac_instruction(),
              "mac_peak_gmacs": {str(t): (round(g, 1) if g is not None else None) for t, g in peak.items()},
              "mac_gmacs_by_chains": chains,
              "layers": layers, "attention": attn, "projections": proj, "passes": passes, "prefill": prefill,
              "markdown": table}
    write_report(out, "kernels", report)
    return report
