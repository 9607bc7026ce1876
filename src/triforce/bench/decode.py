"""`triforce bench decode`: every decoding method side by side on real long documents.

One process, one prefill per context (the prompt cache serves every method after the first),
repeats interleaved across methods, medians. Greedy runs check that every method produced the
autoregressive tokens. Per-level acceptance and where the time goes are kept for every run.

Per context, the target's perplexity on the document's true continuation (the next
`ppl_tokens` tokens after the prompt, teacher-forced through our decoder), next to its
perplexity on the same tokens given only the last 1K tokens (half the context if shorter): where
the two are close, the model no longer reads its context, and speed figures there describe a
model that is not doing the job.

Peers (`--peers`, see peers.py) run the same prompts with the same settings: transformers
generate, assisted generation and prompt lookup; llama.cpp plain and with prompt lookup (when
llama-cpp-python is installed: `pip install llama-cpp-python`, which builds from source in a few
minutes). Speedups are reported over our autoregressive decoding and over transformers generate.
PNG plots of speedup against context length go to the output directory (matplotlib).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ..corpus import document_tokens
from ..engine import Engine
from ..errors import TriforceError
from ..formats import FORMATS, WEIGHTS
from ..head import is_head_directory
from ..loading import LoadedModel, load
from ..offload import KVFile, aligned_zeros, check_directory, wait
from ..rope import resolve_scaling
from ..settings import METHODS, EngineSettings, method_needs_draft
from . import peers as peer_engines
from .common import (
    copy_bandwidth_gbs,
    exactness_note,
    load_drafts,
    machine,
    markdown_table,
    measure,
    median,
    peak_rss_mb,
    perplexity,
    prefill,
    summarize,
    write_report,
    yes_no,
)
from .plots import line_plot
from .quick import TINY_DRAFT, TINY_TARGET

LOSSLESS = ("autoregressive", "speculative", "retrieval", "streaming", "triforce")
SHORT_WINDOW = 1024  # the perplexity baseline: the same tokens given only this much context

DEFAULTS: dict[str, Any] = dict(
    contexts=[16384, 32768], new_tokens=128, temperatures=[0.0, 0.6],
    methods=["autoregressive", "retrieval", "streaming", "speculative", "triforce"], drafts=["ngram"], repeats=1,
    document="vim", peers=["auto"], ppl_tokens=128, model=None, dtype="bf16", knobs={}, bandwidth_bytes=1 << 30,
    weights=["auto"], retrieval_weights=["model"], sweep=None, kv_offload=None, kv_ram_budget=None,
)
QUICK: dict[str, Any] = dict(contexts=[256, 512], new_tokens=16, drafts=["ngram", TINY_DRAFT], ppl_tokens=32,
                             model=TINY_TARGET, dtype="fp32", knobs={"budget": 128}, bandwidth_bytes=1 << 24)


# method, draft, weights of the retrieval level, and fixed (gamma, draft gamma), or None for the
# settings' own (adaptive by default)
Combo = tuple[str, str | None, str, tuple[int, int | None] | None]


def variants(methods: list[str], drafts: list[str], retrieval_weights: list[str] | None = None,
             sweep: list[tuple[int, int]] | None = None) -> list[Combo]:
    """Methods with a bottom level run once per draft, those with a retrieval level once per
    retrieval weights, and those that speculate also at each fixed (gamma, draft gamma) of the
    sweep (draft gamma only where a middle level uses it)."""
    out: list[Combo] = []
    for method in methods:
        levels = METHODS[method]
        for draft in drafts if method_needs_draft(method) else [None]:
            has_retrieval = any(spec.cache == "retrieval" for spec in levels)
            for rw in (retrieval_weights or ["model"]) if has_retrieval else ["model"]:
                out.append((method, draft, rw, None))
                fixed = {(g, d if len(levels) > 1 else None) for g, d in sweep or []} if levels else set()
                out += [(method, draft, rw, f) for f in sorted(fixed, key=lambda f: (f[0], f[1] or 0))]
    return out


def label(method: str, draft: str | None, retrieval_weights: str = "model",
          fixed: tuple[int, int | None] | None = None, weights: str | None = None) -> str:
    kind = "ngram" if draft == "ngram" else ("head" if draft and is_head_directory(draft) else "draft")
    name = method if draft is None else f"{method}[{kind}]"
    if retrieval_weights != "model":
        name += f" middle {retrieval_weights}"
    if fixed is not None:
        name += f" g{fixed[0]}" + (f"/{fixed[1]}" if fixed[1] else "")
    return name if weights is None else f"{name} @{weights}"


def parse_sweep(text: str | None) -> list[tuple[int, int]]:
    """"4/2,6/2,8/3": (gamma, draft gamma) pairs."""
    out = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        gamma, _, draft = item.partition("/")
        try:
            pair = (int(gamma), int(draft or 2))
        except ValueError:
            raise TriforceError(f"--sweep takes GAMMA/DRAFT_GAMMA pairs like 4/2,6/2, got {item!r}") from None
        if min(pair) < 1:
            raise TriforceError(f"--sweep gammas must be >= 1, got {item!r}")
        out.append(pair)
    return out


def validate(contexts: list[int], methods: list[str], temperatures: list[float], peers: list[str],
             weights: list[str] | None = None, retrieval_weights: list[str] | None = None,
             sweep: str | None = None, kv_offload: str | None = None, kv_ram_budget: int | None = None) -> list[str]:
    """Refuse bad settings before anything is loaded; returns the peers to run."""
    parse_sweep(sweep)
    if (kv_ram_budget is None) != (kv_offload is None):
        raise TriforceError("--kv-offload DIR and --kv-ram-budget SIZE go together here: a cache within the "
                            "default budget would stay in RAM")
    if kv_offload is not None:
        check_directory(kv_offload)
    for w in weights or []:
        if w not in WEIGHTS:
            raise TriforceError(f"unknown --weights {w!r}; choose from {', '.join(WEIGHTS)}")
    for w in retrieval_weights or []:
        if w != "model" and w not in FORMATS:
            raise TriforceError(f"unknown --retrieval-weights {w!r}; choose from model, {', '.join(FORMATS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TriforceError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not methods:
        raise TriforceError("no methods to run")
    if min(contexts) < 2:
        raise TriforceError(f"contexts must be at least 2 tokens, got {min(contexts)}")
    if any(math.isnan(t) or t < 0 for t in temperatures):
        raise TriforceError("temperatures must be numbers >= 0")
    return peer_engines.parse(peers)


def context_perplexity(target: LoadedModel, document: str, context: int, tokens: int) -> dict[str, Any]:
    """Perplexity of the `tokens` document tokens that follow the first `context`, given all of
    them and given only the last SHORT_WINDOW."""
    if tokens == 0:
        return {}
    ids = document_tokens(target.tokenizer, document, context + tokens)
    window = min(SHORT_WINDOW, context // 2)
    return {"perplexity": perplexity(target.decoder, ids, tokens),
            "perplexity_short": perplexity(target.decoder, ids[-(window + tokens):], tokens), "short_window": window}


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
    peers: list[str] | None = None,
    ppl_tokens: int = 128,
    model: str | None = None,
    dtype: str = "bf16",
    bandwidth_bytes: int = 1 << 30,
    weights: list[str] | None = None,
    retrieval_weights: list[str] | None = None,
    sweep: str | None = None,
    kv_offload: str | None = None,
    kv_ram_budget: int | None = None,
) -> dict[str, Any]:
    """Every method (and draft, retrieval weights, fixed gammas of the sweep) on each context
    of each document (`document` may list several, comma-separated); with several `weights`,
    each is its own target, prefilled apart, and speedups are over the first one's
    autoregressive decoding. With a sweep, a table and heat maps set each adaptive row against
    plain decoding and the best fixed setting of the same method in the same cell. With
    `kv_offload`, every method runs again with the target's cache on disk beyond `kv_ram_budget`
    (rows labelled "kv on disk", each method with its own cache planned for its own levels),
    beside the same in RAM, and the notes give the disk traffic against the device's direct-I/O
    read rate measured in the run."""
    temperatures = temperatures if temperatures is not None else [0.0, 0.6]
    methods = methods or list(LOSSLESS)
    drafts = drafts or ["ngram"]
    knobs = knobs or {}
    weights = weights or ["auto"]
    peer_names = validate(contexts, methods, temperatures, peers or [], weights, retrieval_weights, sweep,
                          kv_offload, kv_ram_budget)
    placements = ["ram", "disk"] if kv_offload else ["ram"]
    offload = {"kv_offload": kv_offload, "kv_ram_budget": kv_ram_budget}
    documents = [d.strip() for d in document.split(",") if d.strip()]
    bandwidth = copy_bandwidth_gbs(bandwidth_bytes)
    targets = {w: load(model, dtype=dtype, weights=w) for w in weights} if target is None else {weights[0]: target}
    target = targets[weights[0]]
    draft_models = load_drafts(drafts, target)
    draft_dir = next((d for d in drafts if d != "ngram"), None)
    lookup_gamma = knobs.get("gamma") if isinstance(knobs.get("gamma"), int) else 6
    runners, notes = peer_engines.start(peer_names, model, target.decoder.dtype, draft_dir, lookup_gamma,
                                        log, auto=peers == ["auto"])
    combos = sorted(variants(methods, drafts, retrieval_weights, parse_sweep(sweep)),
                    key=lambda c: c[0] != "autoregressive")
    default_gammas = {"gamma": knobs.get("gamma", "auto"), "draft_gamma": knobs.get("draft_gamma", "auto")}
    suffix = len(targets) > 1

    def name_of(combo: Combo, w: str, placement: str = "ram") -> str:
        return label(*combo, weights=w if suffix else None) + (" kv on disk" if placement == "disk" else "")

    names = [name_of(c, w, p) for w in targets for p in placements for c in combos] + list(runners)
    if kv_offload:
        device_gbs = direct_read_gbs(kv_offload)
        log(f"direct-I/O read rate of {kv_offload}: {device_gbs:.2f} GB/s")
    raw: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    per_context: list[dict[str, Any]] = []
    for document, ctx in ((d, c) for d in documents for c in contexts):
        ids = document_tokens(target.tokenizer, document, ctx)
        reading = context_perplexity(target, document, ctx, ppl_tokens)
        scaling = resolve_scaling(target.config, target.decoder.rope_override, ctx + new_tokens)
        engines = {w: Engine(t, EngineSettings(**knobs)) for w, t in targets.items()}
        prefill_s = median([prefill(engine, ids) for engine in engines.values()])
        on_disk: dict[tuple[str, str], Engine] = {}  # per weights and method: a cache planned for its levels

        per_context.append({"document": document, "context": ctx, "prefill_s": round(prefill_s, 2), **reading})
        log(f"context {ctx}: prefill {prefill_s:.1f} s" + (
            f", perplexity of the next {ppl_tokens} tokens {reading['perplexity']} (given only the last "
            f"{reading['short_window']}: {reading['perplexity_short']})" if reading else ""))
        results: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for r in range(repeats):
            for temp in temperatures:
                references: dict[str, list[int]] = {}  # each weights' own autoregressive tokens (in RAM)
                for (method, draft, rw, fixed), w, where in ((c, w, p) for w in targets for p in placements
                                                             for c in combos):
                    if where == "disk" and (w, method) not in on_disk:
                        on_disk[w, method] = Engine(targets[w], EngineSettings(
                            **knobs, **offload, method=method, draft=draft_models[draft] if draft else None))
                        seconds = prefill(on_disk[w, method], ids)
                        log(f"context {ctx}: prefill with the cache on disk ({method}) {seconds:.1f} s")
                    engine = engines[w] if where == "ram" else on_disk[w, method]
                    gammas = default_gammas if fixed is None else {
                        "gamma": fixed[0], "draft_gamma": fixed[1] or default_gammas["draft_gamma"]}
                    engine.configure(method=method, draft=draft_models[draft] if draft else None, retrieval_weights=rw,
                                     **gammas)
                    entry = measure(engine, ids, new_tokens, temp, seed=1000 + r, reference=references.get(w))
                    if method == "autoregressive" and where == "ram":
                        references[w] = entry["tokens"]
                        entry["same_as_autoregressive"] = True if temp == 0 else None
                    entry.update(document=document, context=ctx, repeat=r, temperature=temp,
                                 method=name_of((method, draft, rw, fixed), w, where), engine="triforce", weights=w)
                    raw.append(entry)
                    results.setdefault((entry["method"], temp), []).append(entry)
                    log(f"  ctx {ctx} T={temp} r{r} {entry['method']:<22} {entry['ms_per_token']:7.1f} ms/token  "
                        f"acceptance {entry['acceptance']}  ms/token by level {entry['time_per_level']}"
                        + ("" if entry["same_as_autoregressive"] in (None, True) else "  MISMATCH"))
                for name, peer in runners.items():
                    entry = measure_peer(name, peer, ids, new_tokens, temp, 1000 + r, scaling, references[weights[0]])
                    entry.update(document=document, context=ctx, repeat=r)
                    raw.append(entry)
                    results.setdefault((name, temp), []).append(entry)
                    log(f"  ctx {ctx} T={temp} r{r} {name:<22} {entry['ms_per_token']:7.1f} ms/token  "
                        f"prefill {entry['prefill_s']:.1f} s" + ("" if entry["same_as_autoregressive"] in (None, True)
                                                                  else f"  differs after {entry['matching_prefix']}"))
        for temp in temperatures:
            summary += summary_rows(results, names, temp, {"document": document, "context": ctx,
                                                           "prefill_s": round(prefill_s, 1), **reading})
        for engine in on_disk.values():
            engine.release()
        if kv_offload:
            notes += disk_notes(results, document, ctx, device_gbs)
    table = markdown(summary, per_context, ppl_tokens)
    grid = adaptive_grid(summary, combos, name_of, weights[0]) if sweep else []
    if grid:
        table += "\n\n" + markdown_table(
            ["document", "context", "T", "adaptive", "ms/token", "vs plain", "best fixed", "its ms/token",
             "vs best fixed", "plain decoding chosen"],
            [[g["document"], g["context"], g["temperature"], g["method"], g["ms_per_token"], g["vs_plain"],
              g["best_fixed"], g["best_fixed_ms"], g["vs_best_fixed"], g["plain_fraction"]] for g in grid])
        notes += plot_grid(grid, out)
    notes += exactness_note(target.decoder.dtype, [r["exact"] for r in summary if r["engine"] == "triforce"])
    notes += plot_speedups(summary, temperatures, out)
    if notes:
        table += "\n\n" + "\n".join(f"- {n}" for n in notes)
    log(table)
    report = {
        "machine": machine(), "kernels": target.decoder.kernels, "copy_bandwidth_gbs": round(bandwidth, 1),
        "model": target.source, "document": document,
        "grid": grid,
        "dtype": str(target.decoder.dtype).removeprefix("torch."), "new_tokens": new_tokens, "repeats": repeats,
        "knobs": knobs, "ppl_tokens": ppl_tokens, "peers": list(runners), "notes": notes,
        "peak_rss_mb": round(peak_rss_mb(), 1), "contexts": per_context, "summary": summary, "raw": raw,
        "markdown": table,
    }
    write_report(out, "decode", report)
    return report


def direct_read_gbs(directory: str, nbytes: int = 512 << 20) -> float:
    """The device's sequential direct-I/O read rate under `directory` (GB/s), as the offloaded
    cache reads: a file written, then read back in IO_PIECE requests on IO_THREADS threads (the
    best of three reads)."""

    rows = nbytes // 4096
    file = KVFile(directory, 1, 1, rows // 2, 4096)
    buffers = (aligned_zeros((1, rows // 2, 2048), torch.bfloat16), aligned_zeros((1, rows // 2, 2048), torch.bfloat16))
    try:
        wait(file.write(0, buffers, 0, rows // 2, 0))
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            wait(file.read(0, buffers, 0, rows // 2))
            best = min(best, time.perf_counter() - t0)
        return nbytes / 1e9 / best
    finally:
        file.close()


def disk_notes(results: dict[tuple[str, float], list[dict[str, Any]]], document: str, ctx: int,
               device_gbs: float) -> list[str]:
    """Per method run with the cache on disk: MB read from the file per token and the rate achieved."""
    notes = []
    for (name, temp), entries in sorted(results.items()):
        kv = [e["kv_offload"] for e in entries if e.get("kv_offload")]
        if not kv:
            continue
        rate = median([k["read_gbs"] or 0.0 for k in kv])
        notes.append(f"{document} {ctx} T {temp} {name}: {median([k['read_mb_per_token'] for k in kv]):.0f} MB read "
                     f"from disk per token at {rate:.2f} GB/s ({rate / device_gbs:.0%} of the device's "
                     f"{device_gbs:.2f} GB/s), {kv[0]['ram_mb']:.0f} MB of its KV in RAM (whole layers: "
                     f"{kv[0]['layers_in_ram']})")
    return notes


def adaptive_grid(summary: list[dict[str, Any]], combos: list[Combo], name_of: Any,
                  weights: str) -> list[dict[str, Any]]:
    """Per document, context and temperature, each adaptive row against plain decoding and the
    best fixed setting of the same method, draft and retrieval weights."""
    rows = {(r["document"], r["context"], r["temperature"], r["method"]): r for r in summary}
    cells = sorted({k[:3] for k in rows}, key=lambda k: (k[0], k[1], k[2]))
    plain_name = name_of(("autoregressive", None, "model", None), weights)
    grid = []
    for cell in cells:
        plain = rows.get((*cell, plain_name))
        for method, draft, rw, fixed in combos:
            if fixed is not None or method == "autoregressive":
                continue
            auto = rows.get((*cell, name_of((method, draft, rw, None), weights)))
            static = [rows[key] for f in (c[3] for c in combos if c[:3] == (method, draft, rw) and c[3])
                      if (key := (*cell, name_of((method, draft, rw, f), weights))) in rows]
            if auto is None or plain is None or not static:
                continue
            best = min(static, key=lambda r: r["ms_per_token"])
            grid.append({"document": cell[0], "context": cell[1], "temperature": cell[2], "method": auto["method"],
                         "ms_per_token": auto["ms_per_token"],
                         "vs_plain": round(plain["ms_per_token"] / auto["ms_per_token"], 2),
                         "best_fixed": best["method"], "best_fixed_ms": best["ms_per_token"],
                         "vs_best_fixed": round(best["ms_per_token"] / auto["ms_per_token"], 2),
                         "plain_fraction": auto.get("plain_fraction")})
    return grid


def plot_grid(grid: list[dict[str, Any]], out: Path | None) -> list[str]:
    """decode_adaptive_<document>.png: per adaptive method, its speed-up over plain decoding by
    context (rows) and temperature (columns)."""
    if out is None or not grid:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["heat maps skipped: matplotlib is not installed (pip install matplotlib)"]
    out.mkdir(parents=True, exist_ok=True)
    for document in sorted({g["document"] for g in grid}):
        mine = [g for g in grid if g["document"] == document]
        methods = sorted({g["method"] for g in mine})
        contexts = sorted({g["context"] for g in mine})
        temps = sorted({g["temperature"] for g in mine})
        fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 0.6 * len(contexts) + 1.6),
                                 squeeze=False)
        for ax, method in zip(axes[0], methods):
            cell = {(g["context"], g["temperature"]): g["vs_plain"] for g in mine if g["method"] == method}
            values = [[cell.get((c, t), float("nan")) for t in temps] for c in contexts]
            ax.imshow(values, cmap="RdYlGn", vmin=0.5, vmax=1.5, aspect="auto")
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}x", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(temps)), [f"T {t:g}" for t in temps])
            ax.set_yticks(range(len(contexts)), [str(c) for c in contexts])
            ax.set_title(method, fontsize=9)
        fig.suptitle(f"adaptive speculation over plain decoding ({document})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"decode_adaptive_{document.replace('/', '_')}.png", dpi=110)
        plt.close(fig)
    return []


def measure_peer(name: str, peer: peer_engines.Peer, ids: list[int], new_tokens: int, temperature: float,
                 seed: int, scaling: dict[str, Any] | None, reference: list[int] | None) -> dict[str, Any]:
    """One run of a peer engine, as a raw entry like ours (greedy: compared with our tokens)."""
    done = peer.generate(ids, new_tokens, temperature, 0.9 if temperature > 0 else 1.0, seed, scaling)
    same = (done.tokens == reference) if temperature == 0 and reference else None
    return {"temperature": temperature, "method": name, "engine": peer_engines.engine_of(name),
            "ms_per_token": round(done.ms_per_token, 3), "prefill_s": round(done.prefill_s, 3), "acceptance": [],
            "time_per_level": {}, "tokens": done.tokens, "same_as_autoregressive": same,
            "matching_prefix": matching_prefix(done.tokens, reference) if same is not None else None}


def summary_rows(results: dict[tuple[str, float], list[dict[str, Any]]], names: list[str], temperature: float,
                 common: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method or peer at one context and temperature: medians, speedups over our
    autoregressive decoding and over transformers generate."""
    def ms(name: str) -> float | None:
        entries = results.get((name, temperature))
        return median([e["ms_per_token"] for e in entries]) if entries else None

    base, hf = ms(names[0]), ms("hf")  # names[0]: autoregressive on the first weights
    rows = []
    for name in names:
        entries = results[(name, temperature)]
        row = {"temperature": temperature, "method": name, "engine": entries[0]["engine"], **common,
               **summarize(entries, base)}
        mine = ms(name)  # unrounded, as `summarize` does: a sub-ms tiny-model row rounded first drifts off 1.0
        row["speedup_vs_hf"] = round(hf / mine, 2) if hf and mine else None
        if entries[0].get("matching_prefix") is not None:
            row["matching_prefix"] = min(e["matching_prefix"] for e in entries)
        rows.append(row)
    return rows


