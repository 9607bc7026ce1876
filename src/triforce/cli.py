"""The `triforce` command line. Errors in what the user gave print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

from .errors import SettingError, TriforceError
from .formats import FORMATS, WEIGHTS

EXIT_USAGE = 2
EXIT_ERROR = 1


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"triforce: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _auto_or_positive(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def _size(text: str) -> int:
    """Bytes from '256MB', '1.5GiB', '512M' (K/M/G and KiB/MiB/GiB are powers of 1024, KB/MB/GB of 1000)."""
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not 0 < value < 2**60 or int(value * _UNITS[unit]) < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 256MB or 2GiB, got {text!r}")
    return int(value * _UNITS[unit])


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute and KV cache dtype (auto: bf16 where the CPU computes it natively)")
    p.add_argument("--weights", default="auto", choices=list(WEIGHTS),
                   help="auto: a GGUF's own quantized blocks, a directory's dense weights; bf16: dense; "
                        "a block format: quantize at load (cached on disk)")
    p.add_argument("--rope-scaling", default="auto",
                   help="auto | none | linear|dynamic|yarn|llama3[:FACTOR] (auto: YaRN sized to the context "
                        "past the model's trained length)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: PyTorch's choice)")


def add_parallel_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel", type=_positive_int, default=1, metavar="N",
                   help="split the target over N processes (attention heads, MLP, output head; gloo), started here "
                        "or by torchrun; at most the model's KV heads")


def add_speculation_arguments(p: argparse.ArgumentParser) -> None:
    from .settings import METHODS

    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="decoding method (default: triforce when a draft is available, else autoregressive)")
    p.add_argument("--draft", help="draft model (HF directory or GGUF), draft head directory (triforce distill "
                   "--head), or 'ngram' (prompt lookup)")
    p.add_argument("--gamma", type=_auto_or_positive, default="auto",
                   help="tokens gathered per full verification, or auto (adaptive speculation: chosen per cycle, "
                        "with the levels that run and whether to speculate at all)")
    p.add_argument("--draft-gamma", type=_auto_or_positive, default="auto",
                   help="tokens the bottom drafts per middle step, or auto")
    p.add_argument("--budget", type=_positive_int, default=4096, help="retrieval cache budget (tokens)")
    p.add_argument("--chunk-size", type=_positive_int, default=8, help="retrieval chunk size (tokens)")
    p.add_argument("--sink", type=_nonneg_int, default=16, help="StreamingLLM sink tokens")
    p.add_argument("--window", type=_positive_int, default=256, help="StreamingLLM window (tokens)")
    p.add_argument("--rebuild-every", type=_positive_int, default=1,
                   help="re-select retrieval chunks every N full verifications")
    p.add_argument("--retrieval-weights", default="model", choices=["model", *FORMATS],
                   help="weights of the target-on-retrieval-cache level: the target's own, or a quantized copy")
    p.add_argument("--draft-weights", default="model", choices=["model", *FORMATS],
                   help="weights of the draft model: its own, or a quantized copy")
    add_offload_arguments(p)


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-offload", metavar="DIR",
                   help="keep the target's KV cache beyond --kv-ram-budget in a file under DIR (direct I/O); the "
                        "levels below the top stay in RAM")
    p.add_argument("--kv-ram-budget", type=_size, metavar="SIZE",
                   help="RAM for the KV cache with --kv-offload, e.g. 256MB or 2GiB (default: half the available "
                        "memory)")
    p.add_argument("--kv-offload-keep", action="store_true", help="leave the offload file in DIR after the run")


def add_sampling_arguments(p: argparse.ArgumentParser, top_p: float, seed: int | None,
                           temperature: float = 0.0) -> None:
    """The flags check_sampling_args and the generation calls read, declared once for every command."""
    p.add_argument("--temperature", type=_float, default=temperature, help=f"0 means greedy (default {temperature:g})")
    p.add_argument("--top-p", type=_float, default=top_p)
    p.add_argument("--top-k", type=_nonneg_int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=seed,
                   help="seed for reproducible sampling (the same sample needs fixed --gamma/--draft-gamma too: "
                        "'auto' plans from measured speeds)")


def build_parser() -> argparse.ArgumentParser:
    from .settings import METHODS

    parser = ArgumentParser(prog="triforce", description="Lossless hierarchical speculative decoding (TriForce).")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)
    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_arguments(g)
    add_parallel_argument(g)
    add_speculation_arguments(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from a file ('-' for stdin)")
    src.add_argument("--batch-file", help="JSON lines, one request each ({\"prompt\": ..., optional "
                     "max_new_tokens, temperature, top_p, top_k, seed, stop, chat}); generated together, printed "
                     "as JSON lines in input order")
    g.add_argument("--chat", action="store_true", help="apply the chat template (prompt as one user turn)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=128)
    add_sampling_arguments(g, top_p=1.0, seed=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--max-context", type=_positive_int, help="refuse prompts + new tokens longer than this")
    g.add_argument("--num-samples", type=_positive_int, default=1,
                   help="independent samples for one prompt (prefilled once)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary on stderr")

    dm = sub.add_parser("demo", help="the main job: TriForce on a long real document vs plain decoding")
    dm.add_argument("--context", type=_positive_int, default=16384, help="document tokens in the prompt")
    dm.add_argument("--document", default="vim")
    dm.add_argument("--task", choices=["continue", "question"], default="continue",
                    help="continue the document (default: what a 135M model does sensibly at this length) or answer "
                         "--question about it (chat)")
    dm.add_argument("--question", default="Based on the manual above, explain how to search for a word in Vim.")
    dm.add_argument("--method", choices=list(METHODS), default="triforce")
    dm.add_argument("--draft", help="draft model or 'ngram' (default: the shipped draft for the embedded model)")
    dm.add_argument("--max-new-tokens", type=_positive_int, default=128)
    # sampled: greedy decoding of a 135M model falls into a loop within ~100 tokens at this length
    add_sampling_arguments(dm, top_p=0.9, seed=0, temperature=0.7)
    dm.add_argument("--no-compare", action="store_true", help="skip the autoregressive baseline run")

    ds = sub.add_parser("distill", help="train a small draft model (or, with --head, a draft head) for a target")
    ds.add_argument("--target", help="target model (default: embedded SmolLM2-135M-Instruct)")
    ds.add_argument("--out", required=True, help="output directory (a Hugging Face model directory, or a head's)")
    ds.add_argument("--head", action="store_true",
                    help="train a feature-level draft head (one layer on the target's hidden states) instead")
    ds.add_argument("--vocab", type=_positive_int,
                    help="prune the output layer to the target's K most frequent greedy outputs (a head: default "
                         "the fewest covering --coverage; a draft: not pruned unless --vocab or --coverage)")
    ds.add_argument("--coverage", type=_float,
                    help="prune the output layer to the fewest tokens covering this share of the target's greedy "
                         "outputs (a head's default 0.95)")
    ds.add_argument("--corpus", nargs="+", required=True,
                    help="text files, directories, or named sources (jargon, python-docs, vim)")
    ds.add_argument("--chat-prompts", nargs="+", metavar="SOURCE",
                    help="with --head: prompts the target answers (chat template, T 0.7, top-p 0.9) to train on, "
                         "beside the corpus: a file (one per line) or a named source (python-faq)")
    ds.add_argument("--chat-tokens", type=_positive_int, default=256, help="the longest chat answer (default 256)")
    ds.add_argument("--layers", type=_positive_int, default=4)
    ds.add_argument("--hidden", type=_positive_int, default=256)
    ds.add_argument("--heads", type=_positive_int, default=4)
    ds.add_argument("--kv-heads", type=_positive_int, default=2)
    ds.add_argument("--intermediate", type=_positive_int, default=1024)
    ds.add_argument("--seq-len", type=_positive_int, default=512)
    ds.add_argument("--batch", type=_positive_int, default=8)
    ds.add_argument("--lr", type=_float, default=2e-3)
    budget = ds.add_mutually_exclusive_group(required=True)
    budget.add_argument("--time-budget", type=_float, metavar="MINUTES", help="train for this long")
    budget.add_argument("--steps", type=_nonneg_int,
                        help="train for this many steps (0 with --init-from: export that draft as it is, pruned "
                             "by --vocab or --coverage)")
    ds.add_argument("--max-tokens", type=_positive_int, help="use at most this many corpus tokens")
    ds.add_argument("--teacher-topk", type=_positive_int, default=64)
    ds.add_argument("--init", choices=["project", "pca", "random"], default="project",
                    help="project: narrowed copies of target layers; pca: target embedding only; random")
    ds.add_argument("--init-from", metavar="DIR",
                    help="continue training an existing draft (its dimensions replace --layers, --hidden, ...)")
    ds.add_argument("--from-layers", type=_int_list0, help="target layers to copy with --init project")
    ds.add_argument("--teacher-cache", help="directory to keep (and share between runs) the target's outputs")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--checkpoint-every", type=_positive_int, default=100)
    ds.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_arguments(sv)
    add_parallel_argument(sv)
    add_speculation_arguments(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-queue", type=_positive_int, default=16, help="requests allowed to wait (then 429)")
    sv.add_argument("--max-batch", type=_positive_int,
                    help="requests decoded together (continuous batching, default 4); 1 runs them one at a time")
    sv.add_argument("--max-context", type=_positive_int,
                    help="longest prompt + completion (default: the model's trained length)")
    sv.add_argument("--served-model-name", help="model id clients use (default: derived from the model)")
    sv.add_argument("--api-key", default=os.environ.get("TRIFORCE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 routes (default: $TRIFORCE_API_KEY; none)")

    b = sub.add_parser("bench", help="benchmarks (see README)")
    bsub = b.add_subparsers(dest="bench", parser_class=ArgumentParser, required=True)
    e = bsub.add_parser("engine", help="our decoder vs transformers generate, with bandwidth figures")
    e.add_argument("--contexts", type=_int_list, default=[2048, 8192, 16384])
    e.add_argument("--new-tokens", type=_positive_int, default=32)
    e.add_argument("--repeats", type=_positive_int, default=3)
    e.add_argument("--document", default="vim")
    e.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    e.add_argument("--isa", type=_name_list, help="kernel paths side by side: avx512, avx2, neon, none (PyTorch) "
                                                  "(default: the best this CPU runs)")
    e.add_argument("--out", default="bench-out", help="directory for JSON and Markdown results")
    d = bsub.add_parser("decode", help="every method side by side on long real documents, with peers and plots")
    d.add_argument("--contexts", type=_int_list, help="prompt lengths (default 16384,32768)")
    d.add_argument("--new-tokens", type=_positive_int, help="tokens generated per run (default 128)")
    d.add_argument("--temperatures", type=_float_list, help="0 is greedy (default 0,0.6; top-p 0.9 when sampling)")
    d.add_argument("--methods", type=_name_list, help="comma-separated (default: all five)")
    d.add_argument("--drafts", type=_name_list, help="comma-separated: ngram and/or draft model paths (default ngram)")
    d.add_argument("--repeats", type=_positive_int, help="interleaved repeats; medians reported (default 1)")
    d.add_argument("--peers", type=_name_list,
                   help="other engines on the same prompts: hf, hf-assisted, hf-lookup, llamacpp, llamacpp-lookup "
                        "(llamacpp needs `pip install llama-cpp-python`, a source build of minutes); auto (default): "
                        "all, those not installed skipped with a note; none")
    d.add_argument("--weights", type=_name_list,
                   help="the target's weights, each a separate run compared in one table: auto (a GGUF's own "
                        "blocks), bf16, or a block format (default auto; speedups are over the first)")
    d.add_argument("--retrieval-weights", type=_name_list,
                   help="weights of the retrieval level, each a separate run of retrieval/triforce: model, q4_0, "
                        "... (default model)")
    d.add_argument("--sweep", help="fixed GAMMA/DRAFT_GAMMA pairs run beside each speculating method's adaptive "
                                   "default, e.g. 2/1,4/2,6/2,8/3; adds a table and heat maps of adaptive against "
                                   "plain decoding and the best of them")
    d.add_argument("--kv-offload", metavar="DIR", help="also run every method with the target's KV cache on disk "
                                                        "under DIR beyond --kv-ram-budget, side by side")
    d.add_argument("--kv-ram-budget", type=_size, metavar="SIZE", help="RAM for the KV cache with --kv-offload")
    d.add_argument("--isa", help="the kernels of the whole run: avx512, avx2, neon or none (PyTorch) (default: the "
                                 "best this CPU runs; same as TRIFORCE_ISA)")
    d.add_argument("--ppl-tokens", type=_nonneg_int,
                   help="score the target's perplexity on this many true next tokens per context (default 128; 0: off)")
    ac = bsub.add_parser("acceptance", help="acceptance of the target on sparse caches (retrieval, StreamingLLM, "
                                            "oracle top-k) against the full target, across budgets and chunk sizes")
    ac.add_argument("--context", type=_positive_int, help="prompt length (default 16384)")
    ac.add_argument("--budgets", type=_int_list, help="cache budgets in tokens (default 256,512,1024,2048,4096; "
                                                      "those not below the context are dropped)")
    ac.add_argument("--chunk-sizes", type=_int_list, help="retrieval chunk sizes swept (default 1,8,16,32,64)")
    ac.add_argument("--chunk-budget", type=_positive_int, help="budget of the chunk-size sweep (default 4096)")
    ac.add_argument("--chunk-size", type=_positive_int, help="retrieval chunk size of the budget sweep (default 8)")
    ac.add_argument("--gamma", type=_positive_int, help="drafts per full verification (default 6)")
    ac.add_argument("--new-tokens", type=_positive_int, help="tokens generated per run (default 64)")
    ac.add_argument("--needle-depth", type=_float, help="where the needle sits, 0 (start) to 1 (end) (default 0.5)")
    ac.add_argument("--sink", type=_nonneg_int, help="StreamingLLM sink tokens (default 16)")
    gm = bsub.add_parser("gamma", help="speed and acceptance of speculative and triforce across gammas")
    gm.add_argument("--context", type=_positive_int, help="prompt length (default 16384)")
    gm.add_argument("--gammas", type=_int_list, help="tokens per full verification (default 2,4,6,8,10)")
    gm.add_argument("--draft-gammas", type=_int_list, help="triforce: tokens per middle step (default 1,2,3,4)")
    gm.add_argument("--new-tokens", type=_positive_int, help="tokens generated per run (default 128)")
    gm.add_argument("--temperature", type=_float, help="0 is greedy (default 0; top-p 0.9 when sampling)")
    gm.add_argument("--draft", help="draft model or 'ngram' (default: the shipped draft, else ngram)")
    gm.add_argument("--repeats", type=_positive_int, help="interleaved repeats; medians reported (default 1)")
    gm.add_argument("--budget", type=_positive_int, help="retrieval budget (default 4096)")
    gm.add_argument("--chunk-size", type=_positive_int, help="retrieval chunk size (default 8)")
    bt = bsub.add_parser("batch", help="throughput of batched decoding across batch sizes, contexts and methods")
    bt.add_argument("--contexts", type=_int_list, help="prompt lengths (default 4096,16384)")
    bt.add_argument("--batch-sizes", type=_int_list, help="sequences decoded together (default 1,2,4,8)")
    bt.add_argument("--methods", type=_name_list,
                    help="comma-separated (default autoregressive,streaming,retrieval,triforce)")
    bt.add_argument("--drafts", type=_name_list,
                    help="drafts of speculative/triforce: ngram, default (the shipped draft) or paths (default ngram)")
    bt.add_argument("--new-tokens", type=_positive_int, help="tokens generated per sequence (default 64)")
    bt.add_argument("--temperature", type=_float, help="0 is greedy (default 0; top-p 0.9 when sampling)")
    bt.add_argument("--repeats", type=_positive_int, help="interleaved repeats; medians reported (default 1)")
    for p in (d, bt):  # engine knobs, passed to every method of the run (see _paper_bench)
        p.add_argument("--gamma", type=_auto_or_positive)
        p.add_argument("--draft-gamma", type=_auto_or_positive)
        p.add_argument("--budget", type=_positive_int)
        p.add_argument("--chunk-size", type=_positive_int)
    bs = bsub.add_parser("serve", help="a server's total tokens/s for concurrent clients, --max-batch N vs 1")
    bs.add_argument("--clients", type=_positive_int, help="concurrent streaming clients (default 8)")
    bs.add_argument("--max-batch", type=_positive_int, help="the batching server's --max-batch (default 8)")
    bs.add_argument("--context", type=_positive_int, help="prompt tokens per client (default 512)")
    bs.add_argument("--new-tokens", type=_positive_int, help="completion tokens per client (default 128)")
    bs.add_argument("--method", help="the servers' --method (default autoregressive)")
    bs.add_argument("--draft", help="the servers' --draft (speculative/triforce)")
    bs.add_argument("--rounds", type=_positive_int, help="interleaved rounds; medians reported (default 2)")
    for p in (d, ac, gm, bt, bs):
        p.add_argument("--document", help="corpus document: vim, jargon, python-docs or a text file (default vim; "
                                          "bench decode takes several, comma-separated)")
        p.add_argument("--model", help="target: HF directory or GGUF (default: the embedded SmolLM2-135M-Instruct)")
        p.add_argument("--dtype", choices=["bf16", "fp32"],
                       help="weights and KV cache dtype (default bf16; fp32 with --quick)")
        p.add_argument("--threads", type=_positive_int, help="CPU threads (default: PyTorch's; 1 with --quick)")
        p.add_argument("--quick", action="store_true",
                       help="seconds-long smoke run: a tiny random model, short contexts, few tokens")
        p.add_argument("--out", default="bench-out", help="directory for JSON, Markdown and PNG results")
    dr = bsub.add_parser("draft", help="a draft model's agreement, acceptance and cost against its target")
    dr.add_argument("--draft", help="draft model directory (default: the shipped draft)")
    dr.add_argument("--heldout", default="vim", help="held-out document (never in the draft's training text)")
    dr.add_argument("--update-card", action="store_true", help="record the figures in the draft's model card")
    dr.add_argument("--out", default="bench-out")
    kn = bsub.add_parser("kernels", help="attention and projection kernels against the memory bandwidth")
    kn.add_argument("--contexts", type=_int_list, help="cached tokens per attention call (default 2048,8192)")
    kn.add_argument("--queries", type=_int_list, help="query tokens per call: 1 decodes, more verify (default 1,2,5,7)")
    kn.add_argument("--rows", type=_int_list, help="input rows per projection pass (default 1,4,8,12,16,24,32)")
    kn.add_argument("--layers", type=_positive_int, help="separate caches cycled through (default: the model's layers)")
    kn.add_argument("--prefill-queries", type=_positive_int,
                    help="new tokens of the prefill chunk timed through the kernel and flash attention (default 1024)")
    kn.add_argument("--repeats", type=_positive_int, help="timed passes; medians reported (default 7)")
    kn.add_argument("--weights", type=_name_list,
                    help="projection weights compared, alternating: bf16, auto (a GGUF's own blocks) or a block "
                         "format (default bf16,auto)")
    kn.add_argument("--model", help="target: HF directory or GGUF (default: the embedded SmolLM2-135M-Instruct)")
    kn.add_argument("--quick", action="store_true", help="seconds-long smoke run: one short context, two layers")
    kn.add_argument("--out", default="bench-out")
    pl = bsub.add_parser("parallel", help="ms/token and memory per rank for 1 and N tensor-parallel ranks")
    pl.add_argument("--contexts", type=_int_list, default=[8192, 32768], help="prompt tokens (default 8192,32768)")
    pl.add_argument("--ranks", type=_int_list, default=[1, 2], help="rank counts compared (default 1,2)")
    pl.add_argument("--methods", type=_name_list, default=["autoregressive", "triforce"],
                    help="comma-separated (default autoregressive,triforce)")
    pl.add_argument("--draft", default="ngram", help="draft of speculative/triforce (default ngram)")
    pl.add_argument("--new-tokens", type=_positive_int, default=64)
    pl.add_argument("--repeats", type=_positive_int, default=2, help="interleaved repeats; medians reported")
    pl.add_argument("--document", default="vim", help="corpus document (default vim)")
    pl.add_argument("--out", default="bench-out")
    r = bsub.add_parser("rope", help="perplexity past the trained length for each RoPE scaling")
    r.add_argument("--contexts", type=_int_list, default=[8192, 16384, 32768])
    r.add_argument("--last", type=_positive_int, default=512, help="tokens scored at the end of each context")
    r.add_argument("--document", default="vim")
    r.add_argument("--out", default="bench-out")
    return parser


def _list_parser(kind: type, low: int, noun: str, bound: str) -> Any:
    """An argparse type for comma-separated `kind` values, each at least `low`."""

    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {noun}, got {text!r}") from None
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}")
        return values

    return parse


_float_list = _list_parser(float, 0, "numbers", "numbers >= 0")
_int_list0 = _list_parser(int, 0, "integers", "integers >= 0")
_int_list = _list_parser(int, 1, "integers", "positive integers")


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file and args.prompt_file != "-":
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise TriforceError(f"prompt file {args.prompt_file!r} does not exist") from None
        except UnicodeDecodeError:
            raise TriforceError(f"prompt file {args.prompt_file!r} is not UTF-8 text") from None
        except OSError as exc:
            raise TriforceError(f"cannot read prompt file {args.prompt_file!r}: {exc.strerror}") from None
    if args.prompt_file == "-" or not sys.stdin.isatty():
        return sys.stdin.read()
    raise TriforceError("no prompt: use --prompt TEXT, --prompt-file FILE, or pipe text on stdin")


def check_sampling_args(args: argparse.Namespace) -> None:
    from .sampling import SamplingParams

    SamplingParams(args.temperature, args.top_p, args.top_k)  # raises a SettingError when invalid


KNOBS = ("gamma", "draft_gamma", "budget", "chunk_size", "sink", "window", "rebuild_every", "retrieval_weights",
         "draft_weights", "kv_offload", "kv_ram_budget", "kv_offload_keep")


def load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """(target, settings): without --method, TriForce when a draft is named or shipped for the
    target, else plain autoregressive decoding."""
    from .config import parse_rope_scaling
    from .loading import default_draft, load, load_draft
    from .settings import EngineSettings, method_needs_draft

    target = load(args.model, dtype=args.dtype, rope_scaling="auto", weights=args.weights,
                  tensor_parallel=getattr(args, "tensor_parallel", 1))
    target.decoder.rope_override = parse_rope_scaling(args.rope_scaling, target.config.max_position_embeddings)
    shipped = default_draft(target)
    method = args.method or ("triforce" if args.draft or shipped != "ngram" else "autoregressive")
    name = args.draft or (shipped if method_needs_draft(method) else None)
    draft: Any = None
    if name and method != "autoregressive":
        draft = load_draft(name, target)
    settings = EngineSettings(method=method, draft=draft, **{k: getattr(args, k) for k in KNOBS},
                              max_context=getattr(args, "max_context", None))
    return target, settings


def follows(target: Any) -> bool:
    """On a tensor-parallel rank other than 0 (under torchrun): follow rank 0 until it exits."""
    group = target.group
    if group is None or group.leader:
        return False
    from .tp_worker import follow

    follow(target)
    group.close()
    return True


def flag_for(setting: str) -> str:
    """A setting's command-line flag."""
    return "--" + setting.replace("_", "-")


