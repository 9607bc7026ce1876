"""`triforce bench acceptance`: how often the target on a sparse KV cache agrees with the target on
its full cache (the paper's Table 1 and Figure 6, at CPU scale).

At one long context the middle level alone drafts for the full target (greedy, temperature 0):
acceptance = accepted drafts / drafted tokens, `gamma` drafts per verification. Sparse caches:
- retrieval: TriForce's chunk-mean retrieval (cache.RetrievalView), across budgets and, at one
  budget, across chunk sizes;
- streaming: StreamingLLM, `sink` first tokens plus the most recent ones (cache.StreamingView);
- oracle: per layer, KV head and forward pass, the `budget` past positions with the highest exact
  attention weight of the current queries (summed over the heads sharing the KV head): an upper
  bound no real cache can reach, since it reads every key to choose.
Every cache reads `budget` past tokens. Two prompts: the document itself (continuation), and a
needle: a fact sentence hidden inside the document, asked for at the end (the full target's
answer is checked for it). Every run is lossless, so each reproduces the full target's greedy
tokens (checked).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ..attention import KVSlot
from ..cache import FullCache, RetrievalView, SparseView, StreamingView
from ..chain import Chain
from ..corpus import document_tokens
from ..errors import TriforceError
from ..levels import ModelLevel, ViewLevel
from ..loading import LoadedModel, load
from ..runner import Runner
from ..sampling import SamplingParams
from .common import exactness_note, machine, markdown_table, write_report, yes_no
from .plots import line_plot
from .quick import TINY_TARGET

NEEDLE = "\nThe secret passphrase of the lighthouse archive is amber-falcon-7431.\n"
QUESTION = ("\n\nQuestion: what is the secret passphrase of the lighthouse archive?\n"
            "Answer: The secret passphrase of the lighthouse archive is")
ANSWER = "amber-falcon-7431"
CACHES = ("retrieval", "streaming", "oracle")

DEFAULTS: dict[str, Any] = dict(
    context=16384, budgets=[256, 512, 1024, 2048, 4096], chunk_sizes=[1, 8, 16, 32, 64], chunk_budget=4096,
    chunk_size=8, gamma=6, new_tokens=64, document="vim", needle_depth=0.5, sink=16, model=None, dtype="bf16",
)
QUICK: dict[str, Any] = dict(context=512, budgets=[64, 128, 384], chunk_sizes=[1, 8, 16], chunk_budget=128, gamma=4,
                             new_tokens=16, model=TINY_TARGET, dtype="fp32")


class OracleView(SparseView):
    """Each query reads the `budget` past rows with the most exact attention weight (per layer
    and KV head, summed over its query heads and the queries of the forward pass), plus the rows
    being written. It scores every key to choose: a bound, not a cache to deploy."""

    def __init__(self, full: FullCache, budget: int) -> None:
        super().__init__(full)
        self.budget = budget

    def slot(self, layer: int) -> KVSlot:
        slot = super().slot(layer)
        row = slot.row
        if row <= self.budget:
            return slot
        cfg, k = self.full.config, slot.k

        def choose(q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
            T = q.shape[0]
            qg = q.float().view(T, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
            logits = torch.einsum("thgd,hrd->hgtr", qg, k[:, :row].float()) * cfg.head_dim**-0.5
            weight = logits.softmax(-1).sum((1, 2))  # [Hkv, row]
            rows = weight.topk(self.budget, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
            return rows, 1, row

        slot.choose = choose
        return slot


def make_view(kind: str, full: FullCache, budget: int, chunk_size: int, sink: int) -> SparseView:
    if kind == "retrieval":
        return RetrievalView(full, budget, chunk_size)
    if kind == "streaming":
        sink = min(sink, budget // 2)
        return StreamingView(full, sink, budget - sink)
    return OracleView(full, budget)


def needle_prompt(target: LoadedModel, document: str, context: int, depth: float) -> list[int]:
    """`context` tokens: the document with NEEDLE inserted at `depth` (0..1), then QUESTION."""
    tok = target.tokenizer
    needle = tok.encode(NEEDLE, add_special_tokens=False)
    question = tok.encode(QUESTION, add_special_tokens=False)
    room = context - len(needle) - len(question)
    if room < 2:
        raise TriforceError(f"a context of {context} tokens cannot hold the needle and the question")
    doc = document_tokens(tok, document, room)
    at = int(room * depth)
    return doc[:at] + needle + doc[at:] + question


class Harness:
    """One prefill of a prompt into the target's full cache; then, per sparse cache, a greedy
    generation where that cache's level drafts for the full target."""

    def __init__(self, target: LoadedModel, ids: list[int], new_tokens: int, gamma: int) -> None:
        self.target, self.ids, self.new_tokens, self.gamma = target, ids, new_tokens, gamma
        dec = target.decoder
        total = len(ids) + new_tokens
        capacity = total + gamma + 16
        dec.prepare(total, capacity)
        self.params = SamplingParams()
        self.full = FullCache(target.config, capacity, dtype=dec.dtype, device=dec.device)
        self.runner = Runner(dec)
        self.top = ModelLevel("target", self.runner, self.full, self.params)
        t0 = time.perf_counter()
        self.top.score(ids, [])
        self.prefill_s = time.perf_counter() - t0

    def generate(self, view: SparseView | None) -> tuple[list[int], dict[str, Any]]:
        """New tokens, and the sparse level's statistics (empty for the full target alone)."""
        top, ids = self.top, self.ids
        top.rollback(len(ids))  # back to the prompt (its KV stays cached)
        self.full.record_queries = isinstance(view, RetrievalView)
        levels = [] if view is None else [ViewLevel(f"target-{type(view).__name__}", self.runner, view, top,
                                                    self.params)]
        chain = Chain([*levels, top], [self.gamma] * len(levels))
        first = int(chain.prefill(ids).argmax())  # re-runs the last prompt token only
        context = ids + [first]
        generator = torch.Generator().manual_seed(0)
        while len(context) - len(ids) < self.new_tokens:
            context += chain.step(context, generator)
        return context[len(ids) : len(ids) + self.new_tokens], levels[0].stats.as_dict() if levels else {}


