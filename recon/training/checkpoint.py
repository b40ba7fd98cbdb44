"""Training checkpoints: one ``torch.save`` file per save, written atomically, loadable with
``torch.load(..., weights_only=True)`` (plain types and tensors only: the config travels as a
JSON string, RNG states as tensors / tuples of ints).

Contents (``FORMAT_VERSION`` 1): ``format``, ``stage`` ("coarse" | "detail"), ``step`` (optimiser
steps done), ``skipped`` (steps skipped for a non-finite loss), ``model`` (the DECA state dict:
networks only, plus the face-model identity), ``optimizer``, ``scaler`` (AMP grad scaler or
None), ``config`` (the resolved config as JSON), ``face_model`` (its name: FLAME never travels in a
checkpoint), ``rng`` (torch CPU / CUDA and Python ``random`` states); the trainer adds
``step_state`` (the step object's counters and generator) and ``coarse_checkpoint`` (the path
a detail stage started from, or None).

Files: ``<dir>/<stage>-<step:09d>.pt``, saved when :func:`checkpoint_due`; the latest is the
highest step. Temporary files of an interrupted save (``.<name>.*.tmp``) are never mistaken
for checkpoints.

Numerical integrity: :func:`save_checkpoint` refuses (before writing anything) a payload
holding a non-finite floating-point value, and :func:`assert_finite_state` is the one check
that loaders and the model registry apply to a state dict (:class:`NonFiniteState`).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from recon.formats.files import atomic_writer

FORMAT_VERSION = 1
_NAME = re.compile(r"^(coarse|detail)-(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (wrong format, stage or face model)."""


class NonFiniteState(CheckpointError):
    """A state (weights, optimiser moments) holding ``inf`` or ``nan``: a diverged model."""


def _first_non_finite(value: Any, key: str) -> tuple[str, int] | None:
    """(dotted key, count of non-finite entries) of the first floating-point tensor or float
    in ``value`` (nested dicts, lists and tuples) that is not finite, else None."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                return key, bad
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, 1)
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = _first_non_finite(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def assert_finite_state(state: Any, what: str) -> None:
    """Raise :class:`NonFiniteState` when ``state`` (a state dict, a checkpoint payload, or
    any nesting of dicts / lists / tuples of tensors and floats) holds ``inf`` or ``nan``.
    ``what`` names it in the message (e.g. the checkpoint's path), with the first offending
    entry's key; integer tensors (RNG states, counters) are not numbers to check."""
    found = _first_non_finite(state, "")
    if found is not None:
        key, bad = found
        raise NonFiniteState(f"{what}: non-finite values (inf or nan) in {key or 'the value'} "
                             f"({bad} entries): a diverged model, refused")


def checkpoint_due(step: int, total: int, every: int) -> bool:
    """Whether a run of ``total`` steps saves a checkpoint after its ``step``-th step: every
    ``every`` steps and at the last one. The one rule: ranks that do not save report to
    Ray Train at exactly these steps."""
    return step % every == 0 or step == total


def checkpoint_path(directory: str | os.PathLike, stage: str, step: int) -> Path:
    return Path(directory) / f"{stage}-{step:09d}.pt"


def list_checkpoints(directory: str | os.PathLike, stage: str) -> list[tuple[int, Path]]:
    """``(step, path)`` of the finished checkpoints of ``stage`` in ``directory``, by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and m.group(1) == stage:
            found.append((int(m.group(2)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike, stage: str) -> Path | None:
    """The checkpoint of ``stage`` with the highest step, or None."""
    found = list_checkpoints(directory, stage)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    *,
    stage: str,
    step: int,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    config_json: str,
    face_model: str,
    skipped: int = 0,
    scaler: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file in the same folder, fsync, then rename).
    ``extra``: more top-level entries (plain types and tensors), e.g. the step object's state.
    Raises :class:`NonFiniteState`, writing nothing, when any of it holds ``inf`` or ``nan``."""
    path = Path(path)
    payload = {
        "format": FORMAT_VERSION, "stage": stage, "step": int(step), "skipped": int(skipped),
        "model": model, "optimizer": optimizer, "scaler": scaler, "config": config_json,
        "face_model": face_model, "rng": rng_state(),
    }
    clash = set(extra or {}) & set(payload)
    if clash:
        raise ValueError(f"extra entries clash with the checkpoint's own: {sorted(clash)}")
    payload.update(extra or {})
    assert_finite_state(payload, f"checkpoint {path}")
    # fsync: a resumed run must find a complete file even after a machine crash.
    with atomic_writer(path, fsync=True) as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    stage: str | None = None) -> dict[str, Any]:
    """Read a checkpoint (``weights_only=True``); check its format and, if given, its stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise CheckpointError(f"{path}: not a readable wildface checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a wildface checkpoint of format {FORMAT_VERSION}")
    if stage is not None and ckpt["stage"] != stage:
        raise CheckpointError(f"{path}: a {ckpt['stage']} checkpoint, expected {stage}")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The resolved config stored in a checkpoint, as a plain dict."""
    return json.loads(ckpt["config"])


def prune_checkpoints(directory: str | os.PathLike, stage: str, keep: int) -> None:
    """Delete all but the ``keep`` latest checkpoints of ``stage``."""
    for _, path in list_checkpoints(directory, stage)[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
