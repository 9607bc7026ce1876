"""Speculation metrics: per-level counters, the CLI's summary, the server's Prometheus totals."""

from __future__ import annotations

from triforce.metrics import LevelStats, ServingCounters, summary


def test_level_counters_are_the_vllm_figures():
    stats = LevelStats("draft")
    stats.record(drafted=4, accepted=2)
    stats.record(drafted=2, accepted=2)
    stats.record(drafted=3, accepted=0)
    d = stats.as_dict()
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (3, 9, 4)
    assert d["draft_acceptance_rate"] == round(4 / 9, 4)
    assert d["mean_acceptance_length"] == round(1 + 4 / 3, 4)
    assert d["acceptance_at_position"] == [round(2 / 3, 4), round(2 / 3, 4), 0.0, 0.0]
    top = LevelStats("target", is_top=True).as_dict()
    assert "num_drafts" not in top  # the top verifies; it drafts for nobody


def generation_stats() -> dict:
    draft, middle = LevelStats("ngram"), LevelStats("target-retrieval", rebuilds=3, rebuild_s=0.5)
    draft.record(4, 3)
    middle.record(6, 5)
    controller = {"cycles": 9, "plain_fraction": 0.3333, "probes": 2,
                  "structures": {"ngram>target-retrieval>target": 6, "target": 3},
                  "gamma_histogram": {"ngram>target-retrieval>target": {"gamma": {"4": 5, "6": 1},
                                                                        "draft_gamma": {"2": 6}}}}
    return {"prefill_s": 1.0, "ms_per_token": 12.5, "tokens_per_s": 80.0, "new_tokens": 16, "method": "triforce",
            "decode_s": 0.2, "levels": [draft.as_dict(), middle.as_dict(), LevelStats("target", is_top=True).as_dict()],
            "controller": controller}


def test_summary_names_every_level():
    lines = summary(100, generation_stats()).splitlines()
    assert lines[0].startswith("prompt 100 tokens | prefill 1.00 s | decode 12.5 ms/token")
    assert "ngram" in lines[1] and "acceptance 0.750" in lines[1]
    assert "target-retrieval" in lines[2] and "3 rebuilds" in lines[2]
    assert "target" in lines[3] and "forward passes" in lines[3]
    assert lines[4] == ("  adaptive: 9 cycles, 33% plain decoding, 2 probes, most often ngram>target-retrieval>target "
                        "at gamma 4, draft gamma 2")


def test_summary_gives_each_ranks_memory_under_tensor_parallelism():
    stats = {**generation_stats(), "tensor_parallel": {"ranks": 2, "peak_rss_mb": [700, 580]}}
    last = summary(100, stats).splitlines()[-1]
    assert last == "  tensor parallel: 2 ranks, peak memory 700 MB / 580 MB (rank 0 first)"
    assert "tensor parallel" not in summary(100, generation_stats())
    batched = {**generation_stats(), "tensor_parallel": {"ranks": 2}}  # a batch's sequences gather no memory
    assert summary(100, batched).splitlines()[-1] == "  tensor parallel: 2 ranks"


def test_server_totals_add_up_per_level():
    counters = ServingCounters()
    counters.finished(100, generation_stats())
    counters.finished(50, generation_stats())
    counters.request("chat", 200)
    text = counters.render(queue_depth=2, running=1)
    assert 'triforce:spec_decode_num_draft_tokens_total{level="target-retrieval"} 12' in text
    assert 'triforce:spec_decode_num_accepted_tokens_total{level="ngram"} 6' in text
    assert "triforce:prompt_tokens_total 150" in text and "triforce:generation_tokens_total 32" in text
    assert 'triforce:requests_total{endpoint="chat",status="200"} 1' in text and "triforce:queue_depth 2" in text
    assert 'triforce:spec_decode_cycles_total{structure="target"} 6' in text  # plain decoding, both requests
    gamma4 = 'structure="ngram>target-retrieval>target",knob="gamma",value="4"'
    assert f"triforce:spec_decode_gamma_cycles_total{{{gamma4}}} 10" in text
    assert "triforce:spec_decode_probe_cycles_total 4" in text
