"""Checks on a pretrained network's weights file before it is loaded: present, and when an
expected sha256 (and size) is known, exactly that file.

The one implementation of the check: the networks' factories (``recon.identity.build``,
``recon.perceptual``) use it on the file they are given, and the model store
(``infra.model_store``) on its entries against the manifest.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


class ChecksumMismatchError(RuntimeError):
    """A weights file whose sha256 (or size) differs from the expected one."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, sha256: str, label: str | None = None,
                size: int | None = None) -> None:
    """Raise :class:`ChecksumMismatchError` unless ``path`` has this sha256 (and size)."""
    label = label or str(path)
    # The size first: a truncated file is refused without hashing all of it.
    if size is not None and os.path.getsize(path) != size:
        raise ChecksumMismatchError(
            f"{label}: size {os.path.getsize(path)} bytes differs from the recorded {size}; "
            "the file is truncated, corrupt or was replaced. Refusing to load it.")
    actual = sha256_file(path)
    if actual != sha256:
        raise ChecksumMismatchError(
            f"{label}: sha256 {actual} does not match the recorded {sha256}; the file is "
            "corrupt or was replaced. Refusing to load it.")


def checked_weights_file(path: str | os.PathLike, sha256: str | None, label: str) -> Path:
    """``path`` (``~`` expanded) after checking it exists and, if ``sha256`` is given, that
    it is that file. ``label`` names the setting in errors (e.g. ``identity.weights``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{label}: file not found: {path}")
    if sha256:
        verify_file(path, sha256, label=f"{label} ({path})")
    return path
