"""`triforce bench gamma`: speed and acceptance across speculation lengths (the paper's gamma study).

At one context: `speculative` (draft -> target) for each gamma in --gammas, and `triforce`
(draft -> target on a retrieval cache -> target) for each gamma (tokens per full verification)
and draft gamma (tokens the bottom drafts per middle step) in --draft-gammas, against
autoregressive decoding. One prefill, repeats interleaved, medians; greedy runs must reproduce
the autoregressive tokens. The paper finds gamma 6 and draft gamma 1-2 best on a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..corpus import document_tokens
from ..engine import Engine
from ..errors import TriforceError
from ..loading import default_draft, load
from ..settings import EngineSettings
from .common import (
    exactness_note,
    load_drafts,
    machine,
    markdown_table,
    measure,
    median,
    prefill,
    summarize,
    write_report,
    yes_no,
)
from .plots import line_plot
from .quick import TINY_DRAFT, TINY_TARGET

DEFAULTS: dict[str, Any] = dict(
    context=16384, gammas=[2, 4, 6, 8, 10], draft_gammas=[1, 2, 3, 4], new_tokens=128, temperature=0.0, draft=None,
    repeats=1, budget=4096, chunk_size=8, document="vim", model=None, dtype="bf16",
)
QUICK: dict[str, Any] = dict(context=512, gammas=[2, 4], draft_gammas=[1, 2], new_tokens=16, draft=TINY_DRAFT,
                             budget=128, model=TINY_TARGET, dtype="fp32")

Config = tuple[str, int | None, int | None]  # (method, gamma, draft gamma)


def configs(gammas: list[int], draft_gammas: list[int]) -> list[Config]:
    return ([("autoregressive", None, None)] + [("speculative", g, None) for g in gammas]
            + [("triforce", g, dg) for g in gammas for dg in draft_gammas])


def name_of(config: Config) -> str:
    method, gamma, draft_gamma = config
    return method + (f" g={gamma}" if gamma else "") + (f" dg={draft_gamma}" if draft_gamma else "")


def validate(gammas: list[int], draft_gammas: list[int], temperature: float) -> None:
    if math.isnan(temperature) or temperature < 0:
        raise TriforceError(f"temperature must be a number >= 0, got {temperature}")
    if min(gammas + draft_gammas) < 1:
        raise TriforceError("gammas and draft gammas must be positive")


def run(
    context: int = 16384,
    gammas: list[int] | None = None,
    draft_gammas: list[int] | None = None,
    new_tokens: int = 128,
    temperature: float = 0.0,
    draft: str | None = None,
    repeats: int = 1,
    budget: int = 4096,
    chunk_size: int = 8,
    document: str = "vim",
    model: str | None = None,
    dtype: str = "bf16",
    out: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    gammas = sorted(set(gammas or DEFAULTS["gammas"]))
    draft_gammas = sorted(set(draft_gammas or DEFAULTS["draft_gammas"]))
    validate(gammas, draft_gammas, temperature)
    target = load(model, dtype=dtype)
    draft = draft or default_draft(target)
    drafter = load_drafts([draft], target)[draft]
    ids = document_tokens(target.tokenizer, document, context)
    engine = Engine(target, EngineSettings(draft=drafter, budget=budget, chunk_size=chunk_size))
    prefill_s = prefill(engine, ids)
    log(f"context {context}: prefill {prefill_s:.1f} s; draft {draft}")
    plan = configs(gammas, draft_gammas)
    results: dict[Config, list[dict[str, Any]]] = {c: [] for c in plan}
    for r in range(repeats):
        reference = None
        for config in plan:
            method, gamma, draft_gamma = config
            engine.configure(method=method, gamma=gamma or 1, draft_gamma=draft_gamma or 1)
            entry = measure(engine, ids, new_tokens, temperature, seed=1000 + r, reference=reference)
            if method == "autoregressive":
                reference = entry["tokens"]
                entry["same_as_autoregressive"] = True if temperature == 0 else None
            results[config].append(entry)
            log(f"  r{r} {name_of(config):<22} {entry['ms_per_token']:7.1f} ms/token  acceptance {entry['acceptance']}"
                + ("" if entry["same_as_autoregressive"] in (None, True) else "  MISMATCH"))
    base = median([e["ms_per_token"] for e in results[plan[0]]])
    rows = [{"method": m, "gamma": g, "draft_gamma": dg, **summarize(results[(m, g, dg)], base)} for m, g, dg in plan]
    table = markdown_table(
        ["method", "gamma", "draft gamma", "ms/token", "tokens/s", "speedup", "acceptance (bottom..)", "exact"],
        [[r["method"], r["gamma"] or "-", r["draft_gamma"] or "-", r["ms_per_token"], r["tokens_per_s"], r["speedup"],
          ", ".join(f"{a:.3f}" for a in r["acceptance"]) or "-", yes_no(r["exact"])] for r in rows])
    notes = exactness_note(target.decoder.dtype, [r["exact"] for r in rows]) + plot_gamma(rows, out)
    if notes:
        table += "\n\n" + "\n".join(f"- {n}" for n in notes)
    log(table)
    report = {
        "machine": machine(), "model": target.source, "dtype": str(target.decoder.dtype).removeprefix("torch."),
        "draft": draft, "document": document, "context": context, "new_tokens": new_tokens,
        "temperature": temperature, "repeats": repeats, "budget": budget, "chunk_size": chunk_size,
        "prefill_s": round(prefill_s, 2), "rows": rows, "notes": notes, "markdown": table,
    }
    write_report(out, "gamma", report)
    return report


def plot_gamma(rows: list[dict[str, Any]], out: Path | None) -> list[str]:
    """gamma_tokens_per_s.png (autoregressive as a dashed line) and gamma_acceptance.png (the
    acceptance of the level the full target verifies)."""
    if out is None:
        return []
    speed: dict[str, list[tuple[float, float | None]]] = {}
    accept: dict[str, list[tuple[float, float | None]]] = {}
    for r in rows:
        if r["method"] == "autoregressive":
            continue
        name = r["method"] + (f" draft gamma {r['draft_gamma']}" if r["draft_gamma"] else "")
        speed.setdefault(name, []).append((r["gamma"], r["tokens_per_s"]))
        accept.setdefault(name, []).append((r["gamma"], r["acceptance"][-1] if r["acceptance"] else None))
    note = line_plot(out / "gamma_tokens_per_s.png", speed, "decoding speed vs gamma", "gamma (tokens per full "
                     "verification)", "tokens/s", hline=rows[0]["tokens_per_s"])
    if note:
        return [note]
    line_plot(out / "gamma_acceptance.png", accept, "acceptance by the full target vs gamma", "gamma",
              "acceptance rate")
    return []
