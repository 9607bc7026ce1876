"""Real long documents for benchmarks, installed from Debian packages by scripts/setup-corpus.sh.

- "vim": the Vim user manual (usr_01 .. usr_90), Vim license (free redistribution), ~181K tokens
  for SmolLM2's tokenizer; from package vim-runtime.
- "jargon": the Jargon File 4.4, public domain, ~407K tokens; from package jargon-text.

Never one sentence repeated: repetition makes drafting trivially easy and speed figures lie.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Callable

from ..errors import TriforceError

SETUP_HINT = "run scripts/setup-corpus.sh (apt-get install vim-runtime jargon-text)"


def _vim() -> str:
    root = os.environ.get("TRIFORCE_VIM_DOC") or "/usr/share/vim/vim*/doc"
    files = sorted(glob.glob(os.path.join(root, "usr_[0-9]*.txt")))
    if not files:
        raise TriforceError(f"the Vim user manual is not installed; {SETUP_HINT}")
    return "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


def _jargon() -> str:
    path = os.environ.get("TRIFORCE_JARGON") or "/usr/share/doc/jargon-text/jargon.txt.gz"
    if not os.path.exists(path):
        raise TriforceError(f"the Jargon File is not installed; {SETUP_HINT}")
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("The Jargon Lexicon")
    return text[start if start > 0 else 0 :]


DOCUMENTS: dict[str, Callable[[], str]] = {"vim": _vim, "jargon": _jargon}


def load_document(name: str) -> str:
    if name not in DOCUMENTS:
        raise TriforceError(f"unknown document {name!r}; available: {', '.join(DOCUMENTS)}")
    return DOCUMENTS[name]()


def document_tokens(tokenizer, name: str, num_tokens: int, offset: int = 0) -> list[int]:  # noqa: ANN001
    """The first `num_tokens` tokens of a document (after skipping `offset` tokens)."""
    ids = tokenizer.encode(load_document(name), add_special_tokens=False)
    if offset + num_tokens > len(ids):
        raise TriforceError(f"document {name!r} has {len(ids)} tokens; {offset + num_tokens} requested")
    return ids[offset : offset + num_tokens]
