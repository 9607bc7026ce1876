"""`triforce bench decode|acceptance|gamma|batch|serve --quick`: the whole pipeline on a tiny random model, the
files it writes, the lossless checks it reports; bad flags give one line and a non-zero exit."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from triforce import native
from triforce.cli import main
from triforce.errors import TriforceError

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def quick(bench: str, out, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "triforce.cli", "bench", bench, "--quick", "--out", str(out), *args],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / f"{bench}.md").read_text().startswith("|")
    return json.loads((out / f"{bench}.json").read_text())


def in_unit_interval(values) -> bool:
    return all(v is not None and 0.0 <= v <= 1.0 for v in values)


def test_decode_quick(tmp_path):
    report = quick("decode", tmp_path)
    assert report["kernels"] == native.kernels()
    ours = [r for r in report["summary"] if r["engine"] == "triforce"]
    assert {r["context"] for r in ours} == {256, 512}
    assert {r["method"] for r in ours} == {
        "autoregressive", "retrieval", "streaming", "speculative[ngram]", "speculative[draft]", "triforce[ngram]",
        "triforce[draft]"}
    for r in ours:
        assert r["ms_per_token"] > 0 and in_unit_interval(r["acceptance"])
        assert r["exact"] is (True if r["temperature"] == 0 else None), r  # lossless: greedy = autoregressive
    for c in report["contexts"]:  # the target's perplexity on the document's true continuation
        assert c["perplexity"] > 1 and math.isfinite(c["perplexity"]) and c["perplexity_short"] > 1
    if HAS_TRANSFORMERS:
        assert {"hf", "hf-assisted", "hf-lookup"} <= set(report["peers"])
        hf = [r for r in report["summary"] if r["method"] == "hf"]
        assert hf and all(r["speedup_vs_hf"] == 1.0 for r in hf)
        assert all(r["exact"] for r in hf if r["temperature"] == 0)  # same fp32 model: same greedy tokens
    if HAS_MATPLOTLIB:
        assert (tmp_path / "decode_speedup_T0.png").stat().st_size > 1000
        assert (tmp_path / "decode_speedup_T0.6.png").exists()


def test_decode_compares_weights_and_retrieval_weights(tmp_path):
    """--weights runs each format as its own target (speedups over the first one's plain
    decoding), --retrieval-weights each retrieval level's weights; all stay lossless, and the
    quantized runs read fewer bytes per token."""
    from triforce.quant import kernel_supports

    code = main(["bench", "decode", "--quick", "--contexts", "256", "--methods", "autoregressive,retrieval",
                 "--temperatures", "0", "--weights", "bf16,q8_0", "--retrieval-weights", "model,q4_0",
                 "--peers", "none", "--dtype", "bf16", "--out", str(tmp_path)])
    assert code == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "decode.json").read_text())["summary"]}
    assert set(rows) == {f"{m} @{w}" for w in ("bf16", "q8_0")
                         for m in ("autoregressive", "retrieval", "retrieval middle q4_0")}
    assert rows["autoregressive @bf16"]["speedup"] == 1.0 and all(r["exact"] for r in rows.values())
    if kernel_supports("q8_0"):  # else quantized weights run dequantized
        assert rows["autoregressive @q8_0"]["mb_per_token"] < rows["autoregressive @bf16"]["mb_per_token"]


def test_decode_sets_adaptive_against_plain_and_a_fixed_sweep(tmp_path):
    """--sweep runs fixed gammas beside the adaptive default, over several documents, and adds
    the grid (adaptive against plain decoding and the best fixed setting per cell) and its heat
    maps."""
    code = main(["bench", "decode", "--quick", "--contexts", "256", "--methods", "autoregressive,triforce",
                 "--drafts", "ngram", "--sweep", "2/1,4/2", "--document", "vim,jargon", "--temperatures", "0,1",
                 "--peers", "none", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "decode.json").read_text())
    methods = {r["method"] for r in report["summary"]}
    assert methods == {"autoregressive", "triforce[ngram]", "triforce[ngram] g2/1", "triforce[ngram] g4/2"}
    assert {(g["document"], g["temperature"]) for g in report["grid"]} == {(d, t) for d in ("vim", "jargon")
                                                                          for t in (0.0, 1.0)}
    for g in report["grid"]:
        assert g["method"] == "triforce[ngram]" and g["best_fixed"] in methods and g["vs_plain"] > 0
        assert 0 <= g["plain_fraction"] <= 1
    if HAS_MATPLOTLIB:
        assert (tmp_path / "decode_adaptive_vim.png").exists() and (tmp_path / "decode_adaptive_jargon.png").exists()


def test_engine_bench_prefills_afresh_every_repeat(tmp_path):
    """Repeats measure prefill, so none may be served by the prompt cache of the one before."""
    from triforce.bench import engine

    report = engine.run([96], new_tokens=3, repeats=2, with_transformers=False, out=tmp_path, log=lambda *_: None)
    plain = [m for m in report["raw"] if m["engine"] == "triforce" and m["method"] == "autoregressive"]
    assert len(plain) == 2 and all(m["cached_prompt_tokens"] == 0 for m in plain)
    assert [r["kernels"] for r in report["rows"]] == [native.kernels()] and report["rows"][0]["identical"]


def test_engine_bench_compares_kernel_paths_side_by_side(tmp_path):
    """--isa runs plain decoding and triforce on each path in one process; each path's triforce
    output equals its own plain decoding, and the run leaves the environment's path in place."""
    from triforce.bench import engine

    before = native.kernels()
    isas = [*native.cpu_isas(), "none"]
    report = engine.run([96], new_tokens=4, repeats=1, with_transformers=False, out=tmp_path, log=lambda *_: None,
                        isas=isas)
    assert [r["kernels"] for r in report["rows"]] == [*native.cpu_isas(), "pytorch"]
    assert all(r["identical"] and r["triforce_ms"] > 0 for r in report["rows"])
    assert native.kernels() == before
    with pytest.raises(TriforceError, match="unknown --isa 'sse'"):
        engine.run([96], isas=["sse"], with_transformers=False, log=lambda *_: None)


