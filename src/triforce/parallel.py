"""Tensor parallelism: which attention heads, MLP columns and vocabulary rows each rank holds, and
the torch.distributed collectives (gloo on CPUs) that join the ranks' passes.

Every rank runs the same program on its own shard (SPMD): rank 0 owns the prompt and the
decisions that are not computed from shared logits (the clock adaptive speculation learns from,
whether a generation goes on) and broadcasts them, so every rank takes the same path through a
generation. A collective that finds a rank gone or silent raises RankFailed on the others.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import ModelConfig
from .errors import SettingError, TriforceError
from .quant import QuantizedTensor

# How long a collective waits for the other ranks before declaring them failed (a dead rank is
# noticed at once, from its closed connection; this catches a rank that hangs).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("TRIFORCE_TP_TIMEOUT", "300"))
# Workers wait between requests (a server may idle for days) on a channel that never times out.
IDLE_TIMEOUT = datetime.timedelta(days=365)


class RankFailed(TriforceError):
    """A rank of a tensor-parallel group stopped or stopped answering."""


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` holds KV heads [kv_heads), their query heads, MLP columns
    [intermediate) and output-head rows [vocab); `vocab_rows` lists every rank's output rows."""

    rank: int
    world: int
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_rows: tuple[int, ...]

    @property
    def tag(self) -> str:
        return f"tp{self.world}r{self.rank}"


