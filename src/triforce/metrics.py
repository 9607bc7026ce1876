"""Speculation metrics, named as vLLM / SGLang / llama.cpp name them: kept per level while
decoding, summed over requests by the server, printed by the CLI."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

# the per-level counters every face reports
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


@dataclass
class LevelStats:
    """One level's figures over a generation's decoding."""

    name: str
    is_top: bool = False
    num_drafts: int = 0  # times this level's drafts were verified by the level above
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_at_position: list[int] = field(default_factory=list)
    drafted_at_position: list[int] = field(default_factory=list)
    forward_calls: int = 0
    forward_tokens: int = 0
    bytes_read: int = 0  # weights plus the KV rows its queries saw, summed over passes
    time_s: float = 0.0
    rebuilds: int = 0
    rebuild_s: float = 0.0

    def record(self, drafted: int, accepted: int) -> None:
        """One verification of `drafted` of this level's tokens, `accepted` of them kept."""
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        while len(self.drafted_at_position) < drafted:
            self.drafted_at_position.append(0)
            self.accepted_at_position.append(0)
        for i in range(drafted):
            self.drafted_at_position[i] += 1
            if i < accepted:
                self.accepted_at_position[i] += 1

    def as_dict(self) -> dict[str, Any]:
        rate = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None
        mal = 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None
        d: dict[str, Any] = {
            "name": self.name,
            "time_s": round(self.time_s, 4),
            "forward_calls": self.forward_calls,
            "forward_tokens": self.forward_tokens,
        }
        if self.forward_calls:
            d.update(ms_per_pass=round(1000 * self.time_s / self.forward_calls, 3),
                     mb_per_pass=round(self.bytes_read / self.forward_calls / 1e6, 3))
        if not self.is_top:
            d.update(
                num_drafts=self.num_drafts,
                num_draft_tokens=self.num_draft_tokens,
                num_accepted_tokens=self.num_accepted_tokens,
                draft_acceptance_rate=None if rate is None else round(rate, 4),
                mean_acceptance_length=None if mal is None else round(mal, 4),
                acceptance_at_position=[
                    round(a / n, 4) for a, n in zip(self.accepted_at_position, self.drafted_at_position)
                ],
            )
        if self.rebuilds:
            d.update(rebuilds=self.rebuilds, rebuild_s=round(self.rebuild_s, 4))
        return d