def test_acceptance_quick(tmp_path):
    report = quick("acceptance", tmp_path)
    rows = report["rows"]
    assert {(r["prompt"], r["cache"]) for r in rows} == {
        (p, c) for p in ("document", "needle") for c in ("retrieval", "streaming", "oracle")}
    assert sorted({r["budget"] for r in rows if r["cache"] == "oracle"}) == [64, 128, 384]
    assert sorted(r["chunk_size"] for r in rows if r["prompt"] == "needle" and r["cache"] == "retrieval"
                  and r["budget"] == report["chunk_budget"]) == [1, 8, 16]
    assert in_unit_interval([r["acceptance"] for r in rows])
    assert all(r["exact"] for r in rows)  # every sparse level still yields the full target's tokens
    for prompt in ("document", "needle"):  # the exact-attention oracle keeps what the target reads
        oracle = max((r for r in rows if r["prompt"] == prompt and r["cache"] == "oracle"), key=lambda r: r["budget"])
        assert oracle["acceptance"] >= 0.75, oracle
    assert "target_found_needle" in report["prompts"]["needle"]
    if HAS_MATPLOTLIB:
        for name in ("acceptance_budget_document", "acceptance_budget_needle", "acceptance_chunk"):
            assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_gamma_quick(tmp_path):
    report = quick("gamma", tmp_path)
    configs = {(r["method"], r["gamma"], r["draft_gamma"]) for r in report["rows"]}
    assert configs == {("autoregressive", None, None), ("speculative", 2, None), ("speculative", 4, None),
                       *(("triforce", g, dg) for g in (2, 4) for dg in (1, 2))}
    for r in report["rows"]:
        assert r["exact"] is True and r["tokens_per_s"] > 0 and in_unit_interval(r["acceptance"])
        assert len(r["acceptance"]) == {"autoregressive": 0, "speculative": 1, "triforce": 2}[r["method"]]
    if HAS_MATPLOTLIB:
        assert (tmp_path / "gamma_tokens_per_s.png").exists() and (tmp_path / "gamma_acceptance.png").exists()


def test_batch_quick(tmp_path):
    report = quick("batch", tmp_path)
    rows = report["rows"]
    assert {(r["context"], r["batch"]) for r in rows} == {(c, b) for c in (256, 512) for b in (1, 2, 3)}
    assert {r["method"] for r in rows} == {"autoregressive", "streaming", "retrieval", "triforce[draft]",
                                           "triforce[ngram]"}
    for r in rows:
        assert r["exact"] is True, r  # every sequence of every batch equals its autoregressive tokens
        assert r["tokens_per_s"] > 0 and in_unit_interval(r["acceptance"])
        if r["method"] == "autoregressive":  # equal prompts decode in lockstep: every pass holds the batch
            assert r["sequences_per_pass"] == r["batch"] and r["achieved_gbs"] > 0
            assert r["speedup_vs_batched_ar"] == 1.0
        else:
            assert 1.0 <= r["sequences_per_pass"] <= r["batch"]
    if HAS_MATPLOTLIB:
        assert (tmp_path / "batch_tokens_per_s_256.png").exists()


def test_serve_quick(tmp_path):
    """Two real servers (--max-batch 3 and 1) on the tiny model, three concurrent streaming clients."""
    report = quick("serve", tmp_path)
    assert [r["max_batch"] for r in report["rows"]] == [3, 1]
    assert all(r["tokens_per_s"] > 0 and r["ttft_s"] > 0 for r in report["rows"])
    assert report["rows"][1]["vs_max_batch_1"] == 1.0
    assert report["same_text"] is True  # batching changed no client's greedy text


