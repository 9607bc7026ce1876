"""Tensor parallelism (parallel.py, tp_worker.py): the shard plan, and two ranks over gloo on
127.0.0.1 (each test starts its group in a subprocess) giving one rank's tokens, the target's
distribution, a clear end when a rank dies, and a server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triforce.config import ModelConfig
from triforce.errors import SettingError
from triforce.parallel import Link, RankFailed, StepLog, plan_shards
from triforce.sampling import SamplingParams

from .test_exactness import ALPHA, KNOBS, PROMPT, chi_square, exact_joint

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "tests" / "tp_run.py")]
PARALLEL_SAMPLES = 2000
SMOLLM2 = ModelConfig("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
                      max_position_embeddings=8192, tie_word_embeddings=True)


def run_json(args: list[str], timeout: float = 900) -> object:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def workers_of(pid: int) -> list[int]:
    """The tensor-parallel workers process `pid` started."""
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", "triforce.tp_worker"], capture_output=True, text=True)
    return [int(w) for w in found.stdout.split()]


def still_running(pids: list[int]) -> list[int]:
    """Those of `pids` that are still a worker (other tests may run workers of their own meanwhile)."""
    def is_worker(pid: int) -> bool:
        try:
            return b"triforce.tp_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    return [pid for pid in pids if is_worker(pid)]


# -- the plan ------------------------------------------------------------------------------------
def weight_bytes(shard, cfg: ModelConfig) -> int:
    heads = shard.kv_heads[1] - shard.kv_heads[0]
    columns = shard.intermediate[1] - shard.intermediate[0]
    return heads * cfg.head_dim * cfg.hidden_size * (2 * cfg.group_size + 2) + 3 * cfg.hidden_size * columns


def test_three_kv_heads_split_over_two_ranks_with_the_mlp_balancing_the_bytes():
    shards = plan_shards(SMOLLM2, 2, align=32)
    assert [s.kv_heads for s in shards] == [(0, 2), (2, 3)]
    assert shards[0].intermediate[0] == 0 and shards[1].intermediate == (shards[0].intermediate[1], 1536)
    assert shards[0].intermediate[1] % 32 == 0
    # the rank with one KV head takes more of the MLP; bytes equal within one aligned block of columns
    assert shards[1].intermediate[1] - shards[1].intermediate[0] > shards[0].intermediate[1]
    assert abs(weight_bytes(shards[0], SMOLLM2) - weight_bytes(shards[1], SMOLLM2)) <= 3 * 576 * 32
    assert [s.vocab for s in shards] == [(0, 24576), (24576, 49152)] and shards[0].vocab_rows == (24576, 24576)


def test_every_rank_holds_a_kv_head_and_mlp_columns():
    shards = plan_shards(SMOLLM2, 3, align=256)
    assert [s.kv_heads for s in shards] == [(0, 1), (1, 2), (2, 3)]
    assert all(s.intermediate[1] > s.intermediate[0] for s in shards)
    assert all(s.intermediate[0] % 256 == 0 for s in shards)
    assert sum(s.vocab[1] - s.vocab[0] for s in shards) == 49152


@pytest.mark.parametrize("world, problem", [(4, "is 4, more than the model's 3 KV heads"),
                                            (0, "must be an integer >= 1, got 0")])
def test_impossible_rank_counts_are_refused(world, problem):
    with pytest.raises(SettingError) as err:
        plan_shards(SMOLLM2, world)
    assert err.value.setting == "tensor_parallel" and err.value.problem == problem


# -- the step log of a batch ---------------------------------------------------------------------
class FakeGroup:
    """A group's rank-0 decisions without processes: what rank 0 shares is kept."""

    def __init__(self, rank: int) -> None:
        self.rank, self.leader, self.world, self.shared = rank, rank == 0, 2, []

    def share(self, message: object) -> None:
        self.shared.append(message)


