"""The KV cache on disk: the same logits and tokens as in RAM, the file's size and lifetime, and
clear errors for bad directories, budgets, full disks and damaged files."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from triforce.batch import generate_batch
from triforce.cache import FullCache
from triforce.engine import Engine
from triforce.errors import SettingError, TriforceError
from triforce.model import Segment
from triforce.offload import OffloadedCache, block_rows, round_up
from triforce.sampling import SamplingParams
from triforce.settings import EngineSettings

from .conftest import VOCAB
from .test_exactness import ALPHA, SAMPLES, TickClock, chi_square, exact_joint

# long enough that the tiny model's rows are written out and read back (64 rows per I/O block)
LONG_PROMPT = [1] + [3 + (i * 7) % (VOCAB - 3) for i in range(159)]


def fully_offloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer on disk whatever the model's size (a tiny model's cache fits any budget)."""
    def plan(self: Engine, capacity: int) -> tuple[int, int] | None:
        return None if self.settings.kv_offload is None else (0, max(self.settings.prefill_chunk, 64) + 64)

    monkeypatch.setattr(Engine, "_offload_plan", plan)


def run(decoder, cache, tokens: list[int]) -> torch.Tensor:
    return decoder.forward([Segment(torch.tensor(tokens), cache, len(tokens))])[0]


@pytest.mark.parametrize("ram_layers", [0, 1])
def test_offloaded_cache_gives_the_in_ram_logits_bit_for_bit(small_vocab_models, tmp_path, ram_layers):
    """Prompt chunks, decoding steps, verifications with rejections, and a rollback below the
    rows already written to the file: every pass's logits equal the in-RAM cache's exactly."""
    target, _ = small_vocab_models
    dec = target.decoder
    dec.prepare(256)
    ram = FullCache(target.config, 256, dtype=torch.float32)
    disk = OffloadedCache(target.config, 256, torch.float32, str(tmp_path), ram_layers, tail_rows=80)
    assert disk.tail_rows == 128 and disk.disk_layers == 2 - ram_layers
    gen = torch.Generator().manual_seed(0)

    def both(tokens: list[int]) -> None:
        assert torch.equal(run(dec, ram, tokens), run(dec, disk, tokens))

    for _ in range(4):  # prompt chunks: rows 0..159 pass through the tail into the file
        both(torch.randint(0, VOCAB, (40,), generator=gen).tolist())
    assert disk.tail_start == 64 and disk.file.written_bytes > 0
    for step in range(30):
        both(torch.randint(0, VOCAB, (5 if step % 3 else 1,), generator=gen).tolist())
        if step % 3 == 1:  # a verification kept 2 of its 5 rows
            for cache in (ram, disk):
                cache.truncate(cache.length - 3)
    assert disk.tail_start > 100 and disk.file.read_bytes > 0
    for cache in (ram, disk):  # back below the file's rows (another sample of a shorter prompt)
        cache.truncate(100)
    assert disk.tail_start == 64
    for _ in range(12):
        both(torch.randint(0, VOCAB, (7,), generator=gen).tolist())
    disk.close()


def test_offload_file_size_and_lifetime(small_vocab_models, tmp_path):
    """The file holds [disk layers, K|V, kv heads, capacity rounded to whole blocks, head_dim];
    it is unlinked at once (gone even if the process dies) unless kept."""
    target, _ = small_vocab_models
    cfg = target.config
    align = block_rows(cfg, torch.float32)
    cache = OffloadedCache(cfg, 200, torch.float32, str(tmp_path), 0, tail_rows=64)
    assert align == 64 and cache.capacity == round_up(200, align) == 256
    assert cache.file.size == cfg.num_layers * 2 * cfg.num_kv_heads * 256 * cfg.head_dim * 4
    assert os.listdir(tmp_path) == []
    cache.close()
    kept = OffloadedCache(cfg, 200, torch.float32, str(tmp_path), 1, tail_rows=64, keep_file=True)
    (name,) = os.listdir(tmp_path)
    assert os.path.getsize(tmp_path / name) == kept.file.size == 1 * 2 * cfg.num_kv_heads * 256 * cfg.head_dim * 4
    kept.close()


METHODS = [("autoregressive", None), ("speculative", "ngram"), ("retrieval", None), ("streaming", None),
           ("triforce", "ngram"), ("triforce", "shipped")]


