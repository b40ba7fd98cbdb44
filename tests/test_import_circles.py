"""No import circles among the modules of ``preprocessing`` and ``recon.identity``: a module
never imports (directly or through others) a module that imports it. Lazy imports inside
functions count like module-level ones, so the graph is read from the source with ``ast``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(sources: dict[str, str], packages: set[str]) -> dict[str, set[str]]:
    """{module: the modules of ``sources`` it imports anywhere}. sources: {dotted name: its
    source}; names in ``packages`` are packages (``__init__``), for relative imports.
    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, source in sources.items():
        here = module.split(".") if module in packages else module.split(".")[:-1]
        for node in ast.walk(ast.parse(source, module)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in sources:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (each holds a circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_finds_circles_through_lazy_and_relative_imports():
    sources = {
        "p": "",
        "p.base": "import numpy\ndef make():\n    from p.sub import Sub\n",
        "p.sub": "from .base import make\n",
        "p.leaf": "from p import base\nimport p.sub\n",
    }
    graph = import_graph(sources, {"p"})
    assert graph["p.leaf"] == {"p", "p.base", "p.sub"}
    assert circles(graph) == [["p.base", "p.sub"]]
    sources["p.base"] = "import numpy\n"
    assert circles(import_graph(sources, {"p"})) == []


@pytest.mark.parametrize("package", ["preprocessing", "recon/identity"])
def test_no_import_circles(package: str):
    paths = sorted((ROOT / package).rglob("*.py"))
    assert paths
    sources = {_module_name(p, ROOT): p.read_text() for p in paths}
    packages = {_module_name(p, ROOT) for p in paths if p.name == "__init__.py"}
    assert circles(import_graph(sources, packages)) == []
