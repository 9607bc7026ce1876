"""`triforce distill` end to end on a tiny random target and a small real text."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import triforce
from triforce.corpus import load_document
from triforce.errors import TriforceError

from .conftest import make_hf_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("distill")
    target = make_hf_model(tmp / "target", tokenizer_dir, seed=5)
    corpus = tmp / "corpus.txt"
    corpus.write_text(load_document("jargon")[200_000:240_000])
    return tmp, target, corpus


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triforce.cli", "distill", *args], capture_output=True, text=True,
                          timeout=600)


SMALL = ["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
         "--seq-len", "64", "--batch", "4", "--lr", "3e-3", "--checkpoint-every", "5"]


def test_distill_trains_exports_and_resumes(setup):
    tmp, target, corpus = setup
    out = tmp / "draft"
    first = run("--target", str(target), "--out", str(out), "--corpus", str(corpus), "--steps", "40", *SMALL)
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads(first.stdout)
    history = json.loads((out / "distill_report.json").read_text())
    assert report["steps"] == 40 and history["steps"] == 40
    assert report["last_loss"] < report["first_loss"]  # the loss falls
    # loads in triforce and in transformers, with the target's tokenizer
    draft = triforce.load(out, dtype="fp32")
    tgt = triforce.load(target, dtype="fp32")
    assert draft.tokenizer.vocabulary() == tgt.tokenizer.vocabulary()
    assert draft.config.vocab_size == tgt.config.vocab_size
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.tensor([tgt.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        expected = hf(ids).logits[0]
    from triforce.cache import FullCache
    from triforce.model import Segment

    draft.decoder.prepare(ids.shape[1])
    cache = FullCache(draft.config, ids.shape[1], dtype=torch.float32)
    got = draft.decoder.forward([Segment(ids[0], cache, ids.shape[1])])[0]
    assert (got - expected).abs().max() < 1e-3  # bf16 weights, fp32 compute on both sides
    card = (out / "README.md").read_text()
    assert "corpus" in card and "40 steps" in card
    # resume continues from the checkpoint rather than starting over
    again = run("--target", str(target), "--out", str(out), "--corpus", str(corpus), "--steps", "50", "--resume",
                *SMALL)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at step 40" in again.stderr
    assert json.loads(again.stdout)["steps"] == 50
    # --init-from continues from the finished draft: its dimensions win over the command line's,
    # training starts near where it ended instead of at a fresh draft's loss, the card says so
    cont = run("--target", str(target), "--out", str(tmp / "continued"), "--corpus", str(corpus), "--steps", "5",
               "--init-from", str(out), *SMALL[:2], "--hidden", "48", *SMALL[4:])
    assert cont.returncode == 0, cont.stderr[-2000:]
    later = json.loads((tmp / "continued" / "distill_report.json").read_text())
    assert later["architecture"]["hidden"] == 32
    assert later["first_loss"] < 0.8 * history["first_loss"]
    assert later["continued_from"]["steps"] == 50
    assert "continued from:" in (tmp / "continued" / "README.md").read_text()
    missing = run("--target", str(target), "--out", str(tmp / "nowhere"), "--corpus", str(corpus), "--steps", "1",
                  "--init-from", str(tmp / "no-such-draft"), *SMALL)
    assert missing.returncode != 0 and "--init-from" in missing.stderr and "Traceback" not in missing.stderr


def test_distill_refuses_to_overwrite_and_bad_arguments(setup):
    tmp, target, corpus = setup
    out = tmp / "draft2"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = run("--target", str(target), "--out", str(out), "--corpus", str(corpus), "--steps", "1", *SMALL)
    assert result.returncode != 0 and "already holds a model" in result.stderr
    missing = run("--target", str(target), "--out", str(tmp / "x"), "--corpus", str(tmp / "nope.txt"), "--steps", "1")
    assert missing.returncode != 0 and "neither a named source" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_budget = run("--target", str(target), "--out", str(tmp / "y"), "--corpus", str(corpus))
    assert no_budget.returncode != 0 and "Traceback" not in no_budget.stderr


def test_mismatched_draft_is_refused(setup, embedded_fp32):
    _, target, _ = setup
    from triforce.engine import Engine
    from triforce.settings import EngineSettings

    with pytest.raises(TriforceError, match="vocabulary"):
        Engine(embedded_fp32, EngineSettings(method="triforce", draft=triforce.load(target, dtype="fp32")))


def test_fused_head_loss_matches_autograd():
    """The chunked output-layer + KD loss gives autograd's loss and gradients (float32)."""
    from triforce.distill import HeadKD, kd_loss

    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(1000, 32, requires_grad=True)
    top_p, top_i = torch.topk((torch.randn(300, 1000) * 2).softmax(-1), 16, dim=-1)
    ref = kd_loss(h @ w.T, top_i, top_p)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = HeadKD.apply(h, w, top_i, top_p, 128, torch.float32)
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-4
    assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)