def cmd_generate(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    if args.batch_file:
        return generate_batch_file(args)
    prompt = read_prompt(args)
    if not prompt.strip():
        raise SettingError("prompt", "is empty")
    from .engine import Engine
    from .metrics import summary

    target, settings = load_models(args)
    if follows(target):
        return 0
    engine = Engine(target, settings, progress=not args.quiet)
    generation = engine.stream(
        prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, chat=args.chat, num_samples=args.num_samples,
    )
    for piece in generation:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = generation.result
    assert result is not None
    if args.json:
        out = {
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
            "stats": result.stats,
        }
        if result.samples is not None:
            out["samples"] = result.samples
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if not args.quiet:
        print(summary(result.prompt_tokens, result.stats), file=sys.stderr)
    return 0


BATCH_KEYS = {"prompt": str, "max_new_tokens": int, "temperature": (int, float), "top_p": (int, float),
              "top_k": int, "seed": int, "stop": list, "chat": bool}


def read_batch_file(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Requests from a JSON-lines file, each completed with the command line's settings."""
    from .sampling import SamplingParams

    try:
        with open(args.batch_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TriforceError(f"cannot read --batch-file {args.batch_file!r}: {exc.strerror}") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{args.batch_file}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TriforceError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise TriforceError(f"{where}: each line must be a JSON object")
        for key, value in item.items():
            kind = BATCH_KEYS.get(key)
            if kind is None:
                raise TriforceError(f"{where}: unknown key {key!r} (allowed: {', '.join(BATCH_KEYS)})")
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TriforceError(f"{where}: {key!r} has the wrong type")
        if not item.get("prompt", "").strip():
            raise TriforceError(f"{where}: 'prompt' is missing or empty")
        request = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                   "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "chat": args.chat, **item}
        try:
            SamplingParams(request["temperature"], request["top_p"], request["top_k"])
        except SettingError as exc:
            raise TriforceError(f"{where}: {exc}") from None
        if request["max_new_tokens"] < 1:
            raise TriforceError(f"{where}: max_new_tokens must be >= 1")
        requests.append(request)
    if not requests:
        raise TriforceError(f"--batch-file {args.batch_file!r} has no requests")
    return requests


def generate_batch_file(args: argparse.Namespace) -> int:
    from .batch import generate_batch

    if args.num_samples != 1:
        raise TriforceError("--num-samples does not combine with --batch-file (give several lines)")
    requests = read_batch_file(args)
    target, settings = load_models(args)
    if follows(target):
        return 0
    results = generate_batch(target, requests, settings)
    failed = 0
    for result in results:
        if isinstance(result, TriforceError):
            failed += 1
            print(json.dumps({"error": str(result)}))
            continue
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                          "finish_reason": result.finish_reason, "stats": result.stats}))
    if not args.quiet:
        done = [r for r in results if not isinstance(r, TriforceError)]
        tokens = sum(len(r.token_ids) for r in done)
        print(f"batch of {len(results)}: {tokens} new tokens, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server.app import create_app
    from .server.worker import Server

    if not 0 < args.port < 65536:
        raise TriforceError(f"--port must be between 1 and 65535, got {args.port}")
    with socket.socket() as probe:  # fail before the slow model load, not after
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise TriforceError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    max_batch = args.max_batch or 4
    target, settings = load_models(args)
    if follows(target):
        return 0
    max_context = args.max_context or target.config.max_position_embeddings
    settings = settings.replace(max_context=None)  # the server's context is checked per request
    name = args.served_model_name or ("smollm2-135m-instruct" if target.is_embedded else
                                      Path(target.source).name.removesuffix(".gguf"))
    server = Server(target, settings, args.max_queue, max_context, name, max_batch)
    server.start()
    print(f"triforce: serving {name} ({settings.method}) on http://{args.host}:{args.port}/v1 | context "
          f"{max_context} | batch {max_batch} | queue {args.max_queue}"
          + (f" | tensor parallel {args.tensor_parallel}" if args.tensor_parallel > 1 else "")
          + (" | API key required" if args.api_key else ""), file=sys.stderr, flush=True)
    # uvicorn drains open requests on SIGTERM/SIGINT, then re-raises the signal to the handler
    # that was installed before it: make that one a no-op so a clean shutdown exits with 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(create_app(server, args.api_key), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=30)
    except OSError as exc:
        raise TriforceError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .corpus import document_tokens
    from .engine import Engine
    from .loading import default_draft, load
    from .metrics import summary
    from .settings import EngineSettings, method_needs_draft

    check_sampling_args(args)
    target = load(None)
    draft: Any = None
    if method_needs_draft(args.method):
        name = args.draft or default_draft(target)
        draft = "ngram" if name == "ngram" else load(name, dtype=target.decoder.dtype)
    settings = EngineSettings(method=args.method, draft=draft)
    tok = target.tokenizer
    ids = document_tokens(tok, args.document, args.context)
    what = "to continue"
    if args.task == "question":
        ids = tok.encode_chat([{"role": "user", "content": tok.decode(ids) + "\n\n" + args.question}])
        what = "+ a question"
    print(f"model {target.source} | draft {settings.draft_name} | prompt {len(ids)} tokens "
          f"({args.context} of the {args.document} document {what}) | method {args.method}", file=sys.stderr)
    engine = Engine(target, settings, progress=True)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p if args.temperature > 0 else 1.0, top_k=args.top_k, seed=args.seed)
    generation = engine.stream(ids, **kwargs)
    for piece in generation:
        sys.stdout.write(piece)
        sys.stdout.flush()
    result = generation.result
    assert result is not None
    print("\n", file=sys.stdout)
    print(summary(result.prompt_tokens, result.stats), file=sys.stderr)
    if args.no_compare or args.method == "autoregressive":
        return 0
    engine.configure(method="autoregressive", draft=None)
    baseline = engine.generate(ids, **kwargs)  # the prompt is cached: no second prefill
    same = baseline.token_ids == result.token_ids
    ar_ms, ms = baseline.stats["ms_per_token"], result.stats["ms_per_token"]
    print(f"autoregressive: {ar_ms:.1f} ms/token | {args.method}: {ms:.1f} ms/token | speedup {ar_ms / ms:.2f}x"
          + (f" | identical output: {'yes' if same else 'NO'}" if args.temperature == 0 else
             f" | sampled at temperature {args.temperature:g}: the same distribution, not the same tokens"),
          file=sys.stderr)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill

    if args.time_budget is not None and args.time_budget <= 0:
        raise TriforceError("--time-budget must be a positive number of minutes")
    if args.head:
        return distill_a_head(args)
    if args.chat_prompts:
        raise TriforceError("--chat-prompts trains draft heads only: add --head")
    cfg = DistillConfig(
        target=args.target, out=args.out, corpus=args.corpus, layers=args.layers, hidden=args.hidden,
        heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate, seq_len=args.seq_len,
        batch=args.batch, lr=args.lr, steps=args.steps, time_budget_min=args.time_budget, max_tokens=args.max_tokens,
        teacher_topk=args.teacher_topk, init=args.init, init_from=args.init_from, seed=args.seed,
        checkpoint_every=args.checkpoint_every, vocab=args.vocab, coverage=args.coverage,
        teacher_cache=args.teacher_cache, extra={"layers": args.from_layers} if args.from_layers else {},
    )
    report = distill(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({k: report[k] for k in ("steps", "training_tokens", "minutes", "first_loss", "last_loss",
                                             "heldout")}))
    return 0


