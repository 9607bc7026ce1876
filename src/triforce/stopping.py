"""When a generation ends (EOS, a stop string, max_new_tokens), and which text is safe to release."""

from __future__ import annotations

from typing import Any


class StopChecker:
    """Ends generation at EOS, a stop string, or max_new_tokens, and releases text that can no
    longer become part of a stop string."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], stop: list[str], max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stop = [s for s in stop if s]
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.released = 0
        self.finish_reason: str | None = None

    def add(self, new_tokens: list[int]) -> str:
        """Accept tokens from one step; return newly releasable text."""
        for token in new_tokens:
            if self.finish_reason:
                break
            self.tokens.append(token)
            if token in self.eos_ids:
                self.finish_reason = "eos"
            elif len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
        self.text = self.tokenizer.decode(self.tokens)
        if self.stop:
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
        safe = len(self.text)
        if not self.finish_reason:
            if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
                safe = len(self.text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        piece = self.text[self.released : safe] if safe > self.released else ""
        self.released = max(self.released, safe)
        return piece
