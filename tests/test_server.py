"""`triforce serve` as a real process on 127.0.0.1, driven by real clients (the openai package,
raw HTTP for malformed input, a bounded concurrent load)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from triforce.bench.serve import ServeProcess


class ServerProcess(ServeProcess):
    """A `triforce serve` process (see triforce.bench.serve), ready on return."""

    def __init__(self, *args: str) -> None:
        super().__init__(list(args), threads=None)
        self.wait_ready(timeout=240)

    def request(self, path: str, body: bytes | dict | None = None, method: str = "POST",
                timeout: float = 120) -> tuple[int, dict | str, dict]:
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read().decode()
                status, headers = r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            raw, status, headers = e.read().decode(), e.code, dict(e.headers)
        try:
            return status, json.loads(raw), headers
        except json.JSONDecodeError:
            return status, raw, headers

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--method", "triforce", "--draft", "ngram", "--max-queue", "4", "--max-context", "2048")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


PROMPT = "The history of the printing press begins"


def cli_greedy(prompt: str, tokens: int, chat: bool) -> str:
    args = [sys.executable, "-m", "triforce.cli", "generate", "--prompt", prompt, "--max-new-tokens", str(tokens),
            "--json", "--quiet", "--method", "triforce", "--draft", "ngram"] + (["--chat"] if chat else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["text"]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    status, body, _ = server.request("/health")
    assert status == 200 and body["status"] == "ok"


def test_completion_equals_cli_greedy(server, client):
    result = client.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=24, temperature=0)
    assert result.choices[0].text == cli_greedy(PROMPT, 24, chat=False)
    assert result.usage.completion_tokens == 24 and result.usage.prompt_tokens > 0


def test_chat_equals_cli_greedy_and_streams(server, client):
    question = "Name three colours of the rainbow."
    messages = [{"role": "user", "content": question}]
    full = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=30,
                                          temperature=0)
    text = full.choices[0].message.content
    assert text == cli_greedy(question, 30, chat=True)
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=30,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert finish in ("stop", "length")
    spec = usage.model_extra["speculative"]
    levels = {lv["name"]: lv for lv in spec["levels"]}
    assert set(levels) == {"ngram", "target-retrieval"}
    for lv in levels.values():
        for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "draft_acceptance_rate",
                    "mean_acceptance_length"):
            assert key in lv


def test_completion_streaming_ends_with_done(server):
    req = urllib.request.Request(server.base + "/v1/completions", method="POST",
                                 data=json.dumps({"prompt": PROMPT, "max_tokens": 10, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [line for line in r.read().decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)


def test_extension_object_selects_method(server, client):
    result = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0, extra_body={"triforce": {"method": "streaming", "gamma": 3}},
    )
    assert result.usage.model_extra["speculative"]["method"] == "streaming"


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 1}}, 400,
         "logit_bias"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
         400, "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
         "temperature"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
         "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400,
         "frobnicate"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "triforce": {"method": "magic"}},
         400, "triforce"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model"),
        ("/v1/completions", {"prompt": "word " * 3000}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": 42}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ],
)
def test_bad_requests_get_openai_errors_and_server_stays_healthy(server, path, body, status, param):
    got, payload, _ = server.request(path, body)
    assert got == status, payload
    assert set(payload["error"]) >= {"message", "type", "param", "code"}
    assert payload["error"]["param"] == param
    assert server.request("/health")[0] == 200


def test_metrics_exposes_counters(server, client):
    client.completions.create(model="smollm2-135m-instruct", prompt="Hello there", max_tokens=6, temperature=0)
    status, text, _ = server.request("/metrics")
    assert status == 200
    for name in ("triforce:requests_total", "triforce:queue_depth", "triforce:generation_tokens_total",
                 "triforce:prefill_seconds_total", "triforce:decode_seconds_total",
                 "triforce:spec_decode_num_drafts_total", "triforce:spec_decode_num_draft_tokens_total",
                 "triforce:spec_decode_num_accepted_tokens_total"):
        assert name in text
    assert 'triforce:spec_decode_num_drafts_total{level="target-retrieval"}' in text


def stream_request(base: str, max_tokens: int, outcome: list, index: int, abort_after: int | None = None) -> None:
    body = {"prompt": f"Story number {index}: once upon a time", "max_tokens": max_tokens, "stream": True,
            "temperature": 0.8, "seed": index}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            chunks, done = 0, False
            for raw in r:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks += 1
                    if abort_after is not None and chunks >= abort_after:
                        outcome[index] = ("aborted", chunks)
                        return
            outcome[index] = ("done" if done else "truncated", chunks)
    except urllib.error.HTTPError as e:
        outcome[index] = (f"http {e.code}", e.headers.get("Retry-After"))
    except Exception as e:  # noqa: BLE001 - any transport failure is a lost request
        outcome[index] = ("lost", repr(e))


def test_forty_concurrent_streams_complete_or_get_429(server):
    """40 streaming clients at once against a queue of 4: every request either completes with
    [DONE] or is refused with 429 + Retry-After; none is lost or truncated; /health answers
    throughout; memory returns to its baseline."""
    baseline = server.rss_mb()
    outcome: list = [None] * 40
    threads = [threading.Thread(target=stream_request, args=(server.base, 12, outcome, i)) for i in range(40)]
    for t in threads:
        t.start()
    health = []
    while any(t.is_alive() for t in threads):
        start = time.time()
        health.append(server.request("/health", timeout=10)[0])
        assert time.time() - start < 5, "health check stalled under load"
        time.sleep(0.3)
    for t in threads:
        t.join()
    kinds = [o[0] for o in outcome]
    assert set(kinds) <= {"done", "http 429"}, outcome
    assert kinds.count("done") >= 4  # at least a full queue's worth is always accepted
    assert all(o[1] for o in outcome if o[0] == "http 429")  # Retry-After present
    assert health and set(health) == {200}
    status, text, _ = server.request("/metrics")
    assert "triforce:queue_depth 0" in text
    assert server.rss_mb() < baseline + 150


def test_disconnect_mid_stream_frees_the_slot(server):
    outcome: list = [None]
    stream_request(server.base, 400, outcome, 0, abort_after=3)
    assert outcome[0][0] == "aborted"
    deadline = time.time() + 30
    while time.time() < deadline:
        status, text, _ = server.request("/metrics")
        if "triforce:requests_running 0" in text:
            break
        time.sleep(0.5)
    assert "triforce:requests_running 0" in text
    assert "triforce:requests_cancelled_total 1" in text or "requests_cancelled_total 2" in text
    # the engine serves the next request normally
    status, body, _ = server.request("/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] == 4


def test_sigterm_finishes_in_flight_and_exits_cleanly():
    s = ServerProcess("--method", "streaming", "--max-context", "1024")
    outcome: list = [None]
    t = threading.Thread(target=stream_request, args=(s.base, 40, outcome, 0))
    t.start()
    time.sleep(1.5)
    assert s.stop() == 0
    t.join(timeout=60)
    assert outcome[0][0] == "done", outcome  # uvicorn drains open streams before the lifespan ends
    assert "Traceback" not in s.proc.stderr.read()


def test_busy_port_is_a_one_line_error_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.time()
        out = subprocess.run([sys.executable, "-m", "triforce.cli", "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    expected = f"triforce: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert out.stderr.strip().splitlines() == [expected]
    assert time.time() - start < 30


def test_concurrent_requests_are_batched_and_each_equals_running_alone(server, client):
    """Requests decoded together (continuous batching, --max-batch 4) give each exactly the
    tokens of that prompt alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["The history of the printing press begins", "def quicksort(items):", "Water boils at",
               "In a small village by the sea,"]

    def ask(prompt: str) -> str:
        return client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=20,
                                         temperature=0).choices[0].text

    def counters() -> tuple[float, float]:
        text = server.request("/metrics")[1]
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
        return values["triforce:forward_passes_total"], values["triforce:batched_sequences_total"]

    passes, sequences = counters()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    passes2, sequences2 = counters()
    assert (sequences2 - sequences) / (passes2 - passes) > 1.5  # most passes served several requests
    for prompt, text in zip(prompts, together):
        assert text == cli_greedy(prompt, 20, chat=False)


