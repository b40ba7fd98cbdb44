"""Dependencies point one way (docs/contributing.md): ``recon`` imports none of the packages
above it nor the orchestration libraries, ``infra`` neither ``preprocessing`` nor ``flows``
and the orchestration libraries only inside the functions that use them, ``preprocessing``
no flows or Prefect; and no module of the project reaches itself again through its imports
(an import circle). Every import counts, also the lazy ones inside functions and those under
``TYPE_CHECKING``, so the checks read the source with ``ast`` instead of importing it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "recon": {"flows", "infra", "preprocessing", "prefect", "ray", "mlflow"},
    "infra": {"flows", "preprocessing"},
    "preprocessing": {"flows", "prefect"},
}
# Imported by infra only where used: the storage and services helpers stay importable, and
# cheap to import, on a machine or in a process that runs none of them.
LAZY_ONLY = {"infra": {"prefect", "ray", "mlflow"}}
PROJECT = ("recon", "infra", "preprocessing", "flows")


def imported_packages(source: str, filename: str = "<source>") -> set[str]:
    """Top-level names of every absolute module imported anywhere in ``source`` (relative
    imports stay inside their own package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def module_level_packages(source: str, filename: str = "<source>") -> set[str]:
    """Top-level names imported when the module itself is imported: its own statements,
    those under ``if``/``try``/``with`` included, but not the bodies of functions or classes."""
    found: set[str] = set()
    todo = list(ast.parse(source, filename).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= imported_packages(ast.unparse(node))
            continue
        todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: (source, is_package)}`` -> ``{module: modules of the project it imports}``.
    ``from a.b import c`` points at ``a.b.c`` when that is a module, else at ``a.b``;
    relative imports are resolved against the importing module."""
    def known(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in sources.items():
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(source, module)):
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + [base] * bool(base))
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in sources
                               else known(base) for alias in node.names)
        graph[module] = {t for t in targets if t and t != module}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (strongly connected
    components of more than one module; Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    circles.append(sorted(group))
    return circles


def test_imported_packages_sees_lazy_and_nested_imports() -> None:
    source = (
        "import os, ray.train as rt\n"
        "from . import sibling\n"
        "def f():\n"
        "    from infra.model_store import ModelStore\n"
        "    class C:\n"
        "        def g(self):\n"
        "            import mlflow.tracking\n"
    )
    assert imported_packages(source) == {"os", "ray", "infra", "mlflow"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    offending = {}
    for path in files:
        bad = imported_packages(path.read_text(), str(path)) & FORBIDDEN[package]
        if bad:
            offending[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offending, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offending}"


def test_module_level_packages_skips_function_and_class_bodies() -> None:
    source = (
        "import os\n"
        "try:\n"
        "    import boto3\n"
        "except ImportError:\n"
        "    boto3 = None\n"
        "if True:\n"
        "    from ray import train\n"
        "def f():\n"
        "    import mlflow\n"
        "class C:\n"
        "    import prefect\n"
    )
    assert module_level_packages(source) == {"os", "boto3", "ray"}


@pytest.mark.parametrize("package", sorted(LAZY_ONLY))
def test_package_imports_orchestration_only_where_used(package: str) -> None:
    offending = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = module_level_packages(path.read_text(), str(path)) & LAZY_ONLY[package]
        if bad:
            offending[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offending, (f"{package}/ imports {sorted(LAZY_ONLY[package])} at module level "
                           f"(import them inside the functions that use them): {offending}")


def test_import_circles_are_found() -> None:
    sources = {
        "pkg": ("from pkg.b import thing\n", True),
        "pkg.a": ("def f():\n    from . import b\n", False),
        "pkg.b": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",
                  False),
        "pkg.c": ("import pkg.b\n", False),
    }
    graph = import_graph(sources)
    assert graph == {"pkg": {"pkg.b"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"},
                     "pkg.c": {"pkg.b"}}
    assert import_circles(graph) == [["pkg.a", "pkg.b"]]
    assert import_circles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


def test_no_import_circles() -> None:
    sources = {module_name(path): (path.read_text(), path.name == "__init__.py")
               for package in PROJECT for path in sorted((ROOT / package).rglob("*.py"))}
    circles = import_circles(import_graph(sources))
    assert not circles, ("modules that import each other, directly or around a loop (move "
                         f"what both need into a module of its own): {circles}")
