"""`triforce bench serve`: what continuous batching buys a server's clients.

Two `triforce serve` processes on the same model and method, one with `--max-batch N` and one
with `--max-batch 1`, both started before measuring; in each round, `--clients` streaming
clients send their requests at once to one server, then to the other (rounds interleaved,
medians reported). Each client's prompt is a different slice of a real document. Reported per
server: total completion tokens/s over the round's wall time (prefill included), decoding
tokens/s (tokens after each first token, over the span from the first first-token to the last
finish), median time to first token, and the ratio between the two servers. Greedy runs check
that every client received the same text from both servers (batching is exact).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..corpus import load_document
from ..errors import TriforceError
from ..loading import load
from ..settings import METHODS
from .common import machine, markdown_table, median, write_report
from .quick import TINY_TARGET

DEFAULTS: dict[str, Any] = dict(clients=8, max_batch=8, context=512, new_tokens=128, method="autoregressive",
                                draft=None, rounds=2, document="vim", model=None, dtype="bf16", threads=None)
QUICK: dict[str, Any] = dict(clients=3, max_batch=3, context=64, new_tokens=8, rounds=1, model=TINY_TARGET,
                             dtype="fp32", threads=1)


def validate(clients: int, max_batch: int, method: str) -> None:
    if method not in METHODS:
        raise TriforceError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if clients < 1 or max_batch < 2:
        raise TriforceError("--clients must be >= 1 and --max-batch >= 2 (it is compared with --max-batch 1)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """A `triforce serve` subprocess, ready when /health answers."""

    def __init__(self, args: list[str], threads: int | None) -> None:
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "triforce.cli", "serve", "--port", str(self.port), *args]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise TriforceError(f"the server exited: {self.proc.stderr.read().strip()[-500:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TriforceError("the server did not become ready")

    def stop(self) -> int:
        """SIGTERM (the server drains open requests), a kill after a minute; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def stream_one(base: str, prompt: str, new_tokens: int, seed: int, temperature: float) -> dict[str, Any]:
    """One streaming completion; wall-clock times of its start, first text and end."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "stream": True, "temperature": temperature, "seed": seed,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    start, first, text, tokens = time.perf_counter(), None, "", 0
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise TriforceError(f"the server failed a request: {event['error'].get('message')}")
            for choice in event.get("choices", []):
                if choice.get("text"):
                    first = first or time.perf_counter()
                    text += choice["text"]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"start": start, "first": first or time.perf_counter(), "end": time.perf_counter(), "text": text,
            "tokens": tokens}


def run_round(base: str, prompts: list[str], new_tokens: int, temperature: float) -> dict[str, Any]:
    results: list[Any] = [None] * len(prompts)

    def client(i: int) -> None:
        try:
            results[i] = stream_one(base, prompts[i], new_tokens, 1000 + i, temperature)
        except (OSError, TriforceError) as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise TriforceError(f"{len(failed)} of {len(prompts)} requests failed: {failed[0]}")
    begin, end = min(r["start"] for r in results), max(r["end"] for r in results)
    first = min(r["first"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens_per_s": tokens / (end - begin),
        "decode_tokens_per_s": (tokens - len(results)) / max(1e-9, end - first),
        "ttft_s": median([r["first"] - r["start"] for r in results]),
        "tokens": tokens, "texts": [r["text"] for r in results],
    }


def run(
    clients: int = 8,
    max_batch: int = 8,
    context: int = 512,
    new_tokens: int = 128,
    method: str = "autoregressive",
    draft: str | None = None,
    rounds: int = 2,
    document: str = "vim",
    model: str | None = None,
    dtype: str = "bf16",
    temperature: float = 0.0,
    threads: int | None = None,
    out: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    validate(clients, max_batch, method)
    target = load(model, dtype=dtype)
    ids = target.tokenizer.encode(load_document(document), add_special_tokens=False)
    if len(ids) < context * clients:
        raise TriforceError(f"document {document!r} has {len(ids)} tokens; {clients} x {context} needed")
    prompts = [target.tokenizer.decode(ids[i * context : (i + 1) * context]) for i in range(clients)]
    del target
    common = ["--method", method, "--dtype", dtype, "--max-context", str(context * 2 + new_tokens + 64),
              "--max-queue", str(clients)]
    if model:
        common += ["--model", model]
    if draft:
        common += ["--draft", draft]
    servers = {b: ServeProcess(common + ["--max-batch", str(b)], threads) for b in (max_batch, 1)}
    rows: list[dict[str, Any]] = []
    try:
        for s in servers.values():
            s.wait_ready()
        log(f"{clients} clients, prompts of {context} tokens, {new_tokens} new tokens, method {method}")
        runs: dict[int, list[dict[str, Any]]] = {b: [] for b in servers}
        for r in range(rounds):
            for b, s in servers.items():
                entry = run_round(s.base, prompts, new_tokens, temperature)
                runs[b].append(entry)
                log(f"  r{r} --max-batch {b}: {entry['tokens_per_s']:.1f} tokens/s end to end, "
                    f"{entry['decode_tokens_per_s']:.1f} decoding, first token after {entry['ttft_s']:.2f} s")
    finally:
        for s in servers.values():
            s.stop()
    same = None
    if temperature == 0:
        same = all(e["texts"] == runs[1][0]["texts"] for entries in runs.values() for e in entries)
    single = median([e["tokens_per_s"] for e in runs[1]])
    for b, entries in runs.items():
        tps = median([e["tokens_per_s"] for e in entries])
        rows.append({"max_batch": b, "tokens_per_s": round(tps, 2),
                     "decode_tokens_per_s": round(median([e["decode_tokens_per_s"] for e in entries]), 2),
                     "ttft_s": round(median([e["ttft_s"] for e in entries]), 3),
                     "vs_max_batch_1": round(tps / single, 2)})
    table = markdown_table(
        ["--max-batch", "total tokens/s", "decoding tokens/s", "median first token (s)", "vs --max-batch 1"],
        [[r["max_batch"], r["tokens_per_s"], r["decode_tokens_per_s"], r["ttft_s"], r["vs_max_batch_1"]]
         for r in rows])
    if same is not None:
        table += "\n\n- every client got the same greedy text from both servers: " + ("yes" if same else "NO")
    log(table)
    report = {"machine": machine(), "model": model or "embedded", "method": method, "draft": draft,
              "clients": clients, "context": context, "new_tokens": new_tokens, "rounds": rounds,
              "same_text": same, "rows": rows, "markdown": table}
    write_report(out, "serve", report)
    return report