@pytest.mark.parametrize("dtype, methods", [("fp32", METHODS[-2:]), ("bf16", METHODS)], ids=["fp32", "bf16"])
def test_greedy_with_the_cache_on_disk_equals_in_ram(embedded_fp32, embedded_bf16, tmp_path, dtype, methods):
    """Every method, on a real document, with a RAM budget far below the cache: the same tokens
    as decoding in RAM, with most layers on disk; a second request reuses the prompt's rows."""
    from triforce.corpus import document_tokens
    from triforce.loading import default_draft, load_draft

    target = embedded_fp32 if dtype == "fp32" else embedded_bf16
    if dtype == "bf16" and target.decoder.dtype != torch.bfloat16:
        pytest.skip("no bf16 on this CPU")
    prompt = document_tokens(target.tokenizer, "jargon", 1200, offset=5000)
    shipped = load_draft(default_draft(target), target)
    knobs = dict(budget=256, window=128, prefill_chunk=256)
    budget = (52 if dtype == "fp32" else 26) << 20  # the cache alone takes 57 / 28 MB
    for method, draft in methods:
        d = shipped if draft == "shipped" else draft
        ram = Engine(target, EngineSettings(method=method, draft=d, **knobs)).generate(
            prompt, max_new_tokens=40, ignore_eos=True)
        engine = Engine(target, EngineSettings(method=method, draft=d, kv_offload=str(tmp_path),
                                               kv_ram_budget=budget, **knobs))
        disk = engine.generate(prompt, max_new_tokens=40, ignore_eos=True)
        assert disk.token_ids == ram.token_ids, (method, draft)
        cache = engine._full
        assert isinstance(cache, OffloadedCache) and cache.disk_layers >= 10, cache.ram_layers
        kv = disk.stats["kv_offload"]
        assert kv["read_mb_per_token"] > 0 and kv["ram_mb"] <= budget / 1e6
    again = engine.generate(prompt + ram.token_ids[:5], max_new_tokens=20, ignore_eos=True)
    alone = Engine(target, EngineSettings(method="triforce", draft=shipped, **knobs)).generate(
        prompt + ram.token_ids[:5], max_new_tokens=20, ignore_eos=True)
    assert again.stats["cached_prompt_tokens"] >= len(prompt) - 256 and again.token_ids == alone.token_ids
    engine.release()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("preset", ["triforce", "triforce-ngram", "streaming"])
def test_sampling_distribution_with_the_cache_on_disk(small_vocab_models, tmp_path, monkeypatch, preset):
    """10^4 seeded samples of 3 tokens after a 160-token prompt (rows written to the file and
    read back every pass; each sample rolls the cache back to the prompt) against the exact
    joint distribution: Pearson chi-square at significance 1e-3, as in test_exactness (whose
    reference-bug test shows the statistic's power)."""
    from scipy.stats import chi2

    fully_offloaded(monkeypatch)
    target, draft = small_vocab_models
    params = SamplingParams(0.6, 0.9)
    joint = exact_joint(target, LONG_PROMPT, params)
    method, d = {"triforce": ("triforce", draft), "triforce-ngram": ("triforce", "ngram"),
                 "streaming": ("streaming", None)}[preset]
    settings = EngineSettings(method=method, draft=d, budget=24, chunk_size=4, sink=2, window=12, prefill_chunk=16,
                              kv_offload=str(tmp_path))
    engine = Engine(target, settings, clock=TickClock())
    result = engine.generate(LONG_PROMPT, max_new_tokens=3, temperature=0.6, top_p=0.9, seed=99,
                             num_samples=SAMPLES, ignore_eos=True)
    assert isinstance(engine._full, OffloadedCache) and engine._full.tail_start == 128
    stat, df = chi_square(result.samples, joint)
    assert stat < chi2.ppf(1 - ALPHA, df), f"chi-square {stat:.1f} (df {df})"


def test_batched_with_the_cache_on_disk_equals_alone(small_vocab_models, tmp_path, monkeypatch):
    fully_offloaded(monkeypatch)
    target, draft = small_vocab_models
    settings = EngineSettings(method="triforce", draft=draft, budget=24, chunk_size=4, sink=2, window=12,
                              prefill_chunk=16, kv_offload=str(tmp_path))
    prompts = [LONG_PROMPT, LONG_PROMPT[:130] + [4, 5, 6]]
    batched = generate_batch(target, [{"prompt": p, "max_new_tokens": 12} for p in prompts], settings)
    for p, out in zip(prompts, batched):
        alone = Engine(target, settings.replace(kv_offload=None)).generate(p, max_new_tokens=12)
        assert out.token_ids == alone.token_ids


# -- bad input ------------------------------------------------------------------------------------
def test_bad_directories_are_clear_errors(small_vocab_models, tmp_path, monkeypatch):
    fully_offloaded(monkeypatch)
    target, _ = small_vocab_models
    a_file = tmp_path / "file"
    a_file.write_text("")
    for where, message in [(tmp_path / "missing", "kv_offload is not a directory"),
                           (a_file, "kv_offload is not a directory")]:
        engine = Engine(target, EngineSettings(kv_offload=str(where)))
        with pytest.raises(SettingError, match=message):
            engine.generate(LONG_PROMPT, max_new_tokens=2)
    with pytest.raises(SettingError, match="kv_ram_budget needs an offload directory"):
        EngineSettings(kv_ram_budget=1 << 20)
    with pytest.raises(SettingError, match="kv_ram_budget must be a number of bytes"):
        EngineSettings(kv_offload=str(tmp_path), kv_ram_budget=0)
    with pytest.raises(SettingError, match="gamma plus draft_gamma must be below 64 with kv_offload"):
        EngineSettings(method="triforce", draft="ngram", gamma=60, draft_gamma=4, kv_offload=str(tmp_path))


