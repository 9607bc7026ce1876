"""`triforce distill --head`: train a feature-level draft head (head.py) against its target.

The target reads training sequences once per step (one prefill-style pass each, with the native kernels) and
gives, at every position, its final hidden state f[j] and its next-token distribution. The head learns, from
(f[j-1], token j), to predict f[j] (smooth L1, as EAGLE does) and, through the target's own output rows for
its K tokens, the target's distribution of token j+1 (cross-entropy against the target's probabilities on
those K tokens). Inputs carry uniform noise during training, because when drafting the head reads its own
imperfect predictions. The K tokens are the target's most frequent greedy outputs on the training text; with
no --vocab, the fewest that cover `coverage` of them.

With chat prompts, the target first answers each one (sampled as a chat user would run it; the answers are kept in
the output directory, each with the settings and command that made it, and reused on --resume), and the chat-
formatted prompt + answer joins the training text. Documents go wholly to training or to the held-out split (as for
`triforce distill`), and so do prompts with their answers; the held-out figures, for documents and for chat answers
apart, are teacher-forced: how often the head's first draft is the target's greedy token.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .corpus import prompts as read_prompts
from .distill import (
    HELDOUT_ROWS,
    DistillConfig,
    build_sequences,
    choose_tokens,
    chunk_rows,
    invoked_command,
    lr_at,
    planned_steps,
    save_checkpoint,
    split_key,
    teacher_logits,
)
from .errors import TriforceError
from .head import FeatureHead, save_head
from .loading import LoadedModel, load

CHECKPOINT = "head-checkpoint.pt"
CHAT_ANSWERS = "chat-answers.jsonl"
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.9}  # the settings `triforce demo` and chat users run


@dataclass
class HeadDistillConfig:
    target: str | None
    out: str
    corpus: list[str]
    vocab: int | None = None  # K, the head's tokens; None: the fewest covering `coverage` of the target's
    coverage: float = 0.95
    seq_len: int = 512
    batch: int = 4
    lr: float = 1e-3
    warmup: int = 50
    steps: int | None = None
    time_budget_min: float | None = None
    max_tokens: int | None = None
    holdout: float = 0.02
    cls_weight: float = 0.1
    noise: float = 0.1  # uniform noise on the input features, as a fraction of their RMS
    seed: int = 0
    checkpoint_every: int = 100
    chat_prompts: list[str] | None = None  # prompt sources (corpus.prompts) the target answers for training
    chat_tokens: int = 256  # the longest answer
    chat_holdout: float = 0.1  # fraction of prompts held out with their answers


def teacher_pass(target: LoadedModel, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's final hidden states [B, T, H] and logits [B, T, V] at every position of each sequence."""
    features: list[torch.Tensor] = []
    logits = teacher_logits(target, sequences, features)
    return features[0].float(), logits


class HeadModule(torch.nn.Module):
    """head.py's FeatureHead in training form: the same math, with transformers' Llama decoder layer."""

    def __init__(self, target: LoadedModel, token_map: torch.Tensor) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = target.config
        hf = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, vocab_size=cfg.vocab_size)
        hf._attn_implementation = "sdpa"  # a standalone layer gets no dispatch from a model
        super().__init__()
        self.fc = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layer = LlamaDecoderLayer(hf, 0)
        self.rotary = LlamaRotaryEmbedding(hf)
        dec = target.decoder
        self.register_buffer("token_map", token_map.long())
        # the target's embedding and output rows: read, never trained
        embed = dec.embed if dec.embed is not None else dec.embed_tokens(torch.arange(cfg.vocab_size))
        self.register_buffer("embed", embed.float(), persistent=False)
        self.register_buffer("out_rows", dec.lm_head.dense()[token_map].float(), persistent=False)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, T, H] (f[j-1] per row), tokens [B, T]: predicted features [B, T, H], logits [B, T, K]."""
        x = self.fc(torch.cat([features, self.embed[tokens]], -1))
        T = tokens.shape[1]
        positions = torch.arange(T, device=x.device)[None].expand(tokens.shape[0], -1)
        mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)[None, None]
        out = self.layer(x, attention_mask=mask, position_ids=positions, position_embeddings=self.rotary(x, positions))
        h = out[0] if isinstance(out, tuple) else out
        return h, h @ self.out_rows.T

    def head_weights(self) -> dict[str, torch.Tensor]:
        weights = {"fc.weight": self.fc.weight.detach(), "token_map": self.token_map}
        weights.update({f"layer.{k}": v.detach() for k, v in self.layer.state_dict().items()})
        return weights


def head_losses(module: HeadModule, features: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor,
                noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(regression loss, classification loss, greedy agreement) over one batch of teacher outputs: row j reads
    (f[j-1], token j) and is judged against f[j] and the target's distribution at j."""
    inputs, wanted, ids = features[:, :-1], features[:, 1:], tokens[:, 1:]
    if noise:
        scale = noise * inputs.pow(2).mean().sqrt()
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * scale
    predicted, head_logits = module(inputs, ids)
    reg = torch.nn.functional.smooth_l1_loss(predicted, wanted)
    target_probs = logits[:, 1:].float().softmax(-1)[..., module.token_map]
    cls = -(target_probs * head_logits.log_softmax(-1)).sum(-1).mean()
    agree = (module.token_map[head_logits.argmax(-1)] == logits[:, 1:].argmax(-1)).float().mean()
    return reg, cls, agree


