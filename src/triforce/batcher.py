"""Gathering several sequences' forward passes into one, so a step reads the weights once for all.

Each sequence of a batch runs its own generation in a thread of its own (`add`). Where that
generation would run a decoder pass, its runner hands the segment to the batcher (`submit`) and
waits. Once every live sequence is waiting, the stepping thread (`step`) runs all segments that
use the same decoder as one `Decoder.forward` and wakes them. So sequences accept different
numbers of draft tokens, keep their own cache lengths, retrieval selections and StreamingLLM
windows, and leave the batch when done; a long prompt's prefill runs chunk by chunk between the
others' decoding steps.

Threads only coordinate: the tensor work of a step happens in the stepping thread, and the
per-sequence bookkeeping (sampling, acceptance) is short Python between steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import TriforceError
from .model import Decoder, Segment


@dataclass
class _Pass:
    decoder: Decoder
    segment: Segment
    key: int | None = None  # the sequence's name in a tensor-parallel group's step log
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class ForwardBatcher:
    """Runs sequence jobs in threads and their forward passes together (see the module doc)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._pending: list[_Pass] = []
        self._live = 0
        self._members: set[threading.Thread] = set()
        self.threads = torch.get_num_threads()  # the stepping thread's: its kernels use them all
        self._keys: dict[threading.Thread, int | None] = {}
        # Under tensor parallelism (parallel.StepLog): rank 0 sends each step's order and what its
        # sequences decided; the other ranks run the same passes in that order (run_order).
        self.step_log: Any = None
        self.passes = 0  # decoder passes run
        self.sequence_passes = 0  # sum over passes of the sequences in each

    @property
    def live(self) -> int:
        return self._live

    # -- the sequences' side -----------------------------------------------------------------
    def submit(self, decoder: Decoder, segment: Segment) -> torch.Tensor:
        """Run `segment` with the other sequences' passes of this step; its logits."""
        if threading.current_thread() not in self._members:  # nobody would ever run it
            raise RuntimeError("a pass was submitted from outside the batch: an engine built with a "
                               "ForwardBatcher generates inside ForwardBatcher.add (see batch.run_batch)")
        work = _Pass(decoder, segment, self._keys.get(threading.current_thread()))
        with self._cv:
            self._pending.append(work)
            # only the last to arrive wakes the stepping thread (a rank past 0 waits for given passes)
            if len(self._pending) >= self._live or self.step_log is not None:
                self._cv.notify_all()
        # Each sequence waits on its own event: a shared condition woke every waiting sequence at
        # every submission and every step (4 sequences: ~20 wake-ups, each taking the GIL, per step).
        work.done.wait()
        if work.error is not None:
            raise work.error
        assert work.result is not None
        return work.result

    def add(self, job: Callable[[], Any], on_exit: Callable[[], None] | None = None,
            key: int | None = None) -> threading.Thread:
        """Start `job` (a whole generation whose runners submit to this batcher) as a member;
        `key` names its passes to a step log (its engine's id)."""

        def member() -> None:
            # A sequence thread only samples and keeps books between passes; with PyTorch's
            # default it would start an OpenMP team of its own per thread, whose spinning workers
            # fight the batcher's kernels for the cores (a batch of one ran 1.6x slower than alone).
            torch.set_num_threads(1)
            try:
                job()
            finally:
                torch.set_num_threads(self.threads)  # the process-wide default new threads inherit
                if on_exit is not None:
                    on_exit()
                if self.step_log is not None:  # what it logged last reaches the other ranks now
                    try:
                        self.step_log.send([])
                    except TriforceError:  # a failed group: the passes of the others report it
                        pass
                with self._cv:
                    self._live -= 1
                    self._members.discard(threading.current_thread())
                    self._keys.pop(threading.current_thread(), None)
                    self._cv.notify_all()

        thread = threading.Thread(target=member, daemon=True, name="triforce-sequence")
        with self._cv:
            self._live += 1
            self._members.add(thread)
            self._keys[thread] = key
        thread.start()
        return thread

    # -- the stepping side ---------------------------------------------------------------------
    def step(self, timeout: float | None = None) -> bool:
        """Wait until every live sequence waits on a pass, then run them; False if nothing ran
        (no live sequences, or the timeout passed)."""
        with self._cv:
            ready = self._cv.wait_for(lambda: self._live > 0 and len(self._pending) >= self._live, timeout)
            if not ready:
                return False
            work, self._pending = self._pending, []
        if self.step_log is not None:
            self.step_log.send([item.key for item in work])
        self._run(work)
        return True

    def run_order(self, keys: list[int]) -> None:
        """On a tensor-parallel rank past 0: wait for the passes of sequences `keys`, then run them
        in that order (rank 0's order for the same step)."""
        wanted = set(keys)
        with self._cv:
            self._cv.wait_for(lambda: {item.key for item in self._pending} >= wanted)
            by_key = {item.key: item for item in self._pending}
            work = [by_key[key] for key in keys]
            self._pending = [item for item in self._pending if item.key not in wanted]
        self._run(work)

    def _run(self, work: list[_Pass]) -> None:
        groups: dict[int, list[_Pass]] = {}
        for item in work:
            groups.setdefault(id(item.decoder), []).append(item)
        for items in groups.values():
            try:
                results = items[0].decoder.forward([it.segment for it in items])
                for it, result in zip(items, results):
                    it.result = result
            except BaseException as exc:  # noqa: BLE001 - handed to the sequences that asked
                for it in items:
                    it.error = exc
            self.passes += 1
            self.sequence_passes += len(items)
        for item in work:
            item.done.set()

    def run_until_done(self) -> None:
        """Step until every sequence has finished."""
        while True:
            with self._cv:
                if self._live == 0:
                    return
            self.step(timeout=0.05)
