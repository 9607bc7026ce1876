"""corpus.py: named sources read each document once."""

from __future__ import annotations

import pytest

from triforce.corpus import documents, prompts
from triforce.errors import TriforceError


def test_python_docs_linked_from_several_packages_are_read_once(tmp_path, monkeypatch):
    """Debian links python3.11-doc's (and -dev's, -venv's) html directory to python3.11's; a glob
    over python3* reaches every file through each link. Read four times, the training text would be
    repeated and a benchmark document built from it would repeat itself."""
    sources = tmp_path / "python3.11" / "html" / "_sources"
    (sources / "faq").mkdir(parents=True)
    (sources / "faq" / "general.rst.txt").write_text("Why is Python called Python?\n")
    (sources / "tutorial.rst.txt").write_text("An informal introduction.\n")
    for linked in ("python3.11-doc", "python3.11-venv"):
        (tmp_path / linked).mkdir()
        (tmp_path / linked / "html").symlink_to("../python3.11/html")
    monkeypatch.setenv("TRIFORCE_PYTHON_DOCS", str(tmp_path / "python3*" / "html" / "_sources"))
    assert documents("python-docs") == ["Why is Python called Python?\n", "An informal introduction.\n"]


def test_a_missing_source_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TRIFORCE_PYTHON_DOCS", str(tmp_path / "none"))
    with pytest.raises(TriforceError, match="python3.11-doc"):
        documents("python-docs")


def test_the_python_faq_gives_its_questions_as_prompts(tmp_path, monkeypatch):
    """A question is a section title ending in '?' (underlined at least its length), each once."""
    faq = tmp_path / "_sources" / "faq"
    faq.mkdir(parents=True)
    (faq / "general.rst.txt").write_text(
        "General Python FAQ\n==================\n\nWhat is Python?\n---------------\n\nA language.\n\n"
        "Is it good? Read on.\n\nWhy is it called Python?\n~~~~~~~~~~~~~~~~~~~~~~~~\n\nShort?\n---\n")
    (faq / "library.rst.txt").write_text("What is Python?\n===============\n")
    monkeypatch.setenv("TRIFORCE_PYTHON_DOCS", str(tmp_path / "_sources"))
    assert prompts("python-faq") == ["What is Python?", "Why is it called Python?"]


def test_a_prompts_file_gives_one_prompt_per_line_and_must_hold_one(tmp_path):
    (tmp_path / "p.txt").write_text("  Explain hash tables.\n\nWrite a haiku.\n")
    assert prompts(str(tmp_path / "p.txt")) == ["Explain hash tables.", "Write a haiku."]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TriforceError, match="holds no prompt"):
        prompts(str(tmp_path / "empty.txt"))
