"""`triforce bench rope`: which RoPE scaling keeps the model reading past its trained length.

Mean negative log-likelihood of the last `last` tokens of a real document, given a context of C
tokens, for each scaling (factor C / trained length). Lower is better; a model that no longer
reads its context scores like one given a short window.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..corpus import document_tokens
from ..loading import load
from .common import machine, markdown_table, nll_of_last, write_report

SCALINGS = ["none", "linear", "dynamic", "yarn"]


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
    write_report(out, "rope", report)
    return report