@torch.no_grad()
def chat_answers(target: LoadedModel, questions: list[str], path: Path, max_new_tokens: int, command: str | None,
                 log: Any = print) -> list[dict[str, Any]]:
    """The target's answer to each question, from `path` where it is already there, else generated now and
    appended (so an interrupted run keeps what it made). Each record holds what re-makes it: the prompt's chat
    tokens, the sampling settings and seed, and the command."""
    from tqdm import tqdm

    from .engine import Engine
    from .settings import EngineSettings

    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            done[record["prompt"]] = record
    asked = list(dict.fromkeys(questions))  # each once, in order
    missing = [q for q in asked if q not in done]
    if missing:
        engine = Engine(target, EngineSettings(method="autoregressive"))  # a seed's tokens depend on the method
        with path.open("a") as f:
            for question in tqdm(missing, desc="the target answers the chat prompts", unit="prompt"):
                seed = int(split_key(question) * 0xFFFFFFFF)
                result = engine.generate(question, chat=True, max_new_tokens=max_new_tokens, seed=seed,
                                         **CHAT_SAMPLING)
                record = {"prompt": question, "prompt_ids": engine.encode_prompt(question, chat=True),
                          "answer_ids": result.token_ids, "method": "autoregressive", **CHAT_SAMPLING, "seed": seed,
                          "max_new_tokens": max_new_tokens, "command": command}
                f.write(json.dumps(record) + "\n")
                done[question] = record
        log(f"chat answers: {len(missing)} made, {len(asked) - len(missing)} reused ({path})")
    return [done[q] for q in asked]


