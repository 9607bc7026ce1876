"""`triforce bench parallel`: ms/token and each rank's memory for 1 and N tensor-parallel ranks.

A process joins one group in its life, so each rank count runs in a process of its own (which
starts its other ranks), kept alive for the whole run and given one job at a time: the repeats
alternate between the rank counts, never overlapping, and medians are reported. Each job is
greedy generation of `new_tokens` after a real document, EOS ignored; the prompt is prefilled
once per context and process (the prompt cache serves the repeats). One rank runs with all the
machine's threads, N ranks with 1/N of them each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import TriforceError
from .common import machine, markdown_table, median, write_report


def communication_bytes(hidden: int, layers: int, vocab: int, ranks: int, rows: int = 1) -> int:
    """Bytes one rank sends per pass of `rows` tokens: its float32 partial sums of the attention
    and MLP outputs (two per layer) and its share of the logits, to each other rank."""
    per_peer = rows * 4 * (2 * layers * hidden + -(-vocab // ranks))
    return per_peer * (ranks - 1)


class _RankProcess:
    """A process holding the model over `ranks` ranks, taking jobs on stdin, answering on stdout."""

    def __init__(self, ranks: int, threads: int, document: str) -> None:
        self.ranks = ranks
        self.proc = subprocess.Popen([sys.executable, "-m", "triforce.bench.parallel", str(ranks), str(threads),
                                      document], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise TriforceError(f"the {self.ranks}-rank process ended (exit code {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise TriforceError(answer["error"])
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(contexts: list[int], ranks: list[int], methods: list[str], draft: str, new_tokens: int, repeats: int,
        document: str, out: Path | None, log: Any = print) -> dict[str, Any]:
    threads = torch.get_num_threads()
    procs = {n: _RankProcess(n, max(1, threads // n), document) for n in ranks}
    raw: list[dict[str, Any]] = []
    try:
        info = procs[ranks[0]].run({"info": True})
        for ctx in contexts:
            for r in range(repeats):
                for method in methods:
                    for n, proc in procs.items():
                        m = proc.run({"context": ctx, "method": method, "draft": draft, "new_tokens": new_tokens})
                        raw.append({**m, "ranks": n, "context": ctx, "method": method, "repeat": r})
                        log(f"  ctx {ctx} repeat {r} {method} {n} rank(s): {m['ms_per_token']:.1f} ms/token, peak "
                            + " / ".join(f"{mb} MB" for mb in m["peak_rss_mb"]))
    finally:
        for proc in procs.values():
            proc.close()
    rows = []
    for ctx in contexts:
        for method in methods:
            base = None
            for n in ranks:
                runs = [m for m in raw if (m["context"], m["method"], m["ranks"]) == (ctx, method, n)]
                ms = median([m["ms_per_token"] for m in runs])
                base = base or ms
                rows.append({"context": ctx, "method": method, "ranks": n, "threads": max(1, threads // n),
                             "ms": round(ms, 2), "vs_first": round(base / ms, 2),
                             "peak_rss_mb": runs[-1]["peak_rss_mb"],
                             "identical": all(m["tokens"] == runs[0]["tokens"] for m in runs)})
    for m in raw:
        m.pop("tokens", None)
    comm = {n: communication_bytes(info["hidden"], info["layers"], info["vocab"], n) for n in ranks if n > 1}
    report = {"machine": machine(), "new_tokens": new_tokens, "repeats": repeats, "document": document,
              "draft": draft, "model": info["model"], "bytes_sent_per_token_per_rank": comm, "rows": rows, "raw": raw}
    report["markdown"] = markdown_table(
        ["context", "method", "ranks x threads", "ms/token", "speed vs first row", "peak memory per rank (MB)",
         "same tokens every repeat"],
        [[r["context"], r["method"], f"{r['ranks']} x {r['threads']}", r["ms"], r["vs_first"],
          " / ".join(str(x) for x in r["peak_rss_mb"]), r["identical"]] for r in rows])
    for n, nbytes in comm.items():
        report["markdown"] += (f"\n\n- {n} ranks: each rank sends {nbytes / 1e3:.0f} KB per decoded token "
                               f"(float32 partial sums, 2 per layer, and its logits, to each other rank), in "
                               f"{2 * info['layers'] + 1} messages")
    log(report["markdown"])
    write_report(out, "parallel", report)
    return report


def _serve(ranks: int, threads: int, document: str) -> None:
    """The rank process: load, then answer jobs from stdin until it closes."""
    import triforce

    from ..corpus import document_tokens
    from ..loading import load_draft

    torch.set_num_threads(threads)
    try:
        target = triforce.load(tensor_parallel=ranks)
    except triforce.SettingError as exc:  # said in answer to the first job
        failure = f"--ranks {exc.problem}" if exc.setting == "tensor_parallel" else str(exc)
        for _ in sys.stdin:
            print(json.dumps({"error": failure}), flush=True)
        return
    engines: dict[int, triforce.Engine] = {}
    drafts: dict[str, Any] = {}
    for line in sys.stdin:
        job = json.loads(line)
        try:
            if job.get("info"):
                cfg = target.config
                answer: dict[str, Any] = {"model": target.source, "hidden": cfg.hidden_size,
                                          "layers": cfg.num_layers, "vocab": cfg.vocab_size}
            else:
                ctx = job["context"]
                if ctx not in engines:
                    engines[ctx] = triforce.Engine(target)
                engine = engines[ctx]
                name = job["draft"]
                if name not in drafts:
                    drafts[name] = load_draft(name, target)
                engine.configure(triforce.EngineSettings(method=job["method"], draft=drafts[name]
                                                         if job["method"] != "autoregressive" else None))
                ids = document_tokens(target.tokenizer, document, ctx)
                engine.generate(ids, max_new_tokens=1)  # the prompt cache then serves every timed run
                result = engine.generate(ids, max_new_tokens=job["new_tokens"], ignore_eos=True)
                s = result.stats
                answer = {"ms_per_token": s["ms_per_token"], "tokens": result.token_ids,
                          "peak_rss_mb": s["tensor_parallel"]["peak_rss_mb"] if "tensor_parallel" in s
                          else [s["peak_rss_mb"]]}
        except triforce.TriforceError as exc:
            answer = {"error": str(exc)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
