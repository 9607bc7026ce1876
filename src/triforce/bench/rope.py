"""`triforce bench rope`: which RoPE scaling keeps the model reading past its trained length.

Mean negative log-likelihood of the last `last` tokens of a real document, given a context of C
tokens, for each scaling (factor C / trained length). Lower is better; a model that no longer
reads its context scores like one given a short window.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..cache import FullCache
from ..corpus import document_tokens
from ..loading import load
from ..model import Decoder
from .common import machine, markdown_table

SCALINGS = ["none", "linear", "dynamic", "yarn"]


def nll_of_last(decoder: Decoder, ids: list[int], last: int, chunk: int = 1024) -> float:
    """Mean NLL of ids[-last:] given everything before them (one chunked prefill)."""
    n = len(ids)
    decoder.prepare(n)
    cache = FullCache(decoder.config, n, dtype=decoder.dtype, device=decoder.device)
    body_end = n - last - 1
    for start in range(0, body_end, chunk):
        piece = ids[start : min(start + chunk, body_end)]
        decoder.forward(torch.tensor([piece]), cache, logits_for="none")
    tail = torch.tensor([ids[body_end:-1]])  # positions predicting ids[-last:]
    logits = decoder.forward(tail, cache, logits_for="all")[0]
    targets = torch.tensor(ids[-last:])
    return float(torch.nn.functional.cross_entropy(logits, targets))


def scaling_for(name: str, context: int, trained: int) -> dict[str, Any] | None:
    if name == "none":
        return None
    factor = max(1.0, context / trained)
    spec: dict[str, Any] = {"rope_type": name, "factor": factor}
    if name == "yarn":
        spec["original_max_position_embeddings"] = trained
    return spec


def run(contexts: list[int], last: int = 512, document: str = "vim", out: Path | None = None,
        log: Any = print) -> dict[str, Any]:
    target = load(None, dtype="bf16")
    trained = target.config.max_position_embeddings
    rows, raw = [], []
    for ctx in contexts:
        ids = document_tokens(target.tokenizer, document, ctx)
        row: dict[str, Any] = {"context": ctx}
        names = SCALINGS if ctx > trained else ["none"]
        for name in names:
            target.decoder.rope_override = scaling_for(name, ctx, trained)
            t0 = time.perf_counter()
            value = nll_of_last(target.decoder, ids, last)
            row[name] = round(value, 3)
            raw.append({"context": ctx, "scaling": name, "nll": value, "seconds": time.perf_counter() - t0})
            log(f"context {ctx} {name}: NLL {value:.3f} ({time.perf_counter() - t0:.0f} s)")
        # the same last tokens with only a short window before them: what "not reading" scores
        window = ids[-(1024 + last):]
        target.decoder.rope_override = None
        row["1K window"] = round(nll_of_last(target.decoder, window, last), 3)
        rows.append(row)
    header = ["context", *SCALINGS, "1K window"]
    table = markdown_table(header, [[r.get(h, "") for h in header] for r in rows])
    log(table)
    report = {"machine": machine(), "document": document, "last": last, "rows": rows, "raw": raw,
              "markdown": table}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rope.json").write_text(json.dumps(report, indent=2))
        (out / "rope.md").write_text(table + "\n")
    return report