def test_a_budget_below_what_must_stay_in_ram(embedded_fp32, tmp_path):
    engine = Engine(embedded_fp32, EngineSettings(method="triforce", draft="ngram", kv_offload=str(tmp_path),
                                                  kv_ram_budget=8 << 20))
    with pytest.raises(SettingError, match=r"kv_ram_budget is 8 MiB, but at \d+ tokens the retrieval cache, "
                                           r"staging buffers and newest rows need \d+ MiB"):
        engine.generate(list(range(5, 3000)), max_new_tokens=4)
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_a_clear_error_and_the_next_run_recovers(small_vocab_models, tmp_path, monkeypatch):
    fully_offloaded(monkeypatch)
    target, _ = small_vocab_models
    settings = EngineSettings(prefill_chunk=16, kv_offload=str(tmp_path))
    expected = Engine(target).generate(LONG_PROMPT, max_new_tokens=8).token_ids

    def no_space(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:  # the file cannot even be reserved
        m.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(TriforceError, match="cannot make the .* KV offload file in .*: No space left"):
            Engine(target, settings).generate(LONG_PROMPT, max_new_tokens=8)
    assert os.listdir(tmp_path) == []
    engine = Engine(target, settings)
    with monkeypatch.context() as m:  # a write fails mid-prefill
        m.setattr(os, "pwritev", no_space)
        with pytest.raises(TriforceError, match="writing the KV offload file failed: No space left on device"):
            engine.generate(LONG_PROMPT, max_new_tokens=8)
    assert engine.generate(LONG_PROMPT, max_new_tokens=8).token_ids == expected


def test_a_file_cut_short_while_in_use(embedded_fp32, tmp_path, monkeypatch):
    fully_offloaded(monkeypatch)
    engine = Engine(embedded_fp32, EngineSettings(prefill_chunk=64, kv_offload=str(tmp_path)))
    generation = engine.stream(list(range(5, 300)), max_new_tokens=20)
    next(generation)  # prefilled: the first rows are in the file, read again by every pass
    os.ftruncate(engine._full.file.fd, 0)
    with pytest.raises(TriforceError, match="the KV offload file was cut short while in use"):
        list(generation)
    assert engine._full.broken
    again = engine.generate(list(range(5, 300)), max_new_tokens=6)  # on a new file
    assert again.token_ids == Engine(embedded_fp32).generate(list(range(5, 300)), max_new_tokens=6).token_ids


def test_several_samples_restore_the_views_of_an_offloaded_cache(embedded_fp32, tmp_path, monkeypatch):
    """Each sample of one prompt starts from the views as they were after the prompt, even when
    the first sample's windows moved far past it: greedy samples all equal decoding in RAM."""
    fully_offloaded(monkeypatch)
    prompt = list(range(5, 400))
    for method, draft in (("streaming", None), ("triforce", "ngram")):
        settings = EngineSettings(method=method, draft=draft, budget=96, window=48, prefill_chunk=64)
        alone = Engine(embedded_fp32, settings).generate(prompt, max_new_tokens=100, ignore_eos=True)
        engine = Engine(embedded_fp32, settings.replace(kv_offload=str(tmp_path)))
        out = engine.generate(prompt, max_new_tokens=100, ignore_eos=True, num_samples=2)
        assert out.samples == [alone.token_ids] * 2, method


def test_a_view_of_an_offloaded_cache_is_first_priced_without_the_disk(small_vocab_models, tmp_path):
    """Adaptive speculation's first guess of a view's pass cost: a fraction of the default that falls
    as more of the top's cache is on disk (a view never reads it); the default for a cache in RAM."""
    from triforce.controller import default_prior_cost

    target, _ = small_vocab_models
    engine = Engine(target, EngineSettings(method="retrieval", kv_offload=str(tmp_path)))
    default = default_prior_cost("target-retrieval")
    ratios = []
    for ram_layers in (1, 0):
        cache = OffloadedCache(target.config, 4096, torch.float32, str(tmp_path), ram_layers, tail_rows=64)
        prior = engine._offloaded_view_prior(cache)
        assert prior["target-retrieval"][1] == default[1]
        ratios.append(prior["target-retrieval"][0])
        cache.close()
    assert default[0] > ratios[0] > ratios[1] > 0
    assert engine._offloaded_view_prior(FullCache(target.config, 64, dtype=torch.float32)) is None
