"""A tensor-parallel rank other than 0: load this rank's shard, then carry out what rank 0's
engines do, step for step, until rank 0 says to exit.

Started by rank 0 (`python -m triforce.tp_worker SPEC`, see parallel.join) or, under torchrun,
by the program itself: `triforce.load(..., tensor_parallel=N)` returns on every rank, and ranks
other than 0 call `follow(target)`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from typing import Any

import torch

from .batcher import ForwardBatcher
from .engine import Engine
from .errors import TriforceError
from .loading import LoadedModel, load
from .parallel import RankFailed, StepLog
from .settings import EngineSettings


def follow(target: LoadedModel) -> None:
    """Run rank 0's engine calls on this rank's shard until rank 0 exits (then return)."""
    group = target.group
    if group is None or group.leader:
        raise ValueError("follow() runs on the ranks other than 0 of a tensor-parallel group")
    follower = _Follower(target)
    while True:
        message = group.share()
        if message[0] == "exit":
            return
        if message[0] == "step":  # a batch step (parallel.StepLog)
            follower.batch_step(*message[1:])
        else:
            follower.carry_out(message, follower.engines)


class _Follower:
    """This rank's copies of rank 0's engines: those of single generations, called here as rank 0
    calls them, and those of batches, each in a batch member of its own replaying its log."""

    def __init__(self, target: LoadedModel) -> None:
        self.target = target
        self.engines: dict[int, Engine] = {}
        self.drafts: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.batcher = ForwardBatcher()
        self.batcher.step_log = StepLog(target.group)
        self.members: dict[int, threading.Thread] = {}

    def carry_out(self, call: tuple, engines: dict[int, Engine], batcher: ForwardBatcher | None = None) -> bool:
        """Do engine call `call` as rank 0 did; False once it released the engine."""
        op, engine_id, rope, values, draft, *args = call
        self.target.decoder.rope_override = rope
        if isinstance(draft, dict):  # a draft model: every rank runs its own copy
            key = json.dumps(draft, sort_keys=True)
            with self.lock:
                if key not in self.drafts:
                    self.drafts[key] = load(**draft)
                draft = self.drafts[key]
        settings = EngineSettings(draft=draft, **values)
        engine = engines.get(engine_id)
        if engine is None:
            engine = engines[engine_id] = Engine(self.target, settings, batcher=batcher, follows=engine_id)
        elif engine.settings != settings:
            engine.configure(settings)
        if op == "release":
            engine.release()
            del engines[engine_id]
            return False
        if op == "reserve":
            engine.reserve(*args)
        elif op == "prepare":
            engine.prepare(*args)
        elif op == "stream":
            ids, options = args
            for _ in engine.stream(ids, **options):
                pass
        return True

    def batch_step(self, log: dict[int, list], order: list[int]) -> None:
        step_log = self.batcher.step_log
        step_log.deliver(log)
        for key in log:  # a sequence new to the batch (or back after its release) gets a member
            member = self.members.get(key)
            if member is None or not member.is_alive():
                self.members[key] = self.batcher.add(lambda key=key: self._replay(key), key=key)
        if order:
            self.batcher.run_order(order)

    def _replay(self, key: int) -> None:
        """A batch member: rank 0's calls of engine `key`, in order, until it releases the engine.
        A failure here leaves this rank unable to follow: it exits, which the others see at once."""
        engines: dict[int, Engine] = {}
        try:
            while True:
                kind, call = self.batcher.step_log.take(key)
                if kind != "call":
                    raise RankFailed(f"tensor parallelism: got a {kind} outside a generation")
                if not self.carry_out(call, engines, self.batcher):
                    return
        except BaseException as exc:  # noqa: BLE001 - this rank cannot go on
            print(f"triforce: rank {self.target.group.rank}: error: {exc}", file=sys.stderr, flush=True)
            os._exit(1)


def _die_with_parent() -> None:
    # A rank started by rank 0 ends with it, even when rank 0 is killed outright.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    threads = os.environ.get("TRIFORCE_TP_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    rank = os.environ.get("RANK", "?")
    try:
        spec = json.loads(argv[0])
        target = load(**spec, tensor_parallel=int(os.environ["WORLD_SIZE"]))
        follow(target)
        group = target.group
        assert group is not None
        group.close()
    except TriforceError as exc:  # RankFailed included: rank 0 reports the failure to the user
        print(f"triforce: rank {rank}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; rank 0 says so
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