def distill_a_head(args: argparse.Namespace) -> int:
    from .distill_head import HeadDistillConfig, distill_head

    cfg = HeadDistillConfig(
        target=args.target, out=args.out, corpus=args.corpus, vocab=args.vocab,
        coverage=0.95 if args.coverage is None else args.coverage,
        seq_len=args.seq_len, batch=args.batch, lr=args.lr, steps=args.steps, time_budget_min=args.time_budget,
        max_tokens=args.max_tokens, seed=args.seed, checkpoint_every=args.checkpoint_every,
        chat_prompts=args.chat_prompts, chat_tokens=args.chat_tokens,
    )
    report = distill_head(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr))
    keys = ("steps", "training_tokens", "minutes", "first", "last", "heldout", "chat", "heldout_chat")
    print(json.dumps({k: report[k] for k in keys if k in report}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.bench == "engine":
        from .bench import engine

        engine.run(args.contexts, args.new_tokens, args.repeats, args.document, not args.no_transformers,
                   Path(args.out), isas=args.isa)
    elif args.bench in ("decode", "acceptance", "gamma", "batch", "serve"):
        return _paper_bench(args)
    elif args.bench == "draft":
        from .bench import draft
        from .loading import SHIPPED_DRAFT

        path = args.draft or str(SHIPPED_DRAFT)
        if not (Path(path) / "config.json").exists():
            raise TriforceError(f"no draft model at {path}")
        draft.run(path, args.heldout, update_card=args.update_card, out=Path(args.out))
    elif args.bench == "kernels":
        from .bench import kernels, quick

        kernels.run(**quick.settings(args, kernels.DEFAULTS, kernels.QUICK if args.quick else None),
                    out=Path(args.out))
    elif args.bench == "parallel":
        from .bench import parallel
        from .settings import METHODS

        for method in args.methods:
            if method not in METHODS:
                raise TriforceError(f"unknown method {method!r} in --methods; choose from {', '.join(METHODS)}")
        parallel.run(args.contexts, args.ranks, args.methods, args.draft, args.new_tokens, args.repeats,
                     args.document, Path(args.out))
    elif args.bench == "rope":
        from .bench import rope

        rope.run(args.contexts, args.last, args.document, Path(args.out))
    return 0


def _name_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _paper_bench(args: argparse.Namespace) -> int:
    """`triforce bench decode|acceptance|gamma|batch|serve`: settings are the flags given, then the --quick
    preset, then the bench's defaults; they are checked before anything is loaded."""
    import importlib
    from pathlib import Path

    from .bench import quick

    bench = importlib.import_module(f".bench.{args.bench}", __package__)
    settings = quick.settings(args, bench.DEFAULTS, bench.QUICK if args.quick else None)
    if args.quick and args.threads is None:
        import torch

        torch.set_num_threads(1)  # tiny models: thread hand-offs would cost more than the work
    if getattr(args, "isa", None):
        from . import native

        native.set_isa(args.isa)  # before anything is loaded: the whole run on these kernels
    if args.bench in ("decode", "batch"):
        given = (("gamma", args.gamma), ("draft_gamma", args.draft_gamma), ("budget", args.budget),
                 ("chunk_size", args.chunk_size))
        settings["knobs"] = {**settings["knobs"], **{k: v for k, v in given if v is not None}}
    if args.bench == "decode":
        bench.validate(settings["contexts"], settings["methods"], settings["temperatures"], settings["peers"],
                       settings["weights"], settings["retrieval_weights"], settings["sweep"], settings["kv_offload"],
                       settings["kv_ram_budget"])
    elif args.bench == "batch":
        bench.validate(settings["contexts"], settings["batch_sizes"], settings["methods"], settings["temperature"])
    elif args.bench == "serve":
        bench.validate(settings["clients"], settings["max_batch"], settings["method"])
    elif args.bench == "acceptance":
        bench.validate(settings["context"], settings["budgets"], settings["chunk_sizes"], settings["chunk_budget"],
                       settings["needle_depth"], settings["new_tokens"])
    else:
        bench.validate(settings["gammas"], settings["draft_gammas"], settings["temperature"])
    with quick.materialized(settings) as resolved:
        bench.run(**resolved, out=Path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        handler = {"generate": cmd_generate, "bench": cmd_bench, "distill": cmd_distill, "demo": cmd_demo,
                   "serve": cmd_serve}[args.command]
        return handler(args)
    except SettingError as exc:
        print(f"triforce: error: {flag_for(exc.setting)} {exc.problem}", file=sys.stderr)
        return EXIT_ERROR
    except TriforceError as exc:
        print(f"triforce: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("triforce: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        print("triforce: error: out of memory; use a shorter context", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line, with a way to see the traceback
        if os.environ.get("TRIFORCE_DEBUG"):
            raise
        print(f"triforce: internal error: {type(exc).__name__}: {exc} (set TRIFORCE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
