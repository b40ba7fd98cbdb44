"""Install wildface (editable, with the given extras) into a virtual environment, fast.

``make install`` runs this with the venv's own Python. It installs uv (pinned, through pip,
so from wherever pip installs) and lets uv install the project: uv unpacks the ~5 GB of
wheels and byte-compiles them in parallel (about 1 minute on 2 cores, against 2.5 for pip).
uv does not read pip's configuration, so pip's index, extra indexes, find-links, constraint
file and certificate bundle (files and ``PIP_*`` variables, as ``pip config list`` shows
them) are handed to uv; every index counts equally, as it does for pip. When uv cannot be
installed or fails, pip installs the project as before. Then the project's own packages are
byte-compiled (an editable install leaves them as sources).

Usage: python scripts/install_venv.py [EXTRAS]   (e.g. ``test``; run from the project root)
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

UV = "uv==0.13.10"
# pip setting -> (uv environment variable, separator uv expects between several values)
PIP_TO_UV = {
    "index-url": ("UV_INDEX_URL", None),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
    "find-links": ("UV_FIND_LINKS", ","),
    "constraint": ("UV_CONSTRAINT", " "),
    "cert": ("SSL_CERT_FILE", None),
}


def pip_settings(python: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """pip's effective settings (``name -> value``) in environment ``env``: the ``global``
    section, then ``install``, then ``PIP_*`` variables, each overriding the one before, as
    pip does."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True,
                         text=True, check=False, env=env).stdout
    ranked: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, ":env:": 2}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in rank:
            continue
        value = value.strip().strip("'\"")
        if name not in ranked or rank[section] >= ranked[name][0]:
            ranked[name] = (rank[section], value)
    return {name: value for name, (_, value) in ranked.items()}


def uv_environment(settings: dict[str, str], base: dict[str, str]) -> dict[str, str]:
    """``base`` plus the UV_* variables (and certificate bundle) carrying pip's settings."""
    env = dict(base)
    for name, (var, sep) in PIP_TO_UV.items():
        if name in settings and var not in base:
            values = shlex.split(settings[name])
            env[var] = sep.join(values) if sep else values[0]
    return env


def project_packages(pyproject: Path = Path("pyproject.toml")) -> list[str]:
    """The project's top-level packages, as ``[tool.setuptools.packages.find]`` includes
    them (``recon*`` -> ``recon``)."""
    find = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"]["find"]
    return sorted({pattern.split("*")[0].split(".")[0] for pattern in find["include"]})


def install(python: str, target: str) -> int:
    """Install ``target`` (editable) into ``python``'s environment: through uv, else pip.
    Returns the exit code."""
    pip = [python, "-m", "pip", "install", "-q"]
    if subprocess.run([*pip, UV], check=False).returncode == 0:
        env = uv_environment(pip_settings(python), dict(os.environ))
        uv = [str(Path(python).parent / "uv"), "pip", "install", "-q", "--python", python,
              "--compile-bytecode", "--index-strategy", "unsafe-best-match", "-e", target]
        if subprocess.run(uv, env=env, check=False).returncode == 0:
            return 0
        print("install_venv: uv failed; installing with pip instead", file=sys.stderr)
    else:
        print("install_venv: uv could not be installed; installing with pip", file=sys.stderr)
    return subprocess.run([*pip, "-e", target], check=False).returncode


def main(extras: str) -> int:
    python = sys.executable
    code = install(python, f".[{extras}]" if extras else ".")
    if code == 0:
        # The editable install runs the project from its source folders, which neither
        # installer byte-compiles: with PYTHONDONTWRITEBYTECODE set, every process (each Ray
        # worker, each command) would compile them again (~0.3 CPU s a process).
        code = subprocess.run([python, "-m", "compileall", "-q", "-j", "0",
                               *project_packages()], check=False).returncode
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
