"""Runs a generation job as one process of a tensor-parallel group, for test_parallel.py (which
starts it in a subprocess: a process joins one group in its life). Prints JSON on stdout.

    python tests/tp_run.py presets RANKS DTYPE TOKENS        every preset on a real document, greedy
                                                             (and the bytes rank 0's caches take at 32K)
    python tests/tp_run.py batch RANKS DTYPE                 three documents decoded as one batch and alone
    python tests/tp_run.py samples RANKS TARGET DRAFT N JOB  N seeded samples of 3 tokens, triforce
                                                             (JOB: JSON {"prompt": ids, "knobs": settings})
"""

from __future__ import annotations

import json
import sys
from typing import Any

import triforce
from triforce.corpus import document_tokens

# every preset: (method, draft) with "draft" the shipped draft model
PRESETS = [("autoregressive", None), ("speculative", "ngram"), ("speculative", "draft"), ("retrieval", None),
           ("streaming", None), ("triforce", "ngram"), ("triforce", "draft")]
SMALL = dict(budget=256, chunk_size=8, window=64, sink=4)  # sparse levels that drop much of a 4K prompt


def presets(ranks: int, dtype: str, tokens: int) -> dict[str, Any]:
    target = triforce.load(dtype=dtype, tensor_parallel=ranks)
    draft = triforce.load("src/triforce/drafts/smollm2-135m-draft", dtype=dtype)
    ids = document_tokens(target.tokenizer, "jargon", tokens)
    engine = triforce.Engine(target)
    out = {}
    for method, kind in PRESETS:
        d = draft if kind == "draft" else kind
        engine.configure(triforce.EngineSettings(method=method, draft=d, **SMALL))
        out[f"{method}[{kind}]"] = engine.generate(ids, max_new_tokens=24).token_ids
    engine.release()
    out["memory_at_32k"] = engine.memory_needed(engine.capacity_for(32768))  # this rank's caches
    return out


def batch(ranks: int, dtype: str) -> dict[str, list[list[int]]]:
    target = triforce.load(dtype=dtype, tensor_parallel=ranks)
    draft = triforce.load("src/triforce/drafts/smollm2-135m-draft", dtype=dtype)
    docs = [document_tokens(target.tokenizer, "jargon", n, offset=o) for n, o in ((1500, 0), (900, 5000),
                                                                                  (2100, 20000))]
    out = {}
    for method, kind in [("autoregressive", None), ("triforce", "ngram"), ("triforce", "draft")]:
        settings = triforce.EngineSettings(method=method, draft=draft if kind == "draft" else kind, **SMALL)
        requests = [{"prompt": ids, "max_new_tokens": 16 + 4 * i} for i, ids in enumerate(docs)]
        out[f"{method}[{kind}]"] = [r.token_ids for r in triforce.generate_batch(target, requests, settings)]
        out[f"{method}[{kind}] alone"] = [triforce.Engine(target, settings).generate(**r).token_ids for r in requests]
    return out


def samples(ranks: int, target_dir: str, draft_dir: str, n: int, job: dict) -> list[list[int]]:
    target = triforce.load(target_dir, dtype="fp32", tensor_parallel=ranks)
    draft = triforce.load(draft_dir, dtype="fp32")
    engine = triforce.Engine(target, triforce.EngineSettings(method="triforce", draft=draft, **job["knobs"]))
    result = engine.generate(job["prompt"], max_new_tokens=3, temperature=0.6, top_p=0.9, seed=11, num_samples=n,
                             ignore_eos=True)
    return result.samples


if __name__ == "__main__":
    mode, ranks, *rest = sys.argv[1:]
    if mode == "presets":
        print(json.dumps(presets(int(ranks), rest[0], int(rest[1]))))
    elif mode == "batch":
        print(json.dumps(batch(int(ranks), rest[0])))
    else:
        print(json.dumps(samples(int(ranks), rest[0], rest[1], int(rest[2]), json.loads(rest[3]))))