def validate(context: int, budgets: list[int], chunk_sizes: list[int], chunk_budget: int,
             needle_depth: float, new_tokens: int = 2) -> tuple[list[int], int, list[str]]:
    """(budgets below the context, the chunk sweep's budget, notes); errors before any loading."""
    if context < 64:
        raise TriforceError(f"--context must be at least 64 tokens, got {context}")
    if new_tokens < 2:
        raise TriforceError(f"--new-tokens must be at least 2 (one verification), got {new_tokens}")
    if math.isnan(needle_depth) or not 0 <= needle_depth <= 1:
        raise TriforceError(f"--needle-depth must be between 0 and 1, got {needle_depth}")
    if min(budgets + chunk_sizes + [chunk_budget]) < 1:
        raise TriforceError("budgets and chunk sizes must be positive")
    kept = sorted({b for b in budgets if b < context})
    notes = [f"budgets {', '.join(str(b) for b in budgets if b >= context)} dropped: not below the context "
             f"({context})"] if len(kept) < len(set(budgets)) else []
    if not kept:
        raise TriforceError(f"every budget is at least the context ({context} tokens): nothing to sparsify")
    if chunk_budget >= context:
        notes.append(f"chunk-size sweep at budget {kept[-1]} (the largest below the context), not {chunk_budget}")
        chunk_budget = kept[-1]
    return kept, chunk_budget, notes