def test_teacher_cache_grows_with_more_sequences_and_resets_on_other_text(tmp_path):
    from triforce.distill import TeacherCache

    seqs = torch.randint(0, 100, (5, 9))
    small = TeacherCache(tmp_path, seqs[:3], k=2)
    small.index[1] = 7
    small.probs[1] = 0.5
    small.done[1] = 1
    del small
    grown = TeacherCache(tmp_path, seqs, k=2)  # same first rows: the work done is kept
    assert grown.done.tolist() == [0, 1, 0, 0, 0]
    assert bool((grown.index[1] == 7).all()) and bool((grown.probs[1] == 0.5).all())
    assert bool((grown.index[3:] == 0).all())
    grown.done[4] = 1
    del grown
    other = seqs.clone()
    other[0, 0] += 1  # other text in a cached row: nothing may be reused
    reset = TeacherCache(tmp_path, other, k=2)
    assert reset.done.tolist() == [0, 0, 0, 0, 0]


def test_distill_head_refuses_bad_arguments_in_one_line(setup):
    tmp, target, corpus = setup
    bad = run("--head", "--target", str(target), "--out", str(tmp / "h"), "--corpus", str(corpus), "--steps", "1",
              "--coverage", "1.5")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    last = [line for line in bad.stderr.splitlines() if line.strip()][-1]
    assert last.endswith("--coverage must be in (0, 1], got 1.5")
    head = tmp / "h2"
    head.mkdir()
    (head / "head.json").write_text("{}")
    taken = run("--head", "--target", str(target), "--out", str(head), "--corpus", str(corpus), "--steps", "1")
    assert taken.returncode != 0 and "already holds a head" in taken.stderr and "Traceback" not in taken.stderr
    for args, message in [
        (["--chat-prompts", str(corpus)], "--chat-prompts trains draft heads only: add --head"),
        (["--head", "--chat-prompts", str(tmp / "none.txt")], "prompts '" + str(tmp / "none.txt") + "' are neither"),
        (["--head", "--chat-prompts", str(corpus)], "--chat-prompts needs a target with a chat template"),
    ]:
        bad = run("--target", str(target), "--out", str(tmp / "h3"), "--corpus", str(corpus), "--steps", "1", *args)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr, args
        assert message in [line for line in bad.stderr.splitlines() if line.strip()][-1], args


def test_distill_vocab_prunes_the_output_layer_and_decodes_exactly(setup):
    """--vocab K: the exported draft's output layer keeps the target's K most frequent greedy
    outputs (token_map), it loads in triforce, gives -inf to every other token, and speculative
    decoding with it stays token-identical to plain decoding."""
    from safetensors.torch import load_file

    from triforce.engine import Engine
    from triforce.settings import EngineSettings

    tmp, target, corpus = setup
    out = tmp / "pruned"
    done = run("--target", str(target), "--out", str(out), "--corpus", str(corpus), "--steps", "5", "--vocab", "20",
               *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pruned vocabulary: 20 tokens cover" in done.stderr
    weights = load_file(str(out / "model.safetensors"))
    token_map = weights["token_map"]
    assert token_map.shape == (20,) and len(token_map.unique()) == 20
    assert weights["lm_head.weight"].shape[0] == 20
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"][token_map])  # tied rows
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "pruned to 20 tokens" in (out / "README.md").read_text()
    assert json.loads((out / "distill_report.json").read_text())["pruned_vocab"] == 20
    draft, tgt = triforce.load(out, dtype="fp32"), triforce.load(target, dtype="fp32")
    ids = tgt.tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown fox")
    from triforce.cache import FullCache
    from triforce.model import Segment

    draft.decoder.prepare(len(ids))
    logits = draft.decoder.forward([Segment(torch.tensor(ids), FullCache(draft.config, len(ids), dtype=torch.float32),
                                            len(ids))])[0]
    outside = torch.ones(draft.config.vocab_size, dtype=torch.bool)
    outside[token_map] = False
    assert torch.isinf(logits[:, outside]).all() and torch.isfinite(logits[:, token_map]).all()
    plain = Engine(tgt, EngineSettings(method="autoregressive")).generate(ids, max_new_tokens=24, temperature=0.0)
    spec = Engine(tgt, EngineSettings(method="speculative", draft=draft, gamma=3)).generate(
        ids, max_new_tokens=24, temperature=0.0)
    assert spec.token_ids == plain.token_ids
    coverage = run("--target", str(target), "--out", str(tmp / "covered"), "--corpus", str(corpus), "--steps", "1",
                   "--coverage", "0.5", *SMALL)
    assert coverage.returncode == 0, coverage.stderr[-2000:]
    kept, share = re.search(r"pruned vocabulary: (\d+) tokens cover ([\d.]+)", coverage.stderr).groups()
    assert float(share) >= 0.5 and len(load_file(str(tmp / "covered" / "model.safetensors"))["token_map"]) == int(kept)
    bad = run("--target", str(target), "--out", str(tmp / "bad"), "--corpus", str(corpus), "--steps", "1",
              "--coverage", "1.5", *SMALL)
    assert bad.returncode != 0 and "--coverage must be in (0, 1], got 1.5" in bad.stderr
    assert "Traceback" not in bad.stderr