def test_a_batch_step_carries_rank_0s_decisions_in_order_and_the_passes_order():
    leader, follower = FakeGroup(0), FakeGroup(1)
    sent, taken = StepLog(leader), StepLog(follower)
    a, b = Link(leader, sent, 3), Link(leader, sent, 5)
    a.tell(("stream", 3))
    now = a.clock()
    assert b.decide(2) == 2 and a.decide(1) == 1
    sent.send([5, 3])
    sent.send([])  # nothing new: nothing sent
    assert leader.shared == [("step", {3: [("call", ("stream", 3)), ("clock", now), ("decide", 1)],
                                       5: [("decide", 2)]}, [5, 3])]
    assert taken.deliver(leader.shared[0][1]) == [3, 5]
    copy = Link(follower, taken, 3)
    copy.tell(("ignored",))  # only rank 0 calls
    assert taken.take(3) == ("call", ("stream", 3))
    assert copy.clock() == now and copy.decide(1) == 1 and Link(follower, taken, 5).decide(0) == 2
    taken.deliver({3: [("decide", 0)]})
    with pytest.raises(RankFailed, match="expected a clock from rank 0, got a decide"):
        copy.clock()


# -- two ranks -----------------------------------------------------------------------------------
def test_two_ranks_give_one_ranks_tokens_fp32_on_every_preset():
    """fp32, 4K tokens of the Jargon File, 24 greedy tokens per preset: 2 ranks = 1 rank."""
    one = run_json(RUN + ["presets", "1", "fp32", "4096"])
    two = run_json(RUN + ["presets", "2", "fp32", "4096"])
    # memory admission counts rank 0's share: 2 of the 3 KV heads' caches (rotary tables whole)
    assert 0.66 < two.pop("memory_at_32k") / one.pop("memory_at_32k") < 0.68
    assert one.keys() == two.keys() and len(one) == 7
    for preset in one:
        assert two[preset] == one[preset], preset
        assert one[preset] == one["autoregressive[None]"], preset


def test_two_ranks_bf16_every_preset_equals_autoregressive():
    two = run_json(RUN + ["presets", "2", "bf16", "4096"])
    two.pop("memory_at_32k")
    for preset, tokens in two.items():
        assert tokens == two["autoregressive[None]"], preset


def test_two_ranks_decode_a_batch_as_they_decode_each_alone():
    """bf16, 2 ranks: three documents of different lengths (900-2100 tokens) decoded as one batch
    give, sequence for sequence, the tokens each gives alone, and TriForce gives plain decoding's."""
    two = run_json(RUN + ["batch", "2", "bf16"])
    for name in [k for k in two if not k.endswith("alone")]:
        assert two[name] == two[name + " alone"] == two["autoregressive[None] alone"], name


def test_two_ranks_sample_the_targets_distribution(small_vocab_models, monkeypatch):
    """triforce (draft model, gammas fixed at 3 and 2 so every cycle runs the whole chain) under 2
    ranks, T 0.6 / top-p 0.9: 2000 seeded samples of
    the first 3 tokens against the exact joint distribution (Pearson chi-square at 1e-3, as in
    test_exactness). Power, shown: the same run in one process with the public reference's
    verification bug (resampling from p after a rejection) fails the same test."""
    from scipy.stats import chi2

    from triforce.engine import Engine
    from triforce.settings import EngineSettings

    from .test_exactness import buggy_verify, spec_module

    target, draft = small_vocab_models
    knobs = {**KNOBS, "gamma": 3, "draft_gamma": 2}
    job = json.dumps({"prompt": PROMPT, "knobs": knobs})
    samples = run_json(RUN + ["samples", "2", str(target.path), str(draft.path), str(PARALLEL_SAMPLES), job])
    joint = exact_joint(target, PROMPT, SamplingParams(0.6, 0.9))
    stat, df = chi_square(samples, joint)
    assert stat < chi2.ppf(1 - ALPHA, df), f"chi-square {stat:.1f} (df {df})"

    monkeypatch.setattr(spec_module(), "verify", buggy_verify)
    engine = Engine(target, EngineSettings(method="triforce", draft=draft, **knobs))
    buggy = engine.generate(PROMPT, max_new_tokens=3, temperature=0.6, top_p=0.9, seed=11,
                            num_samples=PARALLEL_SAMPLES, ignore_eos=True).samples
    stat, df = chi_square(buggy, joint)
    assert stat > chi2.ppf(1 - ALPHA, df), f"the bug passed: chi-square {stat:.1f} (df {df})"


