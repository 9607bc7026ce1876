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
from pathlib import Path
from typing import Any

from ..corpus import document_tokens
from ..engine import Engine
from ..errors import TriforceError
from ..formats import FORMATS, WEIGHTS
from ..loading import LoadedModel, load
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
    weights=["auto"], retrieval_weights=["model"],
)
QUICK: dict[str, Any] = dict(contexts=[256, 512], new_tokens=16, drafts=["ngram", TINY_DRAFT], ppl_tokens=32,
                             model=TINY_TARGET, dtype="fp32", knobs={"budget": 128}, bandwidth_bytes=1 << 24)


Combo = tuple[str, str | None, str]  # method, draft, weights of the retrieval level


def variants(methods: list[str], drafts: list[str], retrieval_weights: list[str] | None = None) -> list[Combo]:
    """(method, draft, retrieval weights): methods with a bottom level run once per draft, those
    with a retrieval level once per retrieval weights."""
    out: list[Combo] = []
    for method in methods:
        for draft in drafts if method_needs_draft(method) else [None]:
            has_retrieval = any(spec.cache == "retrieval" for spec in METHODS[method])
            for rw in (retrieval_weights or ["model"]) if has_retrieval else ["model"]:
                out.append((method, draft, rw))
    return out


def label(method: str, draft: str | None, retrieval_weights: str = "model", weights: str | None = None) -> str:
    name = method if draft is None else f"{method}[{'ngram' if draft == 'ngram' else 'draft'}]"
    if retrieval_weights != "model":
        name += f" middle {retrieval_weights}"
    return name if weights is None else f"{name} @{weights}"


