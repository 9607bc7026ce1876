"""Running a sequence's tokens through a decoder on one cache: prefill chunking, the prompt
cache's row records, and handing passes to a batcher when the sequence shares its steps."""

from __future__ import annotations

from typing import Any

import torch

from .attention import kernel_query_limit, kernel_runs
from .batcher import ForwardBatcher
from .cache import FullCache, StreamingCache
from .model import Decoder, KVCache, Segment
from .native import MAX_KERNEL_QUERIES


class Runner:
    """A decoder, how it cuts long inputs, and the batcher (if any) its passes go through."""

    def __init__(self, decoder: Decoder, prefill_chunk: int = 1024, batcher: ForwardBatcher | None = None) -> None:
        self.decoder = decoder
        self.prefill_chunk = prefill_chunk
        self.batcher = batcher

    def run(self, cache: KVCache, tokens: list[int], scored: int, progress: str | None = None,
            features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run `tokens` after what `cache` holds, in as many passes as it takes; logits
        [scored, V] of the last `scored` positions (they always share one pass). `progress`
        names a progress bar shown for long inputs. features: if a list, each pass appends the
        final hidden states of its tokens [T, hidden] (tokens a streaming cache skips have none)."""
        pieces = split_for_cache(tokens, scored, self.prefill_chunk, cache)
        bar = None
        if progress and len(pieces) > 2:
            from tqdm import tqdm

            bar = tqdm(total=len(tokens), desc=f"prefill ({progress})", unit="tok", leave=False)
        logits = None
        for kind, piece in pieces:
            if kind == "skip":
                assert isinstance(cache, StreamingCache)
                cache.skip(piece)  # the middle of a long prompt
                continue
            start = cache.length if isinstance(cache, FullCache) else 0
            out = self._pass(cache, piece, min(scored, len(piece)) if kind == "last" else 0, features)
            if kind == "last":
                logits = out
            if isinstance(cache, FullCache):
                self._note_rows(cache, start, start + len(piece), kernel_runs(cache.buffer_like, len(piece)))
            if bar is not None:
                bar.update(len(piece))
        if bar is not None:
            bar.close()
        assert logits is not None
        return logits

    def _pass(self, cache: KVCache, tokens: list[int], scored: int,
              features: list[torch.Tensor] | None = None) -> torch.Tensor:
        segment = Segment(torch.tensor(tokens, dtype=torch.long, device=self.decoder.device), cache, scored,
                          want_features=features is not None)
        if self.batcher is not None:
            logits = self.batcher.submit(self.decoder, segment)
        else:
            logits = self.decoder.forward([segment])[0]
        if features is not None:
            assert segment.features is not None
            features.append(segment.features)
        return logits

    # -- prompt caching ------------------------------------------------------------------------
    def _note_rows(self, full: FullCache, start: int, end: int, kernel: bool) -> None:
        """Rows [start, end) of `full` were just computed in one pass."""
        chunk = self.prefill_chunk
        if full.aligned_chunk != chunk:
            full.aligned_chunk, full.aligned_rows = chunk, 0
        if start == full.aligned_rows and start % chunk == 0 and end - start == chunk:
            full.aligned_rows = end
        if not kernel:
            full.kernel_from = end

    def reusable(self, full: FullCache, common: int, prompt_len: int) -> int:
        """How many of the `common` leading rows `full` shares with a new prompt hold exactly
        what a fresh prefill of that prompt would compute. A fresh prefill runs whole chunks
        [k C, (k+1) C) and then a final piece [base, prompt_len): rows of the same whole chunks
        match, and when the final piece is short enough for the attention kernel, rows the kernel
        computed (decoded tokens, or an earlier short final piece) match too. When the kernel
        takes passes of any length, a fresh prefill runs every row through it, and a kernel row
        does not depend on how the tokens were split into passes: every row it wrote matches.
        Without the kernel (another device, an older CPU) short passes run through SDPA too,
        whose rows depend on how many tokens share the pass: then only whole chunks match."""
        chunk = self.prefill_chunk
        kernel_max = kernel_query_limit(full.buffer_like)
        if kernel_max >= prompt_len and full.kernel_from == 0:
            return common
        aligned = full.aligned_rows if full.aligned_chunk == chunk else 0
        base = (prompt_len - 1) // chunk * chunk if prompt_len else 0
        if prompt_len - base <= kernel_max and aligned >= base and full.kernel_from <= base:
            return common
        return min(common, aligned, base)


def split_for_cache(tokens: list[int], scored: int, chunk: int, cache: Any) -> list[tuple[str, Any]]:
    """Pieces of a run: ("fill", tokens), ("skip", count), ("last", tokens).

    Long inputs (prefill) run in chunks so activations stay bounded. A StreamingLLM cache keeps
    only its sink and window, so of a long prompt it runs the start (the sink) and the last
    window tokens; the rest it would evict unread.

    A FullCache's long inputs are cut at multiples of `chunk` counted from the cache's first
    row: a row's keys and values then depend only on the tokens, never on where an earlier
    prompt happened to end, which keeps prompt caching exact.
    """
    pieces: list[tuple[str, Any]] = []
    if isinstance(cache, StreamingCache):
        room = cache.window
        chunk = min(chunk, cache.window + cache.slack)
        if len(tokens) > room + cache.sink:
            head_needed = max(0, cache.sink - cache.slots) if cache.slots <= cache.sink else 0
            head, tail = tokens[:head_needed], tokens[-room:]
            if head:
                pieces.append(("fill", head))
            pieces.append(("skip", len(tokens) - len(head) - len(tail)))
            tokens = tail
    elif len(tokens) > MAX_KERNEL_QUERIES:
        start = cache.length if isinstance(cache, FullCache) else 0
        cuts = [start] + list(range((start // chunk + 1) * chunk, start + len(tokens), chunk)) + [start + len(tokens)]
        pieces = [("fill", tokens[a - start : b - start]) for a, b in zip(cuts, cuts[1:])]
        while len(pieces) > 1 and len(pieces[-1][1]) < scored:  # the scored rows stay in one pass
            pieces[-2:] = [("fill", pieces[-2][1] + pieces[-1][1])]
        pieces[-1] = ("last", pieces[-1][1])
        return pieces
    last_len = max(scored, min(chunk, len(tokens)))
    body, last = tokens[: len(tokens) - last_len], tokens[len(tokens) - last_len :]
    for i in range(0, len(body), chunk):
        pieces.append(("fill", body[i : i + chunk]))
    pieces.append(("last", last))
    return pieces