def markdown(summary: list[dict[str, Any]], per_context: list[dict[str, Any]], ppl_tokens: int) -> str:
    def same(r: dict[str, Any]) -> str:
        return yes_no(r["exact"]) + (f" (first {r['matching_prefix']})" if r["exact"] is False and
                                     "matching_prefix" in r else "")

    table = markdown_table(
        ["document", "context", "T", "method", "engine", "ms/token", "tokens/s", "speedup", "vs hf", "MB/token", "GB/s",
         "acceptance (bottom..)", "ms/token by level", "same tokens as autoregressive"],
        [[r["document"], r["context"], r["temperature"], r["method"], r["engine"], r["ms_per_token"], r["tokens_per_s"],
          r["speedup"], r["speedup_vs_hf"] or "-", r.get("mb_per_token", "-"), r.get("gbs", "-"),
          ", ".join(f"{a:.3f}" for a in r["acceptance"]) or "-",
          ", ".join(f"{k} {v}" for k, v in r["time_per_level"].items()) or "-", same(r)] for r in summary])
    if ppl_tokens:
        table += "\n\n" + markdown_table(
            ["document", "context", "prefill s", f"perplexity of the next {ppl_tokens} tokens",
             "same, given only a short window", "short window"],
            [[c["document"], c["context"], c["prefill_s"], c["perplexity"], c["perplexity_short"], c["short_window"]]
             for c in per_context])
    return table


def plot_speedups(summary: list[dict[str, Any]], temperatures: list[float], out: Path | None) -> list[str]:
    """decode_speedup_T<temperature>.png: speedup over our autoregressive against context length."""
    if out is None:
        return []
    for temp in temperatures:
        series: dict[str, list[tuple[float, float | None]]] = {}
        for r in summary:
            if r["temperature"] == temp and r["method"] != summary[0]["method"]:
                series.setdefault(r["method"], []).append((r["context"], r["speedup"]))
        note = line_plot(out / f"decode_speedup_T{temp:g}.png", series, f"speedup over autoregressive, T={temp:g}",
                         "context (tokens)", "speedup (x)", log2_x=True, hline=1.0)
        if note:
            return [note]
    return []
