"""The feature-level draft head: its forward against transformers' decoder layer, its files, the store of
features the levels leave it, and the level that keeps its rows in step with them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import triforce
from triforce.cache import FullCache, StreamingCache
from triforce.errors import TriforceError
from triforce.head import FeatureHead, load_head, random_head, save_head
from triforce.levels import FeatureStore, HeadLevel, ModelLevel
from triforce.model import Segment
from triforce.runner import Runner
from triforce.sampling import SamplingParams

from .conftest import VOCAB, make_hf_model

TOKENS = torch.tensor([0, 1, 2, 4, 5, 6, 8, 11])  # a pruned vocabulary: never 3, 7, 9, 10


def reference_head(config, weights, features, tokens, embed, lm_head):
    """The head's math with transformers' own Llama decoder layer (the correctness oracle)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hf = LlamaConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                     num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                     head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                     vocab_size=config.vocab_size)
    layer = LlamaDecoderLayer(hf, 0).eval()
    layer.load_state_dict({k.removeprefix("layer."): v for k, v in weights.items() if k.startswith("layer.")})
    x = torch.cat([features, embed[tokens]], -1) @ weights["fc.weight"].T
    T = len(tokens)
    positions = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        cos_sin = LlamaRotaryEmbedding(hf)(x[None], positions)
        out = layer(x[None], attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        h = (out[0] if isinstance(out, tuple) else out)[0]
    return h, h @ lm_head[weights["token_map"]].T


def test_the_head_is_a_llama_layer_over_fused_features(small_vocab_models):
    target, _ = small_vocab_models
    cfg = target.config
    weights = random_head(cfg, TOKENS, seed=1, scale=0.3)
    head = FeatureHead(target.decoder, dict(weights))
    torch.manual_seed(0)
    T = 9
    tokens, features = torch.randint(0, VOCAB, (T,)), torch.randn(T, cfg.hidden_size)
    cache = StreamingCache(head.config, 2, 16, dtype=torch.float32)
    head.prepare(cache.capacity)
    cache.rope = head.rope
    segment = Segment(tokens, cache, T, want_features=True, hidden_in=features)
    logits = head.forward([segment])[0]
    embed = target.decoder.embed
    want_h, want_logits = reference_head(cfg, weights, features, tokens, embed, target.decoder.lm_head.dense())
    assert (segment.features - want_h).abs().max() < 1e-4
    assert torch.isinf(logits[:, [3, 7, 9, 10]]).all()  # outside the token map: never proposed
    assert (logits[:, TOKENS] - want_logits).abs().max() < 1e-4


def test_a_head_round_trips_through_its_directory_and_refuses_another_target(small_vocab_models, tmp_path,
                                                                              tokenizer_dir):
    target, _ = small_vocab_models
    weights = random_head(target.config, TOKENS, seed=2)
    save_head(tmp_path / "head", target.config, weights)
    head = triforce.load_head(tmp_path / "head", target)
    assert torch.equal(head.token_map, TOKENS) and head.pruned_vocab == len(TOKENS)
    again = FeatureHead(target.decoder, dict(weights))
    cache_a, cache_b = (StreamingCache(head.config, 2, 16, dtype=torch.float32) for _ in range(2))
    for h, c in ((head, cache_a), (again, cache_b)):
        h.prepare(c.capacity)
        c.rope = h.rope
    x = torch.randn(3, target.config.hidden_size)
    a = head.forward([Segment(torch.tensor([1, 2, 4]), cache_a, 3, hidden_in=x)])[0]
    b = again.forward([Segment(torch.tensor([1, 2, 4]), cache_b, 3, hidden_in=x)])[0]
    assert torch.equal(a, b)
    wider = triforce.load(make_hf_model(tmp_path / "wide", tokenizer_dir, hidden_size=96, head_dim=24), dtype="fp32")
    with pytest.raises(TriforceError, match="made for another target.*hidden_size 64 vs 96"):
        load_head(tmp_path / "head", wider)
    with pytest.raises(TriforceError, match="made for another target"):
        FeatureHead(wider.decoder, dict(weights))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "head.json").write_text("{}")
    with pytest.raises(TriforceError, match="cannot read it"):
        load_head(tmp_path / "broken", target)