def run(
    context: int = 16384,
    budgets: list[int] | None = None,
    chunk_sizes: list[int] | None = None,
    chunk_budget: int = 4096,
    chunk_size: int = 8,
    gamma: int = 6,
    new_tokens: int = 64,
    document: str = "vim",
    needle_depth: float = 0.5,
    sink: int = 16,
    model: str | None = None,
    dtype: str = "bf16",
    out: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    budgets, chunk_budget, notes = validate(context, budgets or DEFAULTS["budgets"],
                                            chunk_sizes or DEFAULTS["chunk_sizes"], chunk_budget, needle_depth,
                                            new_tokens)
    chunk_sizes = sorted(set(chunk_sizes or DEFAULTS["chunk_sizes"]))
    target = load(model, dtype=dtype)
    runs = [(kind, b, chunk_size if kind == "retrieval" else None) for b in budgets for kind in CACHES]
    runs += [("retrieval", chunk_budget, cs) for cs in chunk_sizes if ("retrieval", chunk_budget, cs) not in runs]
    rows: list[dict[str, Any]] = []
    prompts: dict[str, dict[str, Any]] = {}
    for prompt in ("document", "needle"):
        ids = document_tokens(target.tokenizer, document, context) if prompt == "document" else needle_prompt(
            target, document, context, needle_depth)
        harness = Harness(target, ids, new_tokens, gamma)
        reference, _ = harness.generate(None)
        answer = target.tokenizer.decode(reference)
        prompts[prompt] = {"prefill_s": round(harness.prefill_s, 2), "target_output": answer}
        if prompt == "needle":
            prompts[prompt]["target_found_needle"] = ANSWER in answer
        log(f"{prompt}: {context} tokens, prefill {harness.prefill_s:.1f} s; the target continues {answer[:80]!r}")
        for kind, budget, cs in runs:
            t0 = time.perf_counter()
            view = make_view(kind, harness.full, budget, cs or 1, sink)
            tokens, stats = harness.generate(view)
            row = {"prompt": prompt, "cache": kind, "budget": budget, "chunk_size": cs,
                   "acceptance": stats["draft_acceptance_rate"],
                   "mean_acceptance_length": stats["mean_acceptance_length"],
                   "acceptance_at_position": stats["acceptance_at_position"], "exact": tokens == reference,
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            log(f"  {prompt:<8} {kind:<9} budget {budget:>5} chunk {cs or '-':>3}: acceptance {row['acceptance']:.3f}"
                + ("" if row["exact"] else "  MISMATCH"))
    table = markdown_table(
        ["prompt", "cache", "budget", "chunk", "acceptance", "mean acceptance length", "same tokens as the target"],
        [[r["prompt"], r["cache"], r["budget"], r["chunk_size"] or "-", f"{r['acceptance']:.3f}",
          r["mean_acceptance_length"], yes_no(r["exact"])] for r in rows])
    table += f"\n\nneedle found by the full target: {yes_no(prompts['needle']['target_found_needle'])}"
    notes += exactness_note(target.decoder.dtype, [r["exact"] for r in rows])
    notes += plot_acceptance(rows, chunk_budget, out)
    if notes:
        table += "\n\n" + "\n".join(f"- {n}" for n in notes)
    log(table)
    report = {
        "machine": machine(), "model": target.source, "dtype": str(target.decoder.dtype).removeprefix("torch."),
        "document": document, "context": context, "gamma": gamma, "new_tokens": new_tokens, "sink": sink,
        "needle": {"text": NEEDLE.strip(), "answer": ANSWER, "depth": needle_depth}, "chunk_budget": chunk_budget,
        "prompts": prompts, "rows": rows, "notes": notes, "markdown": table,
    }
    write_report(out, "acceptance", report)
    return report


def plot_acceptance(rows: list[dict[str, Any]], chunk_budget: int, out: Path | None) -> list[str]:
    """acceptance_budget_<prompt>.png (one line per cache) and acceptance_chunk.png (retrieval at
    `chunk_budget`, one line per prompt)."""
    if out is None:
        return []
    default_chunk = next((r["chunk_size"] for r in rows if r["cache"] == "retrieval"), None)
    for prompt in ("document", "needle"):
        series: dict[str, list[tuple[float, float | None]]] = {}
        for r in rows:
            if r["prompt"] == prompt and r["chunk_size"] in (None, default_chunk):
                series.setdefault(r["cache"], []).append((r["budget"], r["acceptance"]))
        note = line_plot(out / f"acceptance_budget_{prompt}.png", series, f"acceptance vs budget ({prompt})",
                         "budget (tokens)", "acceptance rate", log2_x=True)
        if note:
            return [note]
    series = {}
    for r in rows:
        if r["cache"] == "retrieval" and r["budget"] == chunk_budget:
            series.setdefault(r["prompt"], []).append((r["chunk_size"], r["acceptance"]))
    line_plot(out / "acceptance_chunk.png", series, f"retrieval acceptance vs chunk size (budget {chunk_budget})",
              "chunk size (tokens)", "acceptance rate", log2_x=True)
    return []