def drafting_levels(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The levels of a generation's stats whose drafts were verified (all but the top)."""
    return [level for level in stats["levels"] if "num_drafts" in level]


def summary(prompt_tokens: int, stats: dict[str, Any]) -> str:
    """A generation's figures as a few lines: speed, then each level's acceptance or passes."""
    lines = [
        f"prompt {prompt_tokens} tokens | prefill {stats['prefill_s']:.2f} s | "
        f"decode {stats['ms_per_token']:.1f} ms/token "
        f"({stats['tokens_per_s'] or 0:.1f} tokens/s) | {stats['new_tokens']} new tokens | method {stats['method']}"
        + (f" | kernels {stats['kernels']}" if "kernels" in stats else "")
    ]
    for level in stats["levels"]:
        if "draft_acceptance_rate" in level and level["num_drafts"]:
            lines.append(
                f"  {level['name']:<18} acceptance {level['draft_acceptance_rate']:.3f} | mean acceptance length "
                f"{level['mean_acceptance_length']:.2f} | {level['num_drafts']} verifications | {level['time_s']:.2f} s"
                + (f" | {level['rebuilds']} rebuilds {level['rebuild_s']:.2f} s" if level.get("rebuilds") else "")
            )
        else:
            lines.append(f"  {level['name']:<18} {level['forward_calls']} forward passes | {level['time_s']:.2f} s")
    if "controller" in stats:
        lines.append("  " + controller_sentence(stats["controller"]))
    if "kv_offload" in stats:
        kv = stats["kv_offload"]
        lines.append(f"  KV cache: {kv['ram_mb']:.0f} MB in RAM (whole layers: {kv['layers_in_ram']}), "
                     f"{kv['file_mb']:.0f} MB file | {kv['read_mb_per_token']:.0f} MB read per token at "
                     f"{kv['read_gbs'] or 0:.2f} GB/s")
    if "tensor_parallel" in stats:
        tp = stats["tensor_parallel"]
        memory = " / ".join(f"{mb} MB" for mb in tp.get("peak_rss_mb", []))
        lines.append(f"  tensor parallel: {tp['ranks']} ranks" + (f", peak memory {memory} (rank 0 first)"
                                                                   if memory else ""))
    return "\n".join(lines)


def controller_sentence(report: dict[str, Any]) -> str:
    """What adaptive speculation chose, in one sentence (from its report)."""
    if not report["cycles"]:
        return "adaptive speculation planned no cycle"
    top = max(report["structures"], key=report["structures"].get)
    most = "plain decoding" if top == "target" else top
    for knob, counts in report["gamma_histogram"].get(top, {}).items():
        most += f"{' at' if knob == 'gamma' else ','} {knob.replace('_', ' ')} {max(counts, key=counts.get)}"
    return (f"adaptive: {report['cycles']} cycles, {100 * report['plain_fraction']:.0f}% plain decoding, "
            f"{report['probes']} probes, most often {most}")


class ServingCounters:
    """Totals over a server's requests, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.generated_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self.cancelled = 0
        self.spec: dict[str, dict[str, int]] = {}  # level name -> COUNTERS totals
        self.cycles: dict[str, int] = {}  # adaptive speculation: cycles per structure ("ngram>target")
        self.gammas: dict[tuple[str, str, str], int] = {}  # (structure, knob, value) -> cycles
        self.probes = 0

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def cancel(self) -> None:
        with self.lock:
            self.cancelled += 1

    def finished(self, prompt_tokens: int, stats: dict[str, Any]) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += stats.get("new_tokens", 0)
            self.prefill_s += stats.get("prefill_s", 0.0)
            self.decode_s += stats.get("decode_s", 0.0)
            for level in drafting_levels(stats):
                entry = self.spec.setdefault(level["name"], dict.fromkeys(COUNTERS, 0))
                for key in COUNTERS:
                    entry[key] += level[key]
            report = stats.get("controller")
            if report:
                self.probes += report["probes"]
                for structure, n in report["structures"].items():
                    self.cycles[structure] = self.cycles.get(structure, 0) + n
                for structure, knobs in report["gamma_histogram"].items():
                    for knob, counts in knobs.items():
                        for value, n in counts.items():
                            key = (structure, knob, value)
                            self.gammas[key] = self.gammas.get(key, 0) + n

    def render(self, queue_depth: int, running: int, passes: int = 0, sequence_passes: int = 0) -> str:
        out = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP triforce:{name} {help_text}")
            out.append(f"# TYPE triforce:{name} {kind}")
            for labels, value in samples:
                out.append(f"triforce:{name}{labels} {value}")

        with self.lock:
            metric("requests_total", "counter", "HTTP requests by endpoint and status.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("queue_depth", "gauge", "Requests waiting for the engine.", [("", queue_depth)])
            metric("requests_running", "gauge", "Requests being generated.", [("", running)])
            metric("forward_passes_total", "counter", "Model passes run (each reads the weights once).",
                   [("", passes)])
            metric("batched_sequences_total", "counter", "Sum over passes of the requests each served "
                   "(divided by forward_passes_total: the mean batch size).", [("", sequence_passes)])
            metric("requests_cancelled_total", "counter", "Generations cancelled by client disconnects.",
                   [("", self.cancelled)])
            metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("prefill_seconds_total", "counter", "Seconds spent reading prompts.",
                   [("", round(self.prefill_s, 4))])
            metric("decode_seconds_total", "counter", "Seconds spent generating.", [("", round(self.decode_s, 4))])
            spec = (("num_drafts", "spec_decode_num_drafts_total", "Verification steps, per drafting level."),
                    ("num_draft_tokens", "spec_decode_num_draft_tokens_total", "Draft tokens proposed."),
                    ("num_accepted_tokens", "spec_decode_num_accepted_tokens_total", "Draft tokens accepted."))
            for key, name, text in spec:
                metric(name, "counter", text,
                       [(f'{{level="{level}"}}', v[key]) for level, v in sorted(self.spec.items())])
            metric("spec_decode_cycles_total", "counter", "Adaptive speculation: cycles (one pass of the target "
                   "each) by the levels they ran; structure=\"target\" is plain decoding.",
                   [(f'{{structure="{s}"}}', n) for s, n in sorted(self.cycles.items())])
            metric("spec_decode_probe_cycles_total", "counter", "Adaptive speculation: cycles run to re-measure an "
                   "option that was not the best.", [("", self.probes)])
            metric("spec_decode_gamma_cycles_total", "counter", "Adaptive speculation: cycles by the gamma or "
                   "draft gamma chosen.", [(f'{{structure="{s}",knob="{k}",value="{v}"}}', n)
                                            for (s, k, v), n in sorted(self.gammas.items())])
        return "\n".join(out) + "\n"
