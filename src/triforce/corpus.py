"""Real text: long documents for benchmarks and training text for drafts, from Debian packages
installed by scripts/setup-corpus.sh (never one sentence repeated: repetition makes drafting
trivially easy and speed figures lie).

Named sources:
- "vim": the Vim user manual (usr_01 .. usr_90), Vim license; ~181K tokens for SmolLM2's
  tokenizer; package vim-runtime. The benchmark document; kept out of draft training.
- "jargon": the Jargon File 4.4, public domain, ~407K tokens; package jargon-text.
- "python-docs": the Python 3.11 documentation sources (reStructuredText), PSF license,
  ~2.8M tokens; package python3.11-doc. Draft training text.

Named prompt sources (chat prompts a draft head is trained on, answered by its target):
- "python-faq": the 174 questions of the Python FAQ (its section titles that ask something), from
  the same package.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import TriforceError

SETUP_HINT = "run scripts/setup-corpus.sh (apt-get install vim-runtime jargon-text python3.11-doc)"


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def _vim() -> list[str]:
    root = os.environ.get("TRIFORCE_VIM_DOC") or "/usr/share/vim/vim*/doc"
    files = sorted(glob.glob(os.path.join(root, "usr_[0-9]*.txt")))
    if not files:
        raise TriforceError(f"the Vim user manual is not installed; {SETUP_HINT}")
    return ["".join(_read(f) for f in files)]  # one continuous document


def _jargon() -> list[str]:
    path = os.environ.get("TRIFORCE_JARGON") or "/usr/share/doc/jargon-text/jargon.txt.gz"
    if not os.path.exists(path):
        raise TriforceError(f"the Jargon File is not installed; {SETUP_HINT}")
    text = _read(path)
    start = text.find("The Jargon Lexicon")
    return [text[start if start > 0 else 0 :]]


def _python_doc_files(pattern: str) -> list[str]:
    root = os.environ.get("TRIFORCE_PYTHON_DOCS") or "/usr/share/doc/python3*/html/_sources"
    # Debian links the other python3.11* doc directories to this one: each file once, by its real path
    files = sorted({os.path.realpath(f) for f in glob.glob(os.path.join(root, pattern), recursive=True)})
    if not files:
        raise TriforceError(f"the Python documentation is not installed; {SETUP_HINT}")
    return files


def _python_docs() -> list[str]:
    return [_read(f) for f in _python_doc_files(os.path.join("**", "*.rst.txt"))]


def _python_faq() -> list[str]:
    """Section titles that end in '?' (a reStructuredText title is underlined at least its length)."""
    questions = []
    for f in _python_doc_files(os.path.join("faq", "*.rst.txt")):
        lines = [line.rstrip() for line in _read(f).splitlines()]
        for title, under in zip(lines, lines[1:]):
            if (title.endswith("?") and len(under) >= len(title.strip()) > 0 and len(set(under)) == 1
                    and under[0] in "=-~^\"*"):
                questions.append(title.strip())
    return list(dict.fromkeys(questions))  # once each


SOURCES: dict[str, Callable[[], list[str]]] = {"vim": _vim, "jargon": _jargon, "python-docs": _python_docs}
PROMPT_SOURCES: dict[str, Callable[[], list[str]]] = {"python-faq": _python_faq}


def documents(spec: str) -> list[str]:
    """The documents of a named source, a text file (.txt, .gz, ...) or a directory of them."""
    if spec in SOURCES:
        return SOURCES[spec]()
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".rst", ".gz"))
        if not files:
            raise TriforceError(f"no .txt/.md/.rst files under {spec}")
        return [_read(str(f)) for f in files]
    if path.is_file():
        return [_read(str(path))]
    raise TriforceError(f"corpus {spec!r} is neither a named source ({', '.join(SOURCES)}) nor a file or directory")


def prompts(spec: str) -> list[str]:
    """The prompts of a named prompt source, or of a text file (one per non-empty line)."""
    if spec in PROMPT_SOURCES:
        return PROMPT_SOURCES[spec]()
    path = Path(spec)
    if not path.is_file():
        raise TriforceError(f"prompts {spec!r} are neither a named source ({', '.join(PROMPT_SOURCES)}) nor a file")
    found = [line.strip() for line in _read(str(path)).splitlines() if line.strip()]
    if not found:
        raise TriforceError(f"prompts {spec!r}: the file holds no prompt")
    return found


def load_document(name: str) -> str:
    return "".join(documents(name))


def iter_documents(specs: list[str]) -> Iterator[tuple[str, str]]:
    for spec in specs:
        for text in documents(spec):
            yield spec, text


def document_tokens(tokenizer, name: str, num_tokens: int, offset: int = 0) -> list[int]:  # noqa: ANN001
    """The first `num_tokens` tokens of a document (after skipping `offset` tokens)."""
    ids = tokenizer.encode(load_document(name), add_special_tokens=False)
    if offset + num_tokens > len(ids):
        raise TriforceError(f"document {name!r} has {len(ids)} tokens; {offset + num_tokens} requested")
    return ids[offset : offset + num_tokens]
