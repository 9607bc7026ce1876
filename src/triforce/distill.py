"""`triforce distill`: train a small draft model for any supported target, by distillation.

The draft is a Llama-architecture model with the target's tokenizer and vocabulary, trained to
match the target's next-token distributions on a text corpus (KL divergence). The target's
distributions come from prefill-style forward passes over whole sequences (fast on CPU with the
native kernels) and are cached as their top-k probabilities, so later epochs cost only the
draft's own training. The output is a standard Hugging Face directory that triforce and
transformers both load, with a model card recording how it was made.

Initialisation: the draft's embedding (tied with its output layer) starts as the target's
embedding projected onto its top principal directions, scaled to the target's per-coordinate
spread; its transformer layers start random. See README for the measurements behind this.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache import FullCache
from .corpus import iter_documents
from .errors import TriforceError
from .loading import LoadedModel, load, resolve_model
from .model import Segment

WORKDIR = ".work"  # teacher cache and checkpoint, inside --out; delete once the draft is final
CHECKPOINT = "checkpoint.pt"


@dataclass
class DistillConfig:
    target: str | None
    out: str
    corpus: list[str]
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 1024
    seq_len: int = 512
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    steps: int | None = None
    time_budget_min: float | None = None
    max_tokens: int | None = None  # training tokens drawn from the corpus
    teacher_topk: int = 64
    holdout: float = 0.02
    init: str = "project"  # "project", "pca" or "random"
    init_from: str | None = None  # an existing draft directory to continue training
    teacher_cache: str | None = None  # shared teacher outputs (same corpus, seed, seq_len, k)
    seed: int = 0
    checkpoint_every: int = 100
    vocab: int | None = None  # prune the exported draft's output layer to this many tokens ...
    coverage: float | None = None  # ... or to the fewest covering this share of the target's greedy outputs
    extra: dict[str, Any] = field(default_factory=dict)


# -- data -----------------------------------------------------------------------------------------
HELDOUT_ROWS = 64  # held-out sequences evaluated at the end of a run


def invoked_command() -> str | None:
    """The `triforce ...` command line this process runs, for a report to say what made it."""
    return "triforce " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "triforce" else None


def split_key(text: str) -> float:
    """A text's place in [0, 1] by its hash: below the held-out fraction, it is held out (whatever the order
    or the other texts, and every copy of it alike)."""
    return int(hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:8], 16) / 0xFFFFFFFF


def chunk_rows(ids: list[int], n: int) -> torch.Tensor:
    """A token stream cut into rows of n tokens (the tail that fills no row is dropped)."""
    count = len(ids) // n
    if count == 0:
        return torch.empty(0, n, dtype=torch.long)
    return torch.tensor(ids[: count * n], dtype=torch.long).view(count, n)


def build_sequences(cfg: DistillConfig, tokenizer: Any, eos: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Token sequences [N, seq_len + 1] for training and held-out evaluation.

    Documents are tokenised and joined with EOS; each document goes wholly to training or to
    the held-out split (by a hash of its text), so held-out text was never trained on.
    """
    train_ids: list[int] = []
    held_ids: list[int] = []
    sources = []
    for spec, text in iter_documents(cfg.corpus):
        if spec not in sources:
            sources.append(spec)
        ids = tokenizer.encode(text, add_special_tokens=False) + [eos]
        (held_ids if split_key(text) < cfg.holdout else train_ids).extend(ids)
    if len(held_ids) < 4 * (cfg.seq_len + 1) and cfg.holdout > 0:
        # few documents (one long book): hold out the tail of the token stream instead
        cut = int(len(train_ids) * (1 - max(cfg.holdout, 0.02)))
        held_ids, train_ids = train_ids[cut:] + held_ids, train_ids[:cut]
    n = cfg.seq_len + 1
    train, held = chunk_rows(train_ids, n), chunk_rows(held_ids, n)
    if len(train) == 0:
        raise TriforceError(f"the corpus has fewer than {n} tokens of training text")
    gen = torch.Generator().manual_seed(cfg.seed)
    train = train[torch.randperm(len(train), generator=gen)]
    if cfg.max_tokens:
        train = train[: max(1, cfg.max_tokens // n)]
    return train, held[:HELDOUT_ROWS], sources


def rows_digest(sequences: torch.Tensor) -> str:
    return hashlib.sha256(sequences.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class TeacherCache:
    """The target's top-k next-token probabilities per training sequence, computed once, kept
    on disk (memory-mapped) so an interrupted run resumes without recomputing them."""

    def __init__(self, directory: Path, sequences: torch.Tensor, k: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.k = k
        num_sequences, seq_len = sequences.shape[0], sequences.shape[1] - 1
        shape = (num_sequences, seq_len, k)
        meta_file = directory / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        old = meta.get("shape", [0, seq_len, k])
        # a larger --max-tokens keeps the same sequences first (one shuffle, then a cut), so a
        # cache of the first rows grows instead of being recomputed; the digest proves it
        grows = old[1:] == [seq_len, k] and old[0] <= num_sequences
        if grows and "digest" in meta:  # caches written before digests were kept are trusted
            grows = meta["digest"] == rows_digest(sequences[: old[0]])
        kept = old[0] if grows else 0
        if not grows:
            for f in directory.glob("*.bin"):
                f.unlink()
        files = {"index.bin": 4 * seq_len * k, "probs.bin": 2 * seq_len * k, "done.bin": 1}
        for name, row_bytes in files.items():
            with open(directory / name, "ab") as f:  # zero-fills the rows that are new
                f.truncate(max(kept, num_sequences) * row_bytes)
        meta_file.write_text(json.dumps({"shape": list(shape), "digest": rows_digest(sequences)}))
        numel = num_sequences * seq_len * k
        index_file, probs_file = str(directory / "index.bin"), str(directory / "probs.bin")
        self.index = torch.from_file(index_file, shared=True, size=numel, dtype=torch.int32).view(shape)
        self.probs = torch.from_file(probs_file, shared=True, size=numel, dtype=torch.float16).view(shape)
        self.done = torch.from_file(str(directory / "done.bin"), shared=True, size=num_sequences, dtype=torch.uint8)

    def fill(self, rows: torch.Tensor, sequences: torch.Tensor, teacher: LoadedModel) -> None:
        todo = [int(r) for r in rows if not self.done[int(r)]]
        if not todo:
            return
        logits = teacher_logits(teacher, sequences[todo, :-1])
        probs = logits.softmax(-1)
        top_p, top_i = torch.topk(probs, self.k, dim=-1)
        for j, r in enumerate(todo):
            self.index[r] = top_i[j].to(torch.int32)
            self.probs[r] = top_p[j].to(torch.float16)
            self.done[r] = 1


def teacher_logits(teacher: LoadedModel, sequences: torch.Tensor,
                   features: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The target's logits [B, T, V] for every position of each sequence (one prefill each).
    features: if a list, its final hidden states [B, T, H] are appended (a draft head learns them)."""
    dec = teacher.decoder
    T = sequences.shape[1]
    dec.prepare(T)
    segments = [Segment(row, FullCache(teacher.config, T, dtype=dec.dtype, device=dec.device), T,
                        want_features=features is not None) for row in sequences]
    logits = torch.stack(dec.forward(segments))
    if features is not None:
        features.append(torch.stack([seg.features for seg in segments]))
    return logits


# -- the draft ------------------------------------------------------------------------------------
INITS = ("project", "pca", "random")


TOKEN_SAMPLE = 64  # training sequences whose greedy outputs choose a pruned vocabulary


def choose_tokens(target: LoadedModel, train: torch.Tensor, vocab: int | None, coverage: float,
                  log: Any = print) -> torch.Tensor:
    """A pruned vocabulary (a head's or a draft's token map): the target's most frequent greedy
    outputs over the first TOKEN_SAMPLE training sequences, `vocab` of them or the fewest covering
    `coverage` of them."""
    sequences = train[:TOKEN_SAMPLE]
    counts = torch.zeros(target.config.vocab_size, dtype=torch.long)
    for b in range(0, len(sequences), 4):
        logits = teacher_logits(target, sequences[b : b + 4, :-1])
        counts += torch.bincount(logits.argmax(-1).flatten(), minlength=target.config.vocab_size)
    order = counts.argsort(descending=True)
    cumulative = counts[order].cumsum(0).double() / max(1, int(counts.sum()))
    if vocab is None:
        vocab = int((cumulative < coverage).sum()) + 1
    vocab = max(1, min(vocab, target.config.vocab_size))
    log(f"pruned vocabulary: {vocab} tokens cover {float(cumulative[vocab - 1]):.3f} of the target's greedy "
        f"outputs on {sequences.numel():,} tokens")
    return order[:vocab].sort().values


def make_student(cfg: DistillConfig, target: LoadedModel, sample: torch.Tensor | None = None) -> Any:
    """The draft, initialised by `cfg.init`:

    - "project": target layers (`cfg.extra["layers"]` or evenly spaced) with the residual stream
      projected onto its top `hidden` principal directions (fitted on the target's activations
      over `sample`); heads, head size and MLP width are the target's. Starts as a shallow,
      narrow copy of the target instead of from nothing.
    - "pca": the target's embedding projected on its principal directions, random layers.
    - "random": everything random.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.init not in INITS:
        raise TriforceError(f"unknown --init {cfg.init!r}; use one of {', '.join(INITS)}")
    tc = target.config
    project = cfg.init == "project"
    config = LlamaConfig(
        vocab_size=tc.vocab_size, hidden_size=cfg.hidden,
        intermediate_size=tc.intermediate_size if project else cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=tc.num_heads if project else cfg.heads,
        num_key_value_heads=tc.num_kv_heads if project else cfg.kv_heads,
        head_dim=tc.head_dim if project else cfg.hidden // cfg.heads,
        max_position_embeddings=tc.max_position_embeddings if project else 2048,
        rms_norm_eps=tc.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": tc.rope_theta if project else 10000.0},
        tie_word_embeddings=True, bos_token_id=tc.bos_token_id, eos_token_id=list(tc.eos_token_ids) or None,
    )
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        return continued_draft(cfg.init_from, tc.vocab_size)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        if cfg.init == "pca":
            model.model.embed_tokens.weight.copy_(projected_embedding(target, cfg.hidden))
        elif project:
            if sample is None:
                raise TriforceError("--init project needs sample text to fit the basis")
            layers = cfg.extra.get("layers") or evenly_spaced(tc.num_layers, cfg.layers)
            project_target(model, target, layers, residual_basis(target, sample, cfg.hidden))
    return model


def continued_draft(directory: str, vocab_size: int) -> Any:
    """An existing draft (a Hugging Face directory) as the starting point, in float32."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if model.config.vocab_size != vocab_size:
        raise TriforceError(f"--init-from: {directory} has vocabulary {model.config.vocab_size}, "
                            f"the target {vocab_size}")
    if not model.config.tie_word_embeddings:
        raise TriforceError("--init-from: the draft must tie its output layer to its embedding")
    return model


def adopt_dimensions(cfg: DistillConfig) -> dict[str, Any] | None:
    """With --init-from, the draft's own dimensions replace the command line's (so --resume and
    the card agree with the weights); returns the earlier run's report, if it has one."""
    if not cfg.init_from:
        return None
    config_file = Path(cfg.init_from) / "config.json"
    if not config_file.exists():
        raise TriforceError(f"--init-from: {cfg.init_from} is not a model directory (no config.json)")
    c = json.loads(config_file.read_text())
    cfg.layers, cfg.hidden = c["num_hidden_layers"], c["hidden_size"]
    cfg.heads, cfg.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    cfg.intermediate = c["intermediate_size"]
    earlier = Path(cfg.init_from) / "distill_report.json"
    if not earlier.exists():
        return {"directory": cfg.init_from}
    r = json.loads(earlier.read_text())
    return {"directory": cfg.init_from, **{k: r.get(k) for k in ("command", "steps", "training_tokens", "minutes",
                                                                  "continued_from")}}


def evenly_spaced(total: int, count: int) -> list[int]:
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def residual_basis(target: LoadedModel, sample: torch.Tensor, dim: int) -> torch.Tensor:
    """Top `dim` principal directions [H, dim] of the target's residual stream (every layer's
    input, each token scaled to unit RMS as the layer norms see it) over `sample` sequences."""
    dec = target.decoder
    H = target.config.hidden_size
    second = torch.zeros(H, H, dtype=torch.float64)
    for row in sample:
        residuals: list[torch.Tensor] = []
        dec.prepare(len(row))
        cache = FullCache(target.config, len(row), dtype=dec.dtype, device=dec.device)
        dec.forward([Segment(row, cache)], residuals=residuals)
        x = torch.cat([r.reshape(-1, H).float() for r in residuals])
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
        second += (x.T @ x).double()
    _, vectors = torch.linalg.eigh(second)
    return vectors[:, -dim:].flip(-1).float()  # largest first


def project_target(student: Any, target: LoadedModel, layers: list[int], basis: torch.Tensor) -> None:
    """Copy target layers into the narrow draft: x_target ~ U x_draft, so weights reading the
    residual stream become W diag(norm) U, weights writing it U^T W; the RMS norms (whose
    weights are folded into the projections) rescale by sqrt(H / d) for the narrower vector."""
    from .loading import read_weights, resolve_model

    path, _ = resolve_model(target.source if not target.is_embedded else None)
    weights = read_weights(path)
    H, d = basis.shape
    rescale = (H / d) ** 0.5
    U = basis

    def w(name: str) -> torch.Tensor:
        return weights[name].float()

    sd = student.model
    sd.embed_tokens.weight.copy_(w("model.embed_tokens.weight") @ U)
    for i, src in enumerate(layers):
        p = f"model.layers.{src}."
        g1, g2 = w(p + "input_layernorm.weight"), w(p + "post_attention_layernorm.weight")
        layer = sd.layers[i]
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, name).weight.copy_(w(p + f"self_attn.{name}.weight") * g1 @ U)
        layer.self_attn.o_proj.weight.copy_(U.T @ w(p + "self_attn.o_proj.weight"))
        layer.mlp.gate_proj.weight.copy_(w(p + "mlp.gate_proj.weight") * g2 @ U)
        layer.mlp.up_proj.weight.copy_(w(p + "mlp.up_proj.weight") * g2 @ U)
        layer.mlp.down_proj.weight.copy_(U.T @ w(p + "mlp.down_proj.weight"))
        layer.input_layernorm.weight.fill_(rescale)
        layer.post_attention_layernorm.weight.fill_(rescale)
    final = w("model.norm.weight")
    sd.norm.weight.copy_(rescale * torch.einsum("hd,h,hd->d", U, final, U))


def projected_embedding(target: LoadedModel, hidden: int) -> torch.Tensor:
    """The target's embedding on its top `hidden` principal directions (keeps which tokens are
    alike, which is most of what a small model must learn), rescaled to the usual init spread."""
    emb = target.decoder.embed.float()
    centered = emb - emb.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered[:: max(1, len(centered) // 16384)], full_matrices=False)
    projected = centered @ v[:hidden].T
    return projected * (0.02 / projected.std())


# -- training -------------------------------------------------------------------------------------
class HeadKD(torch.autograd.Function):
    """Output layer and distillation loss in one pass over row chunks.

    Materialising [tokens, vocabulary] logits, their float32 log-softmax and its gradient costs
    more than the draft's layers (the vocabulary is 49K); instead each chunk of rows computes its
    logits, loss and gradient (d loss / d logits = q - p on the target's top-k tokens, and
    q (1 - r / (1 - Q)) elsewhere, with r the target's remaining mass and Q the draft's mass on
    the top-k) and folds it straight into the gradients of the hidden states and the weight.
    """

    @staticmethod
    def forward(ctx, hidden, weight, top_i, top_p, chunk, dtype):  # noqa: ANN001, ANN205
        rows = hidden.shape[0]
        grad_h = torch.empty_like(hidden, dtype=torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float64)
        w = weight.to(dtype)
        for a in range(0, rows, chunk):
            h = hidden[a : a + chunk].to(dtype)
            z = h @ w.T
            ti, p = top_i[a : a + chunk].long(), top_p[a : a + chunk].float()
            # one fused softmax instead of logsumexp plus exp (each a slow pass over 49K columns;
            # 1.1 -> 0.97 s per 2048 rows); the log-normaliser comes from the argmax's
            # probability, which cannot underflow
            z_max, arg = z.max(-1, keepdim=True)
            q = torch.softmax(z, -1, dtype=torch.float32)
            lse = z_max.float() - q.gather(-1, arg).log()
            logq_top = z.gather(-1, ti).float() - lse
            del z
            q_top = logq_top.exp()
            rest_p = (1 - p.sum(-1)).clamp(min=0)
            big_q = q_top.sum(-1).clamp(max=1 - 1e-6)
            ent = -(p * p.clamp(min=1e-12).log()).sum(-1) - rest_p * rest_p.clamp(min=1e-12).log()
            total += (-(p * logq_top).sum(-1) - rest_p * (1 - big_q).log() - ent).double().sum()
            g = q.mul_((1 - rest_p / (1 - big_q)).unsqueeze(-1))  # q becomes the gradient in place
            g.scatter_(-1, ti, q_top - p)
            g = g.to(dtype)
            grad_h[a : a + chunk] = (g @ w).float()
            grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.rows = rows
        return (total / rows).float()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.rows
        return grad_h * scale, grad_w * scale, None, None, None, None


def kd_loss(student_logits: torch.Tensor, top_i: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """KL(target || draft) with the target known on its top-k tokens; the remaining mass is one
    bucket matched against the draft's mass outside those tokens."""
    logq = student_logits.float().log_softmax(-1)
    p = top_p.float()
    logq_top = logq.gather(-1, top_i.long())
    rest_p = (1 - p.sum(-1)).clamp(min=0)
    rest_q = (1 - logq_top.exp().sum(-1)).clamp(min=1e-9)
    ce = -(p * logq_top).sum(-1) - rest_p * rest_q.log()
    ent = -(p * p.clamp(min=1e-12).log()).sum(-1) - rest_p * rest_p.clamp(min=1e-12).log()
    return (ce - ent).mean()


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of `lr` at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def planned_steps(step: int, elapsed_s: float, steps: int | None, budget_s: float | None) -> int:
    """The run's length in steps, for the schedule: `steps`, or what the time budget allows at the
    pace so far (1000 before the first step is timed)."""
    if steps:
        return steps
    if not step or budget_s is None:
        return 1000
    return max(step + 1, int(budget_s / max(1e-3, elapsed_s / step)))


@torch.no_grad()
def evaluate(student: Any, target: LoadedModel, sequences: torch.Tensor,
             token_map: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out KL(target || draft) and greedy agreement (teacher-forced argmax match); with a
    pruned vocabulary the agreement is the exported draft's (its argmax over its tokens), the KL
    the whole output layer's (the pruned one's is infinite wherever the target picks another)."""
    if len(sequences) == 0:
        return {}
    student.eval()
    kls, agree, count = [], 0, 0
    for b in range(len(sequences)):
        x = sequences[b : b + 1, :-1]
        t_logits = teacher_logits(target, x)[0].float()
        s_logits = student(x).logits[0].float()
        logp, logq = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
        kls.append(float((logp.exp() * (logp - logq)).sum(-1).mean()))
        guess = s_logits.argmax(-1) if token_map is None else token_map[s_logits[:, token_map].argmax(-1)]
        agree += int((t_logits.argmax(-1) == guess).sum())
        count += x.shape[1]
    student.train()
    return {"kl": round(sum(kls) / len(kls), 4), "greedy_agreement": round(agree / count, 4), "tokens": count}


def use_bf16_autocast() -> bool:
    from .loading import default_dtype

    return default_dtype("cpu") == torch.bfloat16


def distill(cfg: DistillConfig, resume: bool = False, log: Any = print) -> dict[str, Any]:
    out = Path(cfg.out)
    if (out / "config.json").exists() and not resume:
        raise TriforceError(f"{out} already holds a model; choose another --out or pass --resume")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.steps is None and cfg.time_budget_min is None:
        raise TriforceError("give --steps N or --time-budget MINUTES")
    if cfg.steps == 0 and not cfg.init_from:
        raise TriforceError("--steps 0 exports the draft of --init-from as it is; give --init-from")
    earlier = adopt_dimensions(cfg)
    if cfg.hidden % cfg.heads or cfg.heads % cfg.kv_heads:
        raise TriforceError("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if cfg.coverage is not None and not 0 < cfg.coverage <= 1:
        raise TriforceError(f"--coverage must be in (0, 1], got {cfg.coverage}")
    if cfg.vocab is not None and cfg.vocab < 1:
        raise TriforceError(f"--vocab must be a positive number of tokens, got {cfg.vocab}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    target = load(cfg.target, dtype="auto")
    target_path, _ = resolve_model(cfg.target)
    eos = (list(target.config.eos_token_ids) or [target.tokenizer.eos_token_id or 0])[0]
    train, held, sources = build_sequences(cfg, target.tokenizer, eos)
    log(f"corpus: {', '.join(sources)}: {train.numel():,} training tokens in {len(train)} sequences, "
        f"{held.numel():,} held out")
    work = out / WORKDIR
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = Path(cfg.teacher_cache) if cfg.teacher_cache else work / "teacher"
    teacher = TeacherCache(teacher_dir, train, cfg.teacher_topk)
    student = make_student(cfg, target, train[:8, :-1])
    params = sum(p.numel() for p in student.parameters())
    init = f"from {cfg.init_from}" if cfg.init_from else cfg.init
    log(f"draft: {cfg.layers} layers, hidden {cfg.hidden}, {params / 1e6:.1f}M parameters, init {init}")
    decay = [p for n, p in student.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in student.named_parameters() if p.dim() <= 1]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    state = {"step": 0, "elapsed_s": 0.0, "tokens": 0, "history": []}
    checkpoint = work / CHECKPOINT
    if resume:
        if not checkpoint.exists():
            raise TriforceError(f"--resume: no checkpoint in {out}")
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved["config"]["layers"] != cfg.layers or saved["config"]["hidden"] != cfg.hidden:
            raise TriforceError("--resume: the checkpoint was made with other model dimensions")
        student.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])
        state = saved["state"]
        log(f"resuming at step {state['step']} ({state['elapsed_s'] / 60:.1f} min trained)")
    per_epoch = max(1, len(train) // cfg.batch)
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else None
    total = cfg.steps if cfg.steps is not None else None
    autocast = use_bf16_autocast()
    from tqdm import tqdm

    bar = tqdm(total=total if total else int(budget_s or 0),
               initial=state["step"] if total else int(state["elapsed_s"]),
               unit="step" if total else "s", desc="distill", dynamic_ncols=True)
    student.train()
    started = time.perf_counter() - state["elapsed_s"]
    last_saved = state["step"]
    while True:
        step = state["step"]
        elapsed = time.perf_counter() - started
        if (total is not None and step >= total) or (budget_s is not None and elapsed >= budget_s):
            break
        epoch_pos = step % per_epoch
        rows = torch.arange(epoch_pos * cfg.batch, (epoch_pos + 1) * cfg.batch) % len(train)
        t0 = time.perf_counter()
        teacher.fill(rows, train, target)
        x = train[rows, :-1]
        top_i, top_p = teacher.index[rows], teacher.probs[rows]
        for group in optim.param_groups:
            group["lr"] = lr_at(step, planned_steps(step, elapsed, total, budget_s), cfg.lr, cfg.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = student.model(x).last_hidden_state
        loss = HeadKD.apply(hidden.reshape(-1, hidden.shape[-1]), student.lm_head.weight,
                            top_i.reshape(-1, cfg.teacher_topk), top_p.reshape(-1, cfg.teacher_topk), 512,
                            torch.bfloat16 if autocast else torch.float32)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optim.step()
        state["step"] = step + 1
        state["tokens"] += x.numel()
        state["elapsed_s"] = time.perf_counter() - started
        state["history"].append(round(loss.item(), 4))
        rate = x.numel() / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{state['history'][-1]:.3f}", tok_s=f"{rate:.0f}", epoch=f"{(step + 1) / per_epoch:.2f}")
        bar.update(1 if total else int(state["elapsed_s"]) - bar.n)
        if state["step"] - last_saved >= cfg.checkpoint_every:
            save_checkpoint(checkpoint, student, optim, state, cfg)
            last_saved = state["step"]
    bar.close()
    save_checkpoint(checkpoint, student, optim, state, cfg)
    token_map = None
    if cfg.vocab is not None or cfg.coverage is not None:
        token_map = choose_tokens(target, train, cfg.vocab, cfg.coverage or 1.0, log)
    heldout = evaluate(student, target, held, token_map)
    log(f"held-out: {heldout}")
    report = {
        "target": str(target_path) if not target.is_embedded else target.source,
        "corpus": sources,
        "steps": state["step"],
        "training_tokens": state["tokens"],
        "minutes": round(state["elapsed_s"] / 60, 1),
        "first_loss": state["history"][0] if state["history"] else None,
        "last_loss": round(sum(state["history"][-20:]) / max(1, len(state["history"][-20:])), 4)
        if state["history"] else None,
        "heldout": heldout,
        "config": asdict(cfg),
        "command": invoked_command(),
    }
    if earlier:
        report["continued_from"] = earlier
    if token_map is not None:
        report["pruned_vocab"] = len(token_map)
    export(student, target, out, report, token_map)
    return report


def save_checkpoint(path: Path, student: Any, optim: Any, state: dict, cfg: Any) -> None:
    """The model, optimiser, progress and configuration (a dataclass) of a training run."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": student.state_dict(), "optim": optim.state_dict(), "state": state, "config": asdict(cfg)},
               tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint


def export(student: Any, target: LoadedModel, out: Path, report: dict[str, Any],
           token_map: torch.Tensor | None = None) -> None:
    """Write the HF directory (bf16 weights, tied embeddings), tokenizer files and model card.
    With a token map the output layer keeps only those tokens' rows (FR-Spec, VocabTrim): an
    untied lm_head.weight [K, hidden] beside the whole embedding and a `token_map` tensor, which
    triforce loads (transformers does not: its lm_head has one row per vocabulary token)."""
    student = student.to(torch.bfloat16)
    student.config.dtype = "bfloat16"
    student.save_pretrained(str(out), safe_serialization=True)
    if token_map is not None:
        prune_output_layer(out, token_map)
    c = student.config
    report["architecture"] = {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
                              "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size}
    copy_tokenizer(target, out)
    (out / "distill_report.json").write_text(json.dumps(report, indent=2))
    write_model_card(out, report)


def prune_output_layer(directory: Path, token_map: torch.Tensor) -> None:
    """Rewrite a draft's directory with an output layer over `token_map`'s tokens only (their rows
    of its output layer: the embedding's, where the two are tied)."""
    from safetensors.torch import load_file, save_file

    files = sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        raise TriforceError(f"{directory}: expected one safetensors file to prune, found {len(files)}")
    weights = load_file(str(files[0]))
    rows = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    weights["lm_head.weight"] = rows[token_map.long()].contiguous()
    weights["token_map"] = token_map.long().contiguous()
    save_file(weights, str(files[0]), metadata={"format": "pt"})
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(target: LoadedModel, out: Path) -> None:
    source = target.tokenizer.directory
    for name in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    # the same tokenizer, without the indentation (half the bytes of a small draft's directory)
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":")),
                                        encoding="utf-8")


def write_model_card(out: Path, report: dict[str, Any], acceptance: dict[str, Any] | None = None) -> None:
    cfg = {**report["config"], **report.get("architecture", {})}
    lines = [
        "# Draft model (made by `triforce distill`)",
        "",
        f"- target: {report['target']}",
        f"- corpus: {', '.join(report['corpus'])}",
        f"- architecture: Llama, {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads "
        f"({cfg['kv_heads']} KV), intermediate {cfg['intermediate']}, "
        + (f"output layer pruned to {report['pruned_vocab']} tokens (loads in triforce, not transformers), "
           if report.get("pruned_vocab") else "tied embeddings, ") +
        f"init {('from ' + cfg['init_from']) if cfg.get('init_from') else cfg['init']}",
        f"- training: {report['steps']} steps, {report['training_tokens']:,} tokens, {report['minutes']} min, "
        f"KL to the target's top-{cfg['teacher_topk']} distributions, sequences of {cfg['seq_len']}",
        f"- loss: first {report['first_loss']}, last {report['last_loss']}",
        f"- held-out (documents never trained on): {json.dumps(report['heldout'])}",
    ]
    if report.get("command"):
        lines.insert(2, f"- made by: `{report['command']}`")
    earlier = report.get("continued_from")
    while earlier:  # the whole lineage, so the card says everything the weights went through
        made = f"`{earlier['command']}`" if earlier.get("command") else earlier["directory"]
        lines.append(f"- continued from: {made} ({earlier.get('steps')} steps, {earlier.get('minutes')} min)")
        earlier = earlier.get("continued_from")
    acceptance = acceptance or report.get("acceptance")
    if acceptance:
        lines.append(f"- measured acceptance: {json.dumps(acceptance)}")
    (out / "README.md").write_text("\n".join(lines) + "\n")