def test_the_feature_store_keeps_recent_positions_and_drops_judged_ones():
    store = FeatureStore(size=8)
    rows = torch.arange(12.0)[:, None].repeat(1, 3)
    store.write(0, rows[:6])
    assert store.take_changes() == 0 and store.length == 6
    store.write(4, rows[4:10])  # past the ring: positions 0 and 1 are gone
    assert store.held_from == 2 and torch.equal(store.read(2, 10), rows[2:10])
    with pytest.raises(ValueError, match="not held"):
        store.read(1, 4)
    assert store.take_changes() == 4
    store.write(7, rows[:1] - 1)  # a pass judged position 7 again: 8 and 9 belonged to its drafts
    assert store.length == 8 and torch.equal(store.read(7, 8), rows[:1] - 1) and store.take_changes() == 7


def test_the_head_level_keeps_its_rows_as_a_fresh_head_would_compute_them(small_vocab_models):
    """The target verifies, writing features; the head drafts, catching up on the rows whose features changed.
    After every cycle its next distribution equals that of a head built afresh on the same context and features
    (its window covers the whole text here)."""
    target, _ = small_vocab_models
    dec = target.decoder
    head = FeatureHead(dec, random_head(target.config, TOKENS, seed=3, scale=0.3))
    params = SamplingParams(0.0)

    def head_level(store: FeatureStore) -> HeadLevel:
        cache = StreamingCache(head.config, 2, 64, dtype=torch.float32)
        head.prepare(cache.capacity)
        cache.rope = head.rope
        return HeadLevel(head, cache, store, params)

    dec.prepare(128)
    store = FeatureStore(96)
    top = ModelLevel("target", Runner(dec), FullCache(target.config, 128, dtype=torch.float32), params)
    top.store = store
    level = head_level(store)
    context = [1, 5, 6, 2, 8, 4, 4, 5]
    top.score(context, [])
    gen = torch.Generator().manual_seed(0)
    for cycle in range(8):
        drafts, _, _ = level.propose(context, 3, gen)
        top.score(context, drafts)
        accepted = cycle % (len(drafts) + 1)
        context = context + drafts[:accepted] + [int(torch.randint(0, VOCAB, (1,), generator=gen))]
        top.rollback(len(context) - 1)
        fresh_store = FeatureStore(96)
        fresh_store.write(0, store.read(0, len(context) - 1))
        fresh = head_level(fresh_store)
        want, _ = fresh.catch_up(context)
        got, _ = level.catch_up(context)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        assert (got[finite] - want[finite]).abs().max() < 1e-3, cycle  # fp32 rows computed in other groupings


def test_distill_head_trains_a_head_the_engine_loads_and_runs_exactly(small_vocab_models, tmp_path):
    """A short `distill --head` run on text of the tiny target's words: its losses fall, it writes a head the
    engine loads, and decoding with it gives the target's own greedy tokens."""
    from triforce.distill_head import HeadDistillConfig, distill_head
    from triforce.engine import Engine
    from triforce.settings import EngineSettings

    target, _ = small_vocab_models
    rng = torch.Generator().manual_seed(0)
    words = [f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (6000,), generator=rng)]
    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(words))
    cfg = HeadDistillConfig(target=str(target.path), out=str(tmp_path / "head"), corpus=[str(corpus)], seq_len=32,
                            batch=4, steps=60, warmup=5, lr=3e-3, checkpoint_every=1000)
    report = distill_head(cfg, log=lambda message: None)
    first, last = report["first"], report["last"]
    assert last[0] + 0.1 * last[1] < first[0] + 0.1 * first[1]
    assert 0 <= report["heldout"]["greedy_agreement"] <= 1
    head = triforce.load_head(tmp_path / "head", target)
    prompt = [1] + [3 + (i * 5) % (VOCAB - 3) for i in range(20)]
    plain = Engine(target, EngineSettings()).generate(prompt, max_new_tokens=12, ignore_eos=True)
    for method in ("speculative", "triforce"):
        settings = EngineSettings(method=method, draft=head, budget=12, chunk_size=4, sink=2, window=6)
        got = Engine(target, settings).generate(prompt, max_new_tokens=12, ignore_eos=True)
        assert got.token_ids == plain.token_ids, method
    with pytest.raises(TriforceError, match="already holds a head"):
        distill_head(cfg, log=lambda message: None)