def metric_value(server, name: str) -> float:
    for line in server.request("/metrics")[1].splitlines():
        if not line.startswith("#") and line.split()[0] == f"triforce:{name}":
            return float(line.split()[1])
    raise AssertionError(f"no metric triforce:{name}")


def test_request_cancelled_mid_batch_leaves_the_others_exact(server, client):
    """A streaming client disconnects while three other requests decode in the same batch: it is
    cancelled (its slot freed), and each of the others still gets exactly its tokens alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["def fibonacci(n):", "The river flows", "Once upon a time in a distant kingdom"]

    def ask(prompt: str) -> str:
        return client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=32,
                                         temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    cancelled = metric_value(server, "requests_cancelled_total")
    outcome: list = [None]
    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        aborting = pool.submit(stream_request, server.base, 400, outcome, 0, 3)
        together = list(pool.map(ask, prompts))
        aborting.result()
    assert outcome[0][0] == "aborted"
    assert together == alone
    deadline = time.time() + 30
    while metric_value(server, "requests_cancelled_total") < cancelled + 1 and time.time() < deadline:
        time.sleep(0.3)
    assert metric_value(server, "requests_cancelled_total") == cancelled + 1
    assert metric_value(server, "requests_running") == 0


def test_engine_errors_name_the_request_field(server):
    status, body, _ = server.request("/v1/completions", {"prompt": "hi", "triforce": {"gamma": 0}})
    assert status == 400 and body["error"]["param"] == "triforce"
    assert body["error"]["message"].startswith("'triforce.gamma' must be 'auto' or an integer >= 1")
    status, body, _ = server.request("/v1/completions", {"prompt": "hi", "triforce": {"window": "big"}})
    assert status == 400 and "'triforce.window'" in body["error"]["message"]


def test_api_key_guards_the_v1_routes():
    """With --api-key, /v1 wants `Authorization: Bearer KEY` (401 and an OpenAI error otherwise,
    which the openai client raises as AuthenticationError); /health and /metrics stay open."""
    from openai import AuthenticationError, OpenAI

    s = ServerProcess("--method", "autoregressive", "--max-context", "512", "--api-key", "sesame")
    try:
        good = OpenAI(base_url=s.base + "/v1", api_key="sesame", max_retries=0, timeout=120)
        out = good.completions.create(model="smollm2-135m-instruct", prompt=PROMPT, max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
        bad = OpenAI(base_url=s.base + "/v1", api_key="open-sesame", max_retries=0, timeout=120)
        with pytest.raises(AuthenticationError) as info:
            bad.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        status, body, _ = s.request("/v1/models")  # no header at all
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert s.request("/health")[0] == 200 and s.request("/metrics")[0] == 200
    finally:
        assert s.stop() == 0


def test_api_key_defaults_to_the_environment(monkeypatch):
    from triforce.cli import build_parser

    monkeypatch.setenv("TRIFORCE_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    monkeypatch.delenv("TRIFORCE_API_KEY")
    assert build_parser().parse_args(["serve"]).api_key is None
