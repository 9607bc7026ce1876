"""The command line: output formats, and one clear line with a non-zero exit for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "triforce.cli", *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, env=env,
    )


def assert_clean_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]


def test_generate_json_output():
    result = run_cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {"text", "token_ids", "prompt_tokens", "stats"}
    assert len(out["token_ids"]) == 8 and out["prompt_tokens"] == 5
    stats = out["stats"]
    # the default for the embedded model: TriForce with the shipped draft
    assert stats["method"] == "triforce" and stats["new_tokens"] == 8
    # adaptive speculation: prompt lookup joins the draft as an alternative bottom
    assert [level["name"] for level in stats["levels"]] == ["ngram", "draft", "target-retrieval", "target"]
    assert stats["controller"]["cycles"] >= 1
    for key in ("prefill_s", "decode_s", "ms_per_token", "tokens_per_s"):
        assert stats[key] > 0


def test_generate_reports_weights_bytes_and_time_per_pass():
    """The embedded model runs on its GGUF blocks; --retrieval-weights puts the middle level on
    a 4-bit copy; the stats say what each level read and how long a pass took."""
    result = run_cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json",
                     "--quiet", "--method", "triforce", "--draft", "ngram", "--budget", "4", "--gamma", "3",
                     "--retrieval-weights", "q4_0")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert set(stats["weights_mb"]) == {"q4_1", "q8_0"} and 90 < sum(stats["weights_mb"].values()) < 100
    assert stats["peak_rss_mb"] > 0
    middle, top = stats["levels"][1], stats["levels"][2]
    assert middle["name"] == "target-retrieval" and top["name"] == "target"
    assert middle["mb_per_pass"] < top["mb_per_pass"]  # 4-bit weights, fewer KV rows
    assert middle["ms_per_pass"] > 0 and top["ms_per_pass"] > 0
    dense = run_cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--json", "--quiet",
                    "--method", "autoregressive", "--weights", "bf16")
    assert json.loads(dense.stdout)["stats"]["weights_mb"].keys() == {"dense"}
    assert json.loads(dense.stdout)["token_ids"][:8] == json.loads(result.stdout)["token_ids"][:8]


def test_generate_streams_text_and_prints_summary_from_stdin():
    result = run_cli("generate", "--max-new-tokens", "6", stdin="Once upon a time")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 0
    assert "ms/token" in result.stderr and "prompt 4 tokens" in result.stderr


@pytest.mark.parametrize("method", ["triforce", "retrieval"])
def test_demo_runs_the_main_job_on_a_real_document(method):
    """The README's main command (shortened): a generation over the Vim manual, then the
    autoregressive baseline on the cached prompt, with the same greedy tokens."""
    result = run_cli("demo", "--context", "512", "--max-new-tokens", "6", "--method", method, "--draft", "ngram",
                     "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 0
    assert f"method {method}" in result.stderr and "prompt " in result.stderr
    assert "acceptance" in result.stderr  # the per-level summary
    assert "speedup" in result.stderr and "identical output: yes" in result.stderr


def test_demo_samples_by_default_and_says_so():
    result = run_cli("demo", "--context", "256", "--max-new-tokens", "4", "--draft", "ngram")
    assert result.returncode == 0, result.stderr
    assert "sampled at temperature 0.7" in result.stderr and "identical output" not in result.stderr


def test_demo_refuses_bad_sampling_settings():
    assert_clean_error(run_cli("demo", "--context", "64", "--top-k", "-2"), "top-k")
    assert_clean_error(run_cli("demo", "--context", "64", "--temperature", "nan"), "temperature")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--temperature", "nan"], "temperature"),
        (["--prompt", "hi", "--top-p", "0"], "top-p"),
        (["--prompt", "hi", "--top-p", "1.5"], "top-p"),
        (["--prompt", "hi", "--top-k", "-3"], "top-k"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
        (["--prompt", "hi", "--model", "/nonexistent/model.gguf"], "does not exist"),
        (["--prompt", "hi", "--model", "someorg/somemodel"], "never downloads"),
        (["--prompt", "hi", "--dtype", "int3"], "dtype"),
        (["--prompt", "hi", "--weights", "q3_x"], "--weights"),
        (["--prompt", "hi", "--retrieval-weights", "int8"], "--retrieval-weights"),
        (["--prompt", "hi", "--kv-ram-budget", "12XB"], "--kv-ram-budget: expected a size such as 256MB"),
        (["--prompt", "hi", "--kv-ram-budget", "inf"], "--kv-ram-budget: expected a size such as 256MB"),
        (["--prompt", "hi", "--kv-ram-budget", "1MB"], "--kv-ram-budget needs an offload directory"),
        (["--prompt", "hi", "--kv-offload", "/nonexistent/dir"], "--kv-offload is not a directory"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, fragment):
    assert_clean_error(run_cli("generate", *args), fragment)


def test_a_kv_ram_budget_too_small_for_the_offloaded_cache(tmp_path):
    prompt = " ".join(f"word{i}" for i in range(600))
    result = run_cli("generate", "--prompt", prompt, "--max-new-tokens", "2", "--kv-offload", str(tmp_path),
                     "--kv-ram-budget", "1MiB", "--draft", "ngram")
    assert_clean_error(result, "--kv-ram-budget is 1 MiB, but at")
    assert os.listdir(tmp_path) == []


def test_size_flags_read_decimal_and_binary_units():
    from triforce.cli import _size

    assert _size("256MB") == 256 * 10**6 and _size("2GiB") == 2 * 2**30 and _size("512M") == 512 * 2**20
    assert _size("1.5GB") == 1_500_000_000 and _size("4096") == 4096


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert_clean_error(run_cli("generate", "--prompt", "hi", "--model", str(bad)), "GGUF")


def test_prompt_longer_than_max_context():
    result = run_cli("generate", "--prompt", "one two three four five six seven eight", "--max-context", "4")
    assert_clean_error(result, "--max-context")


def test_kv_cache_that_cannot_fit_is_refused_before_allocation():
    result = run_cli("generate", "--prompt", "hello", "--max-new-tokens", "2000000000")
    assert_clean_error(result, "GiB")


def test_a_draft_head_made_for_another_target_is_refused_in_one_line(tmp_path):
    import torch

    from triforce.config import ModelConfig
    from triforce.head import random_head, save_head

    other = ModelConfig("llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64,
                        tie_word_embeddings=True)
    save_head(tmp_path / "head", other, random_head(other, torch.arange(10)))
    result = run_cli("generate", "--prompt", "hi", "--draft", str(tmp_path / "head"), "--max-new-tokens", "2")
    assert_clean_error(result, "was made for another target (hidden_size 32 vs 576")