def validate(contexts: list[int], methods: list[str], temperatures: list[float], peers: list[str],
             weights: list[str] | None = None, retrieval_weights: list[str] | None = None) -> list[str]:
    """Refuse bad settings before anything is loaded; returns the peers to run."""
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
) -> dict[str, Any]:
    """Every method (and draft, and retrieval weights) on each context; with several `weights`,
    each is its own target, prefilled apart, and speedups are over the first one's
    autoregressive decoding."""
    temperatures = temperatures if temperatures is not None else [0.0, 0.6]
    methods = methods or list(LOSSLESS)
    drafts = drafts or ["ngram"]
    knobs = knobs or {}
    weights = weights or ["auto"]
    peer_names = validate(contexts, methods, temperatures, peers or [], weights, retrieval_weights)
    bandwidth = copy_bandwidth_gbs(bandwidth_bytes)
    targets = {w: load(model, dtype=dtype, weights=w) for w in weights} if target is None else {weights[0]: target}
    target = targets[weights[0]]
    draft_models = load_drafts(drafts, target)
    draft_dir = next((d for d in drafts if d != "ngram"), None)
    runners, notes = peer_engines.start(peer_names, model, target.decoder.dtype, draft_dir, knobs.get("gamma", 6),
                                        log, auto=peers == ["auto"])
    combos = sorted(variants(methods, drafts, retrieval_weights), key=lambda c: c[0] != "autoregressive")
    suffix = len(targets) > 1

    def name_of(combo: Combo, w: str) -> str:
        return label(*combo, weights=w if suffix else None)

    names = [name_of(c, w) for w in targets for c in combos] + list(runners)
    raw: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    per_context: list[dict[str, Any]] = []
    for ctx in contexts:
        ids = document_tokens(target.tokenizer, document, ctx)
        reading = context_perplexity(target, document, ctx, ppl_tokens)
        scaling = resolve_scaling(target.config, target.decoder.rope_override, ctx + new_tokens)
        engines = {w: Engine(t, EngineSettings(**knobs)) for w, t in targets.items()}
        prefill_s = median([prefill(engine, ids) for engine in engines.values()])
        per_context.append({"context": ctx, "prefill_s": round(prefill_s, 2), **reading})
        log(f"context {ctx}: prefill {prefill_s:.1f} s" + (
            f", perplexity of the next {ppl_tokens} tokens {reading['perplexity']} (given only the last "
            f"{reading['short_window']}: {reading['perplexity_short']})" if reading else ""))
        results: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for r in range(repeats):
            for temp in temperatures:
                references: dict[str, list[int]] = {}  # each weights' own autoregressive tokens
                for (method, draft, rw), w in ((c, w) for w in targets for c in combos):
                    engine = engines[w]
                    engine.configure(method=method, draft=draft_models[draft] if draft else None, retrieval_weights=rw)
                    entry = measure(engine, ids, new_tokens, temp, seed=1000 + r, reference=references.get(w))
                    if method == "autoregressive":
                        references[w] = entry["tokens"]
                        entry["same_as_autoregressive"] = True if temp == 0 else None
                    entry.update(context=ctx, repeat=r, temperature=temp, method=name_of((method, draft, rw), w),
                                 engine="triforce", weights=w)
                    raw.append(entry)
                    results.setdefault((entry["method"], temp), []).append(entry)
                    log(f"  ctx {ctx} T={temp} r{r} {entry['method']:<22} {entry['ms_per_token']:7.1f} ms/token  "
                        f"acceptance {entry['acceptance']}  ms/token by level {entry['time_per_level']}"
                        + ("" if entry["same_as_autoregressive"] in (None, True) else "  MISMATCH"))
                for name, peer in runners.items():
                    entry = measure_peer(name, peer, ids, new_tokens, temp, 1000 + r, scaling, references[weights[0]])
                    entry.update(context=ctx, repeat=r)
                    raw.append(entry)
                    results.setdefault((name, temp), []).append(entry)
                    log(f"  ctx {ctx} T={temp} r{r} {name:<22} {entry['ms_per_token']:7.1f} ms/token  "
                        f"prefill {entry['prefill_s']:.1f} s" + ("" if entry["same_as_autoregressive"] in (None, True)
                                                                  else f"  differs after {entry['matching_prefix']}"))
        for temp in temperatures:
            summary += summary_rows(results, names, temp, {"context": ctx, "prefill_s": round(prefill_s, 1), **reading})
    table = markdown(summary, per_context, ppl_tokens)
    notes += exactness_note(target.decoder.dtype, [r["exact"] for r in summary if r["engine"] == "triforce"])
    notes += plot_speedups(summary, temperatures, out)
    if notes:
        table += "\n\n" + "\n".join(f"- {n}" for n in notes)
    log(table)
    report = {
        "machine": machine(), "copy_bandwidth_gbs": round(bandwidth, 1), "model": target.source, "document": document,
        "dtype": str(target.decoder.dtype).removeprefix("torch."), "new_tokens": new_tokens, "repeats": repeats,
        "knobs": knobs, "ppl_tokens": ppl_tokens, "peers": list(runners), "notes": notes,
        "peak_rss_mb": round(peak_rss_mb(), 1), "contexts": per_context, "summary": summary, "raw": raw,
        "markdown": table,
    }
    write_report(out, "decode", report)
    return report


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
        ["context", "T", "method", "engine", "ms/token", "tokens/s", "speedup", "vs hf", "MB/token", "GB/s",
         "acceptance (bottom..)", "ms/token by level", "same tokens as autoregressive"],
        [[r["context"], r["temperature"], r["method"], r["engine"], r["ms_per_token"], r["tokens_per_s"],
          r["speedup"], r["speedup_vs_hf"] or "-", r.get("mb_per_token", "-"), r.get("gbs", "-"),
          ", ".join(f"{a:.3f}" for a in r["acceptance"]) or "-",
          ", ".join(f"{k} {v}" for k, v in r["time_per_level"].items()) or "-", same(r)] for r in summary])
    if ppl_tokens:
        table += "\n\n" + markdown_table(
            ["context", "prefill s", f"perplexity of the next {ppl_tokens} tokens", "same, given only a short window",
             "short window"],
            [[c["context"], c["prefill_s"], c["perplexity"], c["perplexity_short"], c["short_window"]]
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
