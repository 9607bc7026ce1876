"""The package's imports flow one way: faces -> engine -> levels/chain -> runner -> model ->
caches/attention -> kernels, with no cycle (imports inside functions and under TYPE_CHECKING
count too). Run alone: `python -m pytest tests/test_imports.py`."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import triforce

ROOT = Path(triforce.__file__).parent

# Each module's layer: a module may import only modules of lower layers. Faces (the CLI, the
# server, the benchmarks, distillation, the public API) share the top layer.
LAYERS = {
    "errors": 0, "formats": 0, "controller": 0,
    "config": 1, "corpus": 1, "sampling": 1, "settings": 1, "metrics": 1, "stopping": 1,
    "native": 2, "tokenizer": 2,
    "rope": 3, "attention": 3, "quant": 3,
    "cache": 4, "parallel": 4,
    "model": 5, "offload": 5,
    "head": 6, "batcher": 6,
    "loading": 7,
    "runner": 8,
    "levels": 9,
    "chain": 10,
    "engine": 11,
    "batch": 12, "tp_worker": 12,
}
FACE = 13


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)  # "" is the package itself


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that `path` imports anywhere in its text."""
    here = module_name(path).split(".") if module_name(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name.removeprefix("triforce.") for a in node.names if a.name.startswith("triforce.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and (node.module == "triforce" or node.module.startswith("triforce.")):
                base = []
                node.module = node.module.removeprefix("triforce").lstrip(".") or None
            else:
                continue
            stem = base + (node.module.split(".") if node.module else [])
            if node.module:  # `from .x import y` imports x (and y, when y is a module)
                names.append(".".join(stem))
            names += [".".join(stem + [a.name]) for a in node.names]
        found |= {n for n in names if n in modules}
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def layer(module: str) -> int:
    return LAYERS.get(module, FACE)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_imports_flow_down_the_layers():
    edges = graph()
    assert set(LAYERS) <= set(edges), f"modules named here no longer exist: {set(LAYERS) - set(edges)}"
    upward = [(a, b) for a, targets in edges.items() for b in targets if layer(a) < FACE and layer(b) >= layer(a)]
    assert not upward, f"imports that climb (module -> module it must not import): {upward}"


def test_every_module_says_its_job_in_its_first_sentence():
    for path in ROOT.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.split("\n")[0].strip(), f"{path.relative_to(ROOT)} has no opening docstring"


def test_the_checker_sees_imports_inside_functions_and_type_checking(tmp_path, monkeypatch):
    """The graph would catch a cycle hidden in a function body or under TYPE_CHECKING."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""p."""\n')
    (pkg / "a.py").write_text('"""a."""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n')
    (pkg / "b.py").write_text('"""b."""\ndef f():\n    from . import a\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    edges = graph()
    assert edges["a"] == {"b"} and edges["b"] == {"a"}