def _split(total: int, parts: int, align: int) -> list[int]:
    """`total` in `parts` near-equal pieces, each a multiple of `align` but the last (of 1 where
    `align` would leave a piece empty)."""
    if total < align * parts:
        align = 1
    units, rem = divmod(total // align, parts)
    sizes = [(units + (i < rem)) * align for i in range(parts)]
    sizes[-1] += total - sum(sizes)
    return sizes


def plan_shards(config: ModelConfig, world: int, align: int = 32) -> list[Shard]:
    """Each rank's shard. KV heads split as evenly as they go (3 heads on 2 ranks: 2 + 1); the MLP
    columns then balance each rank's weight bytes (a rank with fewer heads takes more of the MLP),
    in multiples of `align` (the quantized blocks of the down projection's rows)."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise SettingError("tensor_parallel", f"must be an integer >= 1, got {world!r}")
    if world > config.num_kv_heads:
        raise SettingError("tensor_parallel", f"is {world}, more than the model's {config.num_kv_heads} KV heads")
    H, hd, g, inter = config.hidden_size, config.head_dim, config.group_size, config.intermediate_size
    heads = _split(config.num_kv_heads, world, 1)
    attention = [n * hd * H * (2 * g + 2) for n in heads]  # q, o and k, v weights per rank
    mlp_unit = 3 * H  # gate, up and down weights per MLP column
    share = (sum(attention) + mlp_unit * inter) / world
    align = align if inter % align == 0 else 1
    columns, left = [], inter
    for r in range(world - 1):
        want = max(0.0, (share - attention[r]) / mlp_unit)
        n = min(left - align * (world - 1 - r), int(round(want / align)) * align)
        columns.append(max(align, n))
        left -= columns[-1]
    columns.append(left)
    if min(columns) < 1:
        raise SettingError("tensor_parallel", f"is {world}, too many ranks for {inter} MLP columns")
    vocab = _split(config.vocab_size, world, 16)
    shards, kv0, i0, v0 = [], 0, 0, 0
    for r in range(world):
        shards.append(Shard(r, world, (kv0, kv0 + heads[r]), (i0, i0 + columns[r]), (v0, v0 + vocab[r]),
                            tuple(vocab)))
        kv0, i0, v0 = kv0 + heads[r], i0 + columns[r], v0 + vocab[r]
    return shards


def _rows(w: Any, a: int, b: int) -> Any:
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.blocks[a:b], w.format, (b - a, w.shape[1]))
    return w[a:b].contiguous()


def _columns(w: Any, a: int, b: int) -> Any:
    """Input columns [a, b) of a weight: its blocks where they align, else dense float32."""
    if isinstance(w, QuantizedTensor):
        bs, bb = w.format.block_size, w.format.block_bytes
        if a % bs == 0 and b % bs == 0:
            return QuantizedTensor(w.blocks[:, a // bs * bb : b // bs * bb].contiguous(), w.format, (w.shape[0], b - a))
        return w.dequantize(torch.float32)[:, a:b].contiguous()
    return w[:, a:b].contiguous()


def shard_weights(config: ModelConfig, weights: dict[str, Any], shard: Shard) -> ModelConfig:
    """Cut `weights` (Hugging Face names, dense or quantized) down to `shard` in place; the shard's
    config (its heads and MLP columns; the output head becomes this rank's rows of it, the
    embedding stays whole)."""
    hd, g = config.head_dim, config.group_size
    k0, k1 = shard.kv_heads
    i0, i1 = shard.intermediate
    q = (k0 * g * hd, k1 * g * hd)
    kv = (k0 * hd, k1 * hd)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        for name, (a, b) in ((p + "self_attn.q_proj", q), (p + "self_attn.k_proj", kv), (p + "self_attn.v_proj", kv)):
            weights[name + ".weight"] = _rows(weights[name + ".weight"], a, b)
            if name + ".bias" in weights:
                weights[name + ".bias"] = weights[name + ".bias"][a:b].contiguous()
        weights[p + "self_attn.o_proj.weight"] = _columns(weights[p + "self_attn.o_proj.weight"], *q)
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            weights[p + name] = _rows(weights[p + name], i0, i1)
        weights[p + "mlp.down_proj.weight"] = _columns(weights[p + "mlp.down_proj.weight"], i0, i1)
    tied = config.tie_word_embeddings or "lm_head.weight" not in weights
    head = weights["model.embed_tokens.weight" if tied else "lm_head.weight"]
    weights["lm_head.weight"] = _rows(head, *shard.vocab)
    return dataclasses.replace(config, num_heads=(k1 - k0) * g, num_kv_heads=k1 - k0, intermediate_size=i1 - i0,
                               tie_word_embeddings=False)


def down_block_size(weights: dict[str, Any]) -> int:
    """The MLP split's alignment: the down projections' block size (32 for dense weights)."""
    sizes = [w.format.block_size for n, w in weights.items() if n.endswith("down_proj.weight")
             and isinstance(w, QuantizedTensor)]
    return max(sizes + [32])


class Group:
    """This process's place in a tensor-parallel group and the collectives a pass needs."""

    def __init__(self, rank: int, world: int, idle: Any, workers: list[subprocess.Popen] | None = None) -> None:
        self.rank, self.world = rank, world
        self._idle = idle  # the never-timing-out group commands travel on
        self.workers = workers or []  # processes this rank started
        self.failed: str | None = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        if self.failed:
            raise RankFailed(self.failed)
        try:
            return fn(*args, **kw)
        except (RuntimeError, ConnectionError, OSError) as exc:  # torch.distributed's errors
            text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", str(exc)).strip()  # gloo's source positions
            detail = text.splitlines()[0] if text else type(exc).__name__
            self.failed = (f"tensor parallelism: a rank of {self.world} stopped or stopped answering during "
                           f"{what} ({detail[:160]})")
            raise RankFailed(self.failed) from None

    # -- what a pass exchanges ------------------------------------------------------------------
    # Built from point-to-point sends: for a decoding step's few KB, gloo's all_reduce and
    # all_gather run several rounds of messages where an isend/recv pair to each peer is one.
    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (same shape and dtype on all), in rank order."""
        parts = [t if r == self.rank else torch.empty_like(t) for r in range(self.world)]

        def run() -> None:
            sends = [dist.isend(t, peer) for peer in range(self.world) if peer != self.rank]
            for peer in range(self.world):
                if peer != self.rank:
                    dist.recv(parts[peer], peer)
            for s in sends:
                s.wait()

        self._call("a pass", run)
        return parts

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `t`, added in rank order (the same bits on every rank)."""
        parts = self._exchange(t.contiguous())
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def gather_columns(self, t: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """[R, sizes[rank]] from every rank -> [R, sum(sizes)], rank order."""
        width = max(sizes)
        mine = t if t.shape[1] == width else torch.nn.functional.pad(t, (0, width - t.shape[1]))
        parts = self._exchange(mine.contiguous())
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)

    # -- rank 0's decisions ---------------------------------------------------------------------
    def clock(self) -> float:
        """Rank 0's time, on every rank (adaptive speculation then plans the same on all)."""
        t = torch.tensor([time.perf_counter() if self.leader else 0.0], dtype=torch.float64)
        self._call("a generation", dist.broadcast, t, 0)
        return float(t.item())

    def decide(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        t = torch.tensor([value], dtype=torch.int64)
        self._call("a generation", dist.broadcast, t, 0)
        return int(t.item())

    def share(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank, over the channel that waits between requests."""
        box = [obj]
        self._call("waiting for work", dist.broadcast_object_list, box, 0, group=self._idle)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        out: list[Any] = [None] * self.world
        self._call("a generation", dist.all_gather_object, out, obj)
        return out

    def close(self) -> None:
        """Leave the group; rank 0 tells its workers to exit and waits for them (after a failure,
        ends them: one may be hung)."""
        if self.leader and not self.failed:
            try:
                self.share(("exit",))
            except RankFailed:
                pass
        for proc in self.workers:
            if self.failed:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


class StepLog:
    """Batched generation over a group: what rank 0's sequences decide between passes (engine
    calls, clock readings, whether to go on), logged per sequence and sent with each batch step
    along with the order the step runs the sequences' passes in. The other ranks' copies of the
    sequences replay the log in order, so they reach the same passes, which run in the same order.
    One per ForwardBatcher; sequences are named by rank 0's engine ids."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self._lock = threading.Lock()
        self._outbox: dict[int, list[tuple[str, Any]]] = {}  # rank 0
        self._inboxes: dict[int, queue.Queue] = {}  # the other ranks

    # -- rank 0 --------------------------------------------------------------------------------
    def record(self, key: int, kind: str, value: Any) -> None:
        with self._lock:
            self._outbox.setdefault(key, []).append((kind, value))

    def send(self, order: list[int]) -> None:
        """Send what was logged, and the keys of a step's passes in the order it runs them ([]: only
        the log, e.g. when a sequence leaves the batch)."""
        if not self.group.leader:
            return
        with self._lock:
            items, self._outbox = self._outbox, {}
            if items or order:
                self.group.share(("step", items, order))

    # -- the other ranks -----------------------------------------------------------------------
    def deliver(self, items: dict[int, list[tuple[str, Any]]]) -> list[int]:
        """Queue a step's log for its sequences; the keys seen for the first time."""
        new = [key for key in items if key not in self._inboxes]
        for key, values in items.items():
            inbox = self._inboxes.setdefault(key, queue.Queue())
            for value in values:
                inbox.put(value)
        return new

    def take(self, key: int, kind: str | None = None) -> Any:
        """The next logged (kind, value) of sequence `key` (its value, when `kind` is given and
        matches), waiting for the step that brings it."""
        got, value = self._inboxes[key].get()
        if kind is None:
            return got, value
        if got != kind:
            raise RankFailed(f"tensor parallelism: rank {self.group.rank} expected a {kind} from rank 0, got a {got}")
        return value


class Link:
    """What an engine on a group takes from rank 0: engine calls (sent from rank 0 only), clock
    readings and whether a generation goes on. Directly by broadcast, or, for a sequence of a
    batch, through the batch's StepLog under the engine's `key`."""

    def __init__(self, group: Group, log: StepLog | None = None, key: int = 0) -> None:
        self.group, self.log, self.key = group, log, key

    @property
    def batched(self) -> bool:
        return self.log is not None

    def tell(self, command: tuple) -> None:
        if not self.group.leader:
            return
        if self.log is None:
            self.group.share(command)
        else:
            self.log.record(self.key, "call", command)

    def clock(self) -> float:
        if self.log is None:
            return self.group.clock()
        if self.group.leader:
            now = time.perf_counter()
            self.log.record(self.key, "clock", now)
            return now
        return self.log.take(self.key, "clock")

    def decide(self, value: int) -> int:
        if self.log is None:
            return self.group.decide(value)
        if self.group.leader:
            self.log.record(self.key, "decide", value)
            return value
        return self.log.take(self.key, "decide")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, world: int, method: str) -> Any:
    dist.init_process_group("gloo", init_method=method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def join(world: int, worker_args: dict[str, Any]) -> Group:
    """This process's group of `world` ranks: the one torchrun started it in (RANK and WORLD_SIZE
    set), else rank 0 of a new group whose other ranks it starts here, each running
    `python -m triforce.tp_worker` with `worker_args` (how to load the same model)."""
    if dist.is_initialized():
        raise TriforceError("tensor parallelism: this process already belongs to a process group")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != world:
            raise SettingError("tensor_parallel", f"is {world}, but this process was started as one of "
                                                  f"{os.environ['WORLD_SIZE']} ranks")
        rank = int(os.environ["RANK"])
        try:
            idle = _init(rank, world, "env://")
        except (RuntimeError, ValueError) as exc:
            raise RankFailed(f"tensor parallelism: could not join the group: {str(exc).splitlines()[0]}") from None
        group = Group(rank, world, idle)
        if group.leader:
            atexit.register(group.close)
        return group
    import json

    port = _free_port()
    threads = max(1, torch.get_num_threads() // world)
    torch.set_num_threads(threads)
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TRIFORCE_TP_THREADS": str(threads)}
    workers = [subprocess.Popen([sys.executable, "-m", "triforce.tp_worker", json.dumps(worker_args)],
                                env={**env, "RANK": str(r)}, stdin=subprocess.DEVNULL)
               for r in range(1, world)]
    # Joining waits for every rank; a worker that dies first (a bad model path, an import error)
    # is reported at once rather than after the timeout.
    outcome: dict[str, Any] = {}

    def init() -> None:
        try:
            outcome["idle"] = _init(0, world, f"tcp://127.0.0.1:{port}")
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=init, daemon=True, name="triforce-tp-join")
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        dead = [(r, proc.returncode) for r, proc in enumerate(workers, 1) if proc.poll() is not None]
        if dead and thread.is_alive():
            for proc in workers:
                proc.kill()
            raise RankFailed(f"tensor parallelism: rank {dead[0][0]} exited with code {dead[0][1]} before joining")
    if "error" in outcome:
        for proc in workers:
            proc.kill()
        raise RankFailed(f"tensor parallelism: the other ranks did not join: {str(outcome['error']).splitlines()[0]}")
    group = Group(0, world, outcome["idle"], workers)
    atexit.register(group.close)
    return group