def test_parallel_bench_compares_rank_counts_side_by_side(tmp_path):
    """One process per rank count, jobs alternating; each row has every rank's memory, and both
    rank counts give the same greedy tokens."""
    from triforce.bench.parallel import communication_bytes

    result = subprocess.run([sys.executable, "-m", "triforce.cli", "bench", "parallel", "--contexts", "256",
                             "--ranks", "1,2", "--methods", "autoregressive,triforce", "--new-tokens", "4",
                             "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "parallel.json").read_text())
    rows = report["rows"]
    assert [(r["method"], r["ranks"]) for r in rows] == [("autoregressive", 1), ("autoregressive", 2),
                                                         ("triforce", 1), ("triforce", 2)]
    assert [len(r["peak_rss_mb"]) for r in rows] == [1, 2, 1, 2] and all(r["ms"] > 0 for r in rows)
    assert report["bytes_sent_per_token_per_rank"] == {"2": communication_bytes(576, 30, 49152, 2)}
    assert communication_bytes(576, 30, 49152, 2) == 4 * (2 * 30 * 576 + 24576)


def test_kernels_quick(tmp_path):
    report = quick("kernels", tmp_path)
    assert {(r["context"], r["queries"]) for r in report["attention"]} == {(256, 1), (256, 5)}
    assert all(r["us_per_layer"] > 0 and r["gbs"] > 0 for r in report["attention"])
    paths = {r["path"] for r in report["attention"]}
    assert paths in ({"staged", "grouped"}, {"-"})  # both multi-row paths where the CPU has them
    assert all(r["vs_one_query"] == 1.0 for r in report["attention"] if r["queries"] == 1)
    # a pass = attention + projections, per weights format, path and token count, against one token
    assert {(r["weights"], r["path"], r["queries"]) for r in report["passes"]} == {
        (w, p, t) for w in ("bf16", "auto") for p in paths for t in (1, 5)}
    assert all(r["pass_ms"] == pytest.approx(r["attention_ms"] + r["projection_ms"], abs=0.02)
               for r in report["passes"])
    assert [(r["weights"], r["rows"]) for r in report["projections"]] == [("bf16", 1), ("auto", 1), ("bf16", 5),
                                                                          ("auto", 5)]
    assert report["projections"][1]["mb"] < report["projections"][0]["mb"] / 2  # the GGUF's 4-bit blocks
    assert all(r["ms"] > 0 and r["gmacs"] > 0 for r in report["projections"])
    assert [(r["context"], r["new_tokens"]) for r in report["prefill"]] == [(256, 96)]
    assert all(r["kernel_ms"] > 0 and r["flash_ms"] > 0 and r["kernel_speedup"] > 0 for r in report["prefill"])
    peak = report["mac_peak_gmacs"]
    if peak["1"] is not None:  # the measured ceiling bounds what the kernels do (noise allowed)
        assert report["mac_instruction"] == {"avx512": "bf16 pair dot product",
                                             "avx2": "float32 multiply-add (8 lanes)"}[native.kernels()]
        assert peak["1"] > 0
        assert all(0 < r["gmacs"] <= 1.5 * peak[str(r["threads"])] for r in report["attention"])
        assert all(0 < r["ceiling_share"] <= 1.5 for r in report["projections"])
        chains = report["mac_gmacs_by_chains"]
        assert list(chains) == ["2", "4", "6", "8", "12", "16"]
        # two chains wait on the instruction's latency (about a third of the rate here)
        assert 0 < chains["2"] < 0.8 * max(chains.values())


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["decode", "--contexts", "0"], "--contexts"),
        (["decode", "--contexts", "512,abc"], "--contexts"),
        (["decode", "--methods", "autoregressive,beam"], "unknown method 'beam'"),
        (["decode", "--peers", "vllm"], "unknown peer 'vllm'"),
        (["decode", "--temperatures", "-1"], "--temperatures"),
        (["acceptance", "--budgets", "-5"], "--budgets"),
        (["acceptance", "--context", "512", "--budgets", "512,1024"], "every budget"),
        (["acceptance", "--needle-depth", "1.5"], "--needle-depth"),
        (["acceptance", "--new-tokens", "1"], "--new-tokens"),
        (["gamma", "--gammas", "0,2"], "--gammas"),
        (["gamma", "--temperature", "-0.5"], "temperature"),
        (["gamma", "--quick", "--dtype", "fp8"], "--dtype"),
        (["batch", "--batch-sizes", "0,2"], "--batch-sizes"),
        (["batch", "--methods", "autoregressive,beam"], "unknown method 'beam'"),
        (["batch", "--temperature", "-1"], "temperature"),
        (["serve", "--max-batch", "1"], "--max-batch >= 2"),
        (["serve", "--method", "beam"], "unknown method 'beam'"),
        (["kernels", "--queries", "0"], "--queries"),
        (["kernels", "--prefill-queries", "0"], "--prefill-queries"),
        (["decode", "--quick", "--sweep", "4-2"], "--sweep"),
        (["decode", "--quick", "--weights", "q3"], "--weights"),
        (["parallel", "--methods", "autoregressive,beam"], "unknown method 'beam'"),
        (["parallel", "--ranks", "1,4"], "--ranks is 4, more than the model's 3 KV heads"),
    ],
)
def test_bad_flags_give_one_line_and_nonzero_exit(args, fragment, capsys, tmp_path):
    try:
        code = main(["bench", *args, "--out", str(tmp_path)])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    assert code != 0
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("triforce: error: ") and fragment in lines[0], err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before anything ran
