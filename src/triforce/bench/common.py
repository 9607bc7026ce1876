"""Measurement helpers shared by the benchmarks: bandwidth, medians, peak memory, machine,
timed generation runs and their summaries, perplexity, report files."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..cache import FullCache
from ..engine import Engine
from ..loading import LoadedModel, load_draft
from ..model import Decoder, Segment


def copy_bandwidth_gbs(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-N bandwidth of a large memory copy, counting bytes read plus bytes written."""
    src = torch.empty(size_bytes, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * size_bytes / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
    }


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def write_report(out: Path | None, name: str, report: dict[str, Any]) -> None:
    """<out>/<name>.json (everything) and <out>/<name>.md (the report's "markdown")."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(report["markdown"] + "\n")


def load_drafts(specs: list[str], target: LoadedModel) -> dict[str, Any]:
    """Each --drafts entry loaded: "ngram" stays a name, anything else is a draft model or head path."""
    return {d: load_draft(d, target) for d in specs}


def prefill(engine: Engine, ids: list[int]) -> float:
    """Fill the engine's prompt cache with `ids` (every later run reuses it); seconds taken."""
    t0 = time.perf_counter()
    engine.generate(ids, max_new_tokens=1)
    return time.perf_counter() - t0


def time_per_level(stats: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per generated token spent in each level (and in retrieval rebuilds)."""
    n = max(1, stats["new_tokens"])
    out = {}
    for level in stats["levels"]:
        out[level["name"]] = round(1000 * level["time_s"] / n, 2)
        if level.get("rebuilds"):
            out["rebuild"] = round(1000 * level["rebuild_s"] / n, 2)
    return out


def measure(engine: Engine, ids: list[int], new_tokens: int, temperature: float, seed: int,
            reference: list[int] | None = None) -> dict[str, Any]:
    """One timed run of the engine's current method (top-p 0.9 when sampling, EOS ignored).
    With a greedy `reference` (autoregressive tokens), records whether the run reproduced it."""
    result = engine.generate(ids, max_new_tokens=new_tokens, temperature=temperature,
                             top_p=0.9 if temperature > 0 else 1.0, seed=seed, ignore_eos=True)
    s = result.stats
    read = sum(level.get("mb_per_pass", 0) * level["forward_calls"] for level in s["levels"])
    return {
        "ms_per_token": s["ms_per_token"], "tokens_per_s": s["tokens_per_s"], "levels": s["levels"],
        "mb_per_token": round(read / max(1, s["new_tokens"]), 2),
        "plain_fraction": s["controller"]["plain_fraction"] if "controller" in s else None,
        "acceptance": [lv.get("draft_acceptance_rate") for lv in s["levels"][:-1]],
        "time_per_level": time_per_level(s), "tokens": result.token_ids,
        "same_as_autoregressive": (result.token_ids == reference) if temperature == 0 and reference else None,
        **({"kv_offload": s["kv_offload"]} if "kv_offload" in s else {}),
    }


def summarize(entries: list[dict[str, Any]], baseline_ms: float | None) -> dict[str, Any]:
    """Medians over repeats of one configuration; speedup over `baseline_ms`; exact when every
    greedy run reproduced the autoregressive tokens (None when not checked)."""
    ms = median([e["ms_per_token"] for e in entries])
    checks = [e["same_as_autoregressive"] for e in entries]
    return {
        "ms_per_token": round(ms, 2), "tokens_per_s": round(1000 / ms, 2) if ms > 0 else None,
        "speedup": round(baseline_ms / ms, 2) if baseline_ms and ms > 0 else None,
        "acceptance": [round(median([e["acceptance"][i] or 0.0 for e in entries]), 4)
                       for i in range(len(entries[0]["acceptance"]))],
        "time_per_level": entries[len(entries) // 2]["time_per_level"],
        "exact": None if any(c is None for c in checks) else all(checks),
        **(_bytes(entries, ms) if "mb_per_token" in entries[0] else {}),
        **({"plain_fraction": round(median([e["plain_fraction"] for e in entries]), 3)}
           if entries[0].get("plain_fraction") is not None else {}),
    }


def _bytes(entries: list[dict[str, Any]], ms: float) -> dict[str, float]:
    """Median MB read per generated token, and that over the median time: GB/s."""
    mb = median([e["mb_per_token"] for e in entries])
    return {"mb_per_token": round(mb, 1), "gbs": round(mb / ms, 1)}


def nll_of_last(decoder: Decoder, ids: list[int], last: int, chunk: int = 1024) -> float:
    """Mean NLL of ids[-last:] given everything before them (one chunked prefill, teacher-forced)."""
    n = len(ids)
    decoder.prepare(n)
    cache = FullCache(decoder.config, n, dtype=decoder.dtype, device=decoder.device)
    body_end = n - last - 1
    for start in range(0, body_end, chunk):
        piece = ids[start : min(start + chunk, body_end)]
        decoder.forward([Segment(torch.tensor(piece), cache)])
    tail = torch.tensor(ids[body_end:-1])  # positions predicting ids[-last:]
    logits = decoder.forward([Segment(tail, cache, len(tail))])[0]
    targets = torch.tensor(ids[-last:])
    return float(torch.nn.functional.cross_entropy(logits, targets))


def perplexity(decoder: Decoder, ids: list[int], last: int) -> float:
    return round(math.exp(nll_of_last(decoder, ids, last)), 3)


def yes_no(flag: bool | None) -> str:
    return {None: "-", True: "yes", False: "NO"}[flag]


def exactness_note(dtype: torch.dtype, flags: list[bool | None]) -> list[str]:
    """A loud line when a lossless method's greedy tokens differed from autoregressive: in fp32
    and in bf16 alike that is a bug (verification rounds every row as one-token decoding does)."""
    if not any(f is False for f in flags):
        return []
    name = str(dtype).removeprefix("torch.")
    return [f"BUG: a lossless method's greedy tokens differed from autoregressive ({name}); please report it"]