@pytest.mark.parametrize("sig, within", [(signal.SIGKILL, 10), (signal.SIGSTOP, 20)], ids=["killed", "hung"])
def test_a_killed_or_hung_rank_ends_the_other_with_one_clear_line(sig, within, tmp_path):
    """A worker killed mid-generation is noticed from its closed connection; one stopped (hung) at
    the collectives' timeout (5 s here). Rank 0 prints one line and exits 1."""
    from triforce.corpus import load_document

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(load_document("vim")[:20000])
    proc = subprocess.Popen(["triforce", "generate", "--tensor-parallel", "2", "--method", "autoregressive",
                             "--prompt-file", str(prompt), "--max-new-tokens", "4000", "--temperature", "1",
                             "--seed", "0", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TRIFORCE_TP_TIMEOUT": "5"})
    worker: list[int] = []
    try:
        assert proc.stdout is not None
        proc.stdout.read(40)  # decoding has started on both ranks
        worker = workers_of(proc.pid)
        assert len(worker) == 1
        os.kill(worker[0], sig)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - start < within
    finally:
        proc.kill()
        for pid in worker:  # a stopped worker left behind would hold its memory
            subprocess.run(["kill", "-9", str(pid)], capture_output=True)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("triforce: error: tensor parallelism: a rank of 2 stopped")


@pytest.mark.parametrize("args, message", [
    (["generate", "--tensor-parallel", "4", "--prompt", "hi"],
     "triforce: error: --tensor-parallel is 4, more than the model's 3 KV heads"),
    (["generate", "--tensor-parallel", "2", "--batch-file", "missing.jsonl"],
     "triforce: error: cannot read --batch-file 'missing.jsonl': No such file or directory"),
])
def test_bad_tensor_parallel_requests_get_one_line(args, message):
    done = subprocess.run(["triforce", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [message]


def test_torchrun_ranks_run_the_cli_together(embedded_fp32):
    """Ranks that torchrun started join one group; rank 0 prints what one process would."""
    from triforce.engine import Engine

    prompt = "The three laws of thermodynamics are"
    expect = Engine(embedded_fp32).generate(prompt, max_new_tokens=12).text
    done = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                           "triforce.cli", "generate", "--tensor-parallel", "2", "--dtype", "fp32",
                           "--method", "autoregressive", "--prompt", prompt, "--max-new-tokens", "12", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expect.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_with_two_ranks_answers_the_openai_client(embedded_fp32):
    """Three clients at once, decoded as one batch over 2 ranks, plus one that leaves mid-stream:
    each answer is what one process gives alone, and the server goes on answering after the cancel."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from triforce.engine import Engine

    port = free_port()
    server = subprocess.Popen(["triforce", "serve", "--tensor-parallel", "2", "--dtype", "fp32", "--draft", "ngram",
                               "--max-batch", "3", "--port", str(port), "--max-context", "2048"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.monotonic() + 180
        while True:
            try:
                model = client.models.list().data[0].id
                workers = workers_of(server.pid)
                break
            except Exception:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(1)
        prompts = ["Write one sentence about the sea.", "Name three rivers of Europe and say where they flow.",
                   "What is a lighthouse keeper's day like? Tell it as a short story with a storm in it."]
        stream = client.completions.create(model=model, prompt="Count from one to fifty in words:", max_tokens=200,
                                           temperature=0, stream=True)
        next(iter(stream))  # decoding has started; leave after the first piece
        stream.close()

        def ask(prompt: str) -> str:
            return client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0).choices[0].text

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, prompts))
        expect = [Engine(embedded_fp32).generate(p, max_new_tokens=16).text for p in prompts]
        assert answers == expect
        assert ask(prompts[0]) == expect[0]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0
    assert len(workers) == 1 and not still_running(workers)
