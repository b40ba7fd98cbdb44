"""`make install` (scripts/install_venv.py) hands pip's configuration to uv: pip's own
`pip config list` is read, and uv itself resolves against what the translation gives it
(local file indexes in place of PyPI, find-links folders and a constraint file: nothing
leaves the machine)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("install_venv", ROOT / "scripts/install_venv.py")
install_venv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_venv)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    env.update(extra)
    return env


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (metadata only) as the wheel format lays it out."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def _index(root: Path, wheels: list[Path]) -> str:
    """A PEP 503 simple index of ``wheels`` under ``root``; returns its file:// URL."""
    for whl in wheels:
        page = root / whl.name.split("-")[0].replace("_", "-") / "index.html"  # PEP 503 name
        page.parent.mkdir(parents=True, exist_ok=True)
        with page.open("a") as f:
            f.write(f'<a href="{whl.resolve().as_uri()}">{whl.name}</a>\n')
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve().as_uri()


def test_pip_settings_in_pips_order_reach_uv_variables(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///a/simple file:///b/simple\n"
                    "constraint = /c/constraints.txt\nfind-links = /overridden\n"
                    "[install]\nindex-url = https://mirror.example/simple\n")
    env = _clean_env(PIP_CONFIG_FILE=str(conf), PIP_FIND_LINKS="/w1 /w2")
    settings = install_venv.pip_settings(sys.executable, env)
    assert settings["find-links"] == "/w1 /w2"  # PIP_* over the files, as pip reads them
    uv = install_venv.uv_environment(settings, {"UV_CONSTRAINT": "/mine.txt"})
    assert uv["UV_EXTRA_INDEX_URL"] == "file:///a/simple file:///b/simple"
    assert uv["UV_FIND_LINKS"] == "/w1,/w2"
    assert uv["UV_INDEX_URL"] == "https://mirror.example/simple"
    assert uv["UV_CONSTRAINT"] == "/mine.txt"  # a variable the user set wins


def test_uv_resolves_from_every_place_pip_is_configured_with(tmp_path):
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        pytest.skip("uv not in this environment (the project was installed with pip)")
    files = tmp_path / "files"
    # one package in each place pip knows of; pkg_a twice, capped by the constraint file
    indexes = [_index(tmp_path / f"idx{i}", [_wheel(files / str(i), f"pkg_{c}", v)
                                             for c, v in pkgs])
               for i, pkgs in enumerate([[("a", "0.5"), ("a", "1.0")], [("b", "1.0")],
                                         [("c", "1.0")]])]
    links = [_wheel(tmp_path / f"links{i}", f"pkg_{c}", "1.0").parent for i, c in
             enumerate("de")]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("pkg_a<1\n")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = {indexes[0]}\n"
                    f"extra-index-url = {indexes[1]} {indexes[2]}\n"
                    f"find-links = {links[0]} {links[1]}\nconstraint = {constraints}\n")
    settings = install_venv.pip_settings(sys.executable, _clean_env(PIP_CONFIG_FILE=str(conf)))
    env = install_venv.uv_environment(settings, _clean_env(
        UV_CACHE_DIR=str(tmp_path / "cache")))
    target = tmp_path / "venv"
    subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(target)],
                   env=env, check=True)
    out = subprocess.run([str(uv), "pip", "install", "--dry-run", "--python",
                          str(target / "bin/python"), "--index-strategy", "unsafe-best-match",
                          *[f"pkg_{c}" for c in "abcde"]],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for want in ("pkg-a==0.5", "pkg-b==1.0", "pkg-c==1.0", "pkg-d==1.0", "pkg-e==1.0"):
        assert want in out.stderr, out.stderr


def test_the_compiled_packages_are_the_ones_setuptools_installs():
    """The install byte-compiles the project's own packages (an editable install runs them
    from their sources): the top-level packages setuptools finds with pyproject's rule."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]
    found = {p.split(".")[0] for p in find_packages(where=str(ROOT), include=find["include"])}
    assert install_venv.project_packages(ROOT / "pyproject.toml") == sorted(found)
    assert {"recon", "flows", "preprocessing", "infra"} <= found
