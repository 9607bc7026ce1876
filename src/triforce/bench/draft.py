"""`triforce bench draft`: how good a draft model is for its target, on text it never saw.

- greedy agreement: the draft's argmax equals the target's, teacher-forced over held-out text;
- acceptance inside `--method speculative` at temperature 0 and at 0.6 / top-p 0.9;
- per-token decode cost of the draft against the target's at a 2K context.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..cache import FullCache
from ..corpus import document_tokens
from ..engine import Engine
from ..loading import LoadedModel, load
from ..model import Segment
from ..settings import EngineSettings
from .common import machine, median

QUESTIONS = [
    "Explain how a hash table works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Give three tips for writing clear documentation.",
]


@torch.no_grad()
def greedy_agreement(target: LoadedModel, draft: LoadedModel, ids: list[int], seq_len: int = 512) -> float:
    agree = total = 0
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        x = torch.tensor(ids[start : start + seq_len])
        outs = []
        for model in (target, draft):
            model.decoder.prepare(seq_len)
            cache = FullCache(model.config, seq_len, dtype=model.decoder.dtype)
            outs.append(model.decoder.forward([Segment(x, cache, seq_len)])[0].argmax(-1))
        agree += int((outs[0] == outs[1]).sum())
        total += seq_len
    return agree / total


def decode_ms(model: LoadedModel, ids: list[int], new_tokens: int = 32, repeats: int = 3) -> float:
    engine = Engine(model)
    engine.generate(ids, max_new_tokens=2, ignore_eos=True)  # prefill once (prompt cache)
    return median([engine.generate(ids, max_new_tokens=new_tokens, ignore_eos=True).stats["ms_per_token"]
                   for _ in range(repeats)])


def run(draft_path: str, heldout: str = "vim", heldout_tokens: int = 8192, update_card: bool = False,
        out: Path | None = None, log: Any = print) -> dict[str, Any]:
    target = load(None)
    draft = load(draft_path, dtype=target.decoder.dtype)
    report: dict[str, Any] = {"machine": machine(), "draft": draft_path, "heldout_document": heldout}
    ids = document_tokens(target.tokenizer, heldout, heldout_tokens)
    report["greedy_agreement"] = round(greedy_agreement(target, draft, ids), 4)
    log(f"greedy agreement on {heldout_tokens} held-out tokens ({heldout}): {report['greedy_agreement']}")
    engine = Engine(target, EngineSettings(method="speculative", draft=draft, gamma=4))
    for name, temp, top_p in (("t0", 0.0, 1.0), ("t0.6_p0.9", 0.6, 0.9)):
        accepted = drafted = 0
        for i, question in enumerate(QUESTIONS):
            result = engine.generate(question, chat=True, max_new_tokens=128, temperature=temp, top_p=top_p, seed=i)
            level = result.stats["levels"][0]
            accepted += level["num_accepted_tokens"]
            drafted += level["num_draft_tokens"]
        doc = document_tokens(target.tokenizer, heldout, 1024, offset=heldout_tokens)
        result = engine.generate(doc, max_new_tokens=128, temperature=temp, top_p=top_p, seed=99, ignore_eos=True)
        level = result.stats["levels"][0]
        report[f"acceptance_{name}"] = {
            "chat": round(accepted / max(1, drafted), 4),
            "document": level["draft_acceptance_rate"],
        }
        log(f"acceptance in speculative decoding, {name}: {report[f'acceptance_{name}']}")
    prompt = document_tokens(target.tokenizer, heldout, 2048, offset=heldout_tokens + 1024)
    t0 = time.perf_counter()
    target_ms, draft_ms = decode_ms(target, prompt), decode_ms(draft, prompt)
    report["decode_ms_2k"] = {"target": target_ms, "draft": draft_ms, "ratio": round(draft_ms / target_ms, 3)}
    log(f"decode at 2K context: target {target_ms:.2f} ms/token, draft {draft_ms:.2f} ms/token "
        f"(ratio {draft_ms / target_ms:.3f}; {time.perf_counter() - t0:.0f} s)")
    size = sum(p.stat().st_size for p in Path(draft_path).glob("*.safetensors"))
    report["weights_mb"] = round(size / 1e6, 1)
    if update_card:
        from ..distill import write_model_card

        card_report = json.loads((Path(draft_path) / "distill_report.json").read_text())
        card_report["acceptance"] = {k: report[k] for k in report if k.startswith(("acceptance", "greedy", "decode"))}
        (Path(draft_path) / "distill_report.json").write_text(json.dumps(card_report, indent=2))
        write_model_card(Path(draft_path), card_report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "draft.json").write_text(json.dumps(report, indent=2))
    return report