def test_distill_head_trains_on_the_targets_own_chat_answers(small_vocab_models, tmp_path, monkeypatch):
    """--chat-prompts: the target answers each prompt once (kept with what re-makes it: the same engine, seed and
    settings give the same answer), prompts are held out whole with their answers, the held-out chat figure is
    reported apart from the documents', and a resumed run reuses the answers instead of generating them again."""
    from triforce.distill import split_key
    from triforce.distill_head import CHAT_ANSWERS, HeadDistillConfig, distill_head
    from triforce.engine import Engine
    from triforce.settings import EngineSettings

    target, _ = small_vocab_models
    chatty = tmp_path / "target"
    shutil.copytree(target.path, chatty)
    (chatty / "chat_template.jinja").write_text("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}")
    target = triforce.load(chatty, dtype="fp32")
    rng = torch.Generator().manual_seed(1)
    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (3000,), generator=rng)))
    questions = [" ".join(f"w{(i * 3 + j) % (VOCAB - 3)}" for j in range(2 + i % 4)) for i in range(12)]
    (tmp_path / "prompts.txt").write_text("\n".join(questions) + "\n\n")
    cfg = HeadDistillConfig(target=str(chatty), out=str(tmp_path / "head"), corpus=[str(corpus)], seq_len=16,
                            batch=4, steps=4, warmup=1, checkpoint_every=1000,
                            chat_prompts=[str(tmp_path / "prompts.txt")], chat_tokens=24, chat_holdout=0.5)
    report = distill_head(cfg, log=lambda message: None)
    held = sum(split_key(q) < 0.5 for q in questions)
    assert 0 < held < len(questions)
    assert report["chat"]["prompts"] == len(questions) and report["chat"]["heldout_prompts"] == held
    assert report["heldout_chat"]["tokens"] > 0 and 0 <= report["heldout_chat"]["greedy_agreement"] <= 1
    records = [json.loads(line) for line in (tmp_path / "head" / CHAT_ANSWERS).read_text().splitlines()]
    assert [r["prompt"] for r in records] == questions
    assert report["chat"]["answer_tokens"] == sum(len(r["answer_ids"]) for r in records) > len(questions)
    engine = Engine(target, EngineSettings(method=records[0]["method"]))
    for r in records[:4]:
        again = engine.generate(r["prompt"], chat=True, max_new_tokens=r["max_new_tokens"], seed=r["seed"],
                                temperature=r["temperature"], top_p=r["top_p"])
        assert again.token_ids == r["answer_ids"] and engine.encode_prompt(r["prompt"], chat=True) == r["prompt_ids"]

    before = (tmp_path / "head" / CHAT_ANSWERS).read_bytes()

    def no_generation(*args, **kwargs):
        raise AssertionError("a resumed run generated an answer again")

    monkeypatch.setattr(Engine, "generate", no_generation)
    resumed = distill_head(HeadDistillConfig(**{**cfg.__dict__, "steps": 6}), resume=True, log=lambda message: None)
    assert resumed["steps"] == 6 and (tmp_path / "head" / CHAT_ANSWERS).read_bytes() == before
