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
from typing import Any

import torch

from .engine import Engine
from .errors import TriforceError
from .loading import LoadedModel, load
from .settings import EngineSettings


def follow(target: LoadedModel) -> None:
    """Run rank 0's engine calls on this rank's shard until rank 0 exits (then return)."""
    group = target.group
    if group is None or group.leader:
        raise ValueError("follow() runs on the ranks other than 0 of a tensor-parallel group")
    engines: dict[int, Engine] = {}
    drafts: dict[str, Any] = {}
    while True:
        command = group.share()
        if command[0] == "exit":
            return
        op, engine_id, rope, values, draft, *args = command
        target.decoder.rope_override = rope
        if isinstance(draft, dict):  # a draft model: every rank runs its own copy
            key = json.dumps(draft, sort_keys=True)
            if key not in drafts:
                drafts[key] = load(**draft)
            draft = drafts[key]
        settings = EngineSettings(draft=draft, **values)
        engine = engines.get(engine_id)
        if engine is None:
            engine = engines[engine_id] = Engine(target, settings)
        elif engine.settings != settings:
            engine.configure(settings)
        if op == "release":
            engine.release()
            del engines[engine_id]
        elif op == "reserve":
            engine.reserve(*args)
        elif op == "prepare":
            engine.prepare(*args)
        elif op == "stream":
            ids, options = args
            for _ in engine.stream(ids, **options):
                pass


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
