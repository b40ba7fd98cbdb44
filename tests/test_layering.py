"""Dependencies point one way (docs/contributing.md): ``recon`` imports none of the packages
above it nor the orchestration libraries, ``preprocessing`` no flows or Prefect. Every import
counts, also the lazy ones inside functions, so the check reads the source with ``ast``
instead of importing it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "recon": {"flows", "infra", "preprocessing", "prefect", "ray", "mlflow"},
    "preprocessing": {"flows", "prefect"},
}


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