def chat_sequences(records: list[dict[str, Any]], holdout: float, seq_len: int, eos: int
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Rows of seq_len + 1 tokens of chat text (prompt + answer + EOS), for training and held out by prompt."""
    train_ids: list[int] = []
    held_ids: list[int] = []
    held_prompts = 0
    for r in records:
        held = split_key(r["prompt"]) < holdout
        held_prompts += held
        (held_ids if held else train_ids).extend(r["prompt_ids"] + r["answer_ids"] + [eos])
    counts = {"prompts": len(records), "heldout_prompts": held_prompts,
              "answer_tokens": sum(len(r["answer_ids"]) for r in records)}
    return chunk_rows(train_ids, seq_len + 1), chunk_rows(held_ids, seq_len + 1), counts


def evaluate(module: HeadModule, target: LoadedModel, sequences: torch.Tensor) -> dict[str, float]:
    if len(sequences) == 0:
        return {}
    module.eval()
    agree, count = 0.0, 0
    for b in range(len(sequences)):
        x = sequences[b : b + 1, :-1]
        features, logits = teacher_pass(target, x)
        _, _, a = head_losses(module, features, logits, x)
        agree += float(a) * (x.shape[1] - 1)
        count += x.shape[1] - 1
    module.train()
    return {"greedy_agreement": round(agree / count, 4), "tokens": count}


def distill_head(cfg: HeadDistillConfig, resume: bool = False, log: Any = print) -> dict[str, Any]:
    out = Path(cfg.out)
    if (out / "head.json").exists() and not resume:
        raise TriforceError(f"{out} already holds a head; choose another --out or pass --resume")
    if cfg.steps is None and cfg.time_budget_min is None:
        raise TriforceError("give --steps N or --time-budget MINUTES")
    if not 0 < cfg.coverage <= 1:
        raise TriforceError(f"--coverage must be in (0, 1], got {cfg.coverage}")
    if cfg.chat_prompts and not 0 < cfg.chat_holdout < 1:
        raise TriforceError(f"chat_holdout must be in (0, 1), got {cfg.chat_holdout}")
    questions = [q for spec in cfg.chat_prompts or [] for q in read_prompts(spec)]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    target = load(cfg.target, dtype="auto")
    if questions and target.tokenizer.chat_template is None:
        raise TriforceError("--chat-prompts needs a target with a chat template")
    eos = (list(target.config.eos_token_ids) or [target.tokenizer.eos_token_id or 0])[0]
    split = DistillConfig(target=cfg.target, out=cfg.out, corpus=cfg.corpus, seq_len=cfg.seq_len,
                          max_tokens=cfg.max_tokens, holdout=cfg.holdout, seed=cfg.seed)
    train, held, sources = build_sequences(split, target.tokenizer, eos)
    log(f"corpus: {', '.join(sources)}: {train.numel():,} training tokens in {len(train)} sequences, "
        f"{held.numel():,} held out")
    command = invoked_command()
    chat = None
    if questions:
        records = chat_answers(target, questions, out / CHAT_ANSWERS, cfg.chat_tokens, command, log)
        train_chat, held_chat, chat = chat_sequences(records, cfg.chat_holdout, cfg.seq_len, eos)
        shuffle = torch.randperm(len(train) + len(train_chat), generator=torch.Generator().manual_seed(cfg.seed))
        train = torch.cat([train, train_chat])[shuffle]
        log(f"chat: {chat['prompts']} prompts ({chat['heldout_prompts']} held out), {len(train_chat)} training "
            f"sequences, {held_chat.numel():,} tokens held out")
    checkpoint = out / CHECKPOINT
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0, "tokens": 0, "history": []}
    saved = None
    if resume:
        if not checkpoint.exists():
            raise TriforceError(f"--resume: no checkpoint in {out}")
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        token_map = saved["model"]["token_map"]
    else:
        token_map = choose_tokens(target, train, cfg.vocab, cfg.coverage, log)
    module = HeadModule(target, token_map)
    optim = torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if saved is not None:
        module.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])
        state = saved["state"]
        log(f"resuming at step {state['step']} ({state['elapsed_s'] / 60:.1f} min trained)")
    params = sum(p.numel() for p in module.parameters())
    log(f"head: {params / 1e6:.1f}M parameters, {len(token_map)} tokens")
    per_epoch = max(1, len(train) // cfg.batch)
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else None
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps or int(budget_s or 0), initial=state["step"] if cfg.steps else int(state["elapsed_s"]),
               unit="step" if cfg.steps else "s", desc="distill --head", dynamic_ncols=True)
    module.train()
    started = time.perf_counter() - state["elapsed_s"]
    last_saved = state["step"]
    while True:
        step = state["step"]
        elapsed = time.perf_counter() - started
        if (cfg.steps is not None and step >= cfg.steps) or (budget_s is not None and elapsed >= budget_s):
            break
        rows = torch.arange((step % per_epoch) * cfg.batch, (step % per_epoch + 1) * cfg.batch) % len(train)
        x = train[rows, :-1]
        features, logits = teacher_pass(target, x)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, planned_steps(step, elapsed, cfg.steps, budget_s), cfg.lr, cfg.warmup)
        reg, cls, agree = head_losses(module, features, logits, x, cfg.noise)
        loss = reg + cfg.cls_weight * cls
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optim.step()
        state["step"] = step + 1
        state["tokens"] += x.numel()
        state["elapsed_s"] = time.perf_counter() - started
        state["history"].append([round(reg.item(), 4), round(cls.item(), 4), round(agree.item(), 4)])
        bar.set_postfix(reg=f"{reg.item():.3f}", cls=f"{cls.item():.3f}", agree=f"{agree.item():.2f}")
        bar.update(1 if cfg.steps else int(state["elapsed_s"]) - bar.n)
        if state["step"] - last_saved >= cfg.checkpoint_every:
            save_checkpoint(checkpoint, module, optim, state, cfg)
            last_saved = state["step"]
    bar.close()
    save_checkpoint(checkpoint, module, optim, state, cfg)
    heldout = evaluate(module, target, held)
    log(f"held-out documents: {heldout}")
    report = {
        "target": target.source, "corpus": sources, "steps": state["step"], "training_tokens": state["tokens"],
        "minutes": round(state["elapsed_s"] / 60, 1), "first": state["history"][0] if state["history"] else None,
        "last": state["history"][-1] if state["history"] else None, "heldout": heldout, "config": asdict(cfg),
        "command": command,
    }
    if chat:
        heldout_chat = evaluate(module, target, held_chat[:HELDOUT_ROWS])
        log(f"held-out chat answers: {heldout_chat}")
        report.update(chat=chat, heldout_chat=heldout_chat)
    weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in module.head_weights().items()}
    FeatureHead(target.decoder, dict(weights), str(out))  # refuses anything the runtime would not load
    save_head(out, target.config, weights, {"training": report})
    return report


