"""DECA's released checkpoint (``deca_model.tar``) -> a wildface DECA model with its weights.

What DECA's file holds (its ``DECA.model_dict`` and trainer): a ``torch.save`` dict with the
state dicts ``E_flame`` (coarse ``ResnetEncoder``), ``E_detail`` (detail ``ResnetEncoder``) and
``D_detail`` (``Generator``); a checkpoint of DECA's own trainer also has ``opt`` (optimiser
state), ``global_step`` and ``batch_size``, which are training state and are left out. The file
is read with ``torch.load(weights_only=True)``: one that needs arbitrary unpickling is refused.

DECA's fixed choices (its ``decalib/utils/config.py`` and ``deca.py``): the coarse code is
shape 100 | tex 50 | exp 50 | pose 6 | cam 3 | light 27 (:data:`DECA_FACE_COUNTS` and
``recon.networks.CodeLayout``), the detail code 128, the detail generator's input is jaw pose
(pose[3:]) | exp | detail, ``max_z`` 0.01, crops 224 x 224 in [0, 1]. The model is built with
``model.architecture: deca`` (``recon.config.DECA_ARCHITECTURE_FIXED``), whose modules carry
DECA's key names, so each of DECA's tensors loads under its own name.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from recon.config import DECA_ARCHITECTURE_FIXED, FaceModelConfig, NetworkConfig
from recon.deca import DECA
from recon.face_model.face_assets import FaceModelAssets
from recon.networks import CodeLayout
from recon.formats.weights_file import sha256_file

log = logging.getLogger(__name__)

# DECA's state dicts -> the wildface module that holds the same network.
DECA_PARTS = {"E_flame": "coarse_encoder", "E_detail": "detail_encoder",
              "D_detail": "detail_decoder"}
# Component counts of DECA's code layout (its n_shape, n_tex, n_exp).
DECA_FACE_COUNTS = {"n_shape": 100, "n_tex": 50, "n_exp": 50}
# Buffers a file from an older torch may lack; they count BatchNorm updates and do not enter
# any output (momentum is set).
_OPTIONAL_SUFFIX = ".num_batches_tracked"


class DecaCheckpointError(ValueError):
    """A file that is not a usable DECA checkpoint (unreadable, refused, missing or misshapen
    tensors), or a face model that cannot hold DECA's codes."""


def read_deca_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """DECA's three network state dicts from ``deca_model.tar`` (``weights_only`` load).

    Returns {"E_flame": {...}, "E_detail": {...}, "D_detail": {...}} (name -> tensor); other
    top-level entries (optimiser state, step) are dropped with a logged note."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DECA checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise DecaCheckpointError(
            f"{path}: not readable as a weights-only torch file (refused or corrupt): {err}"
        ) from err
    if not isinstance(ckpt, dict):
        raise DecaCheckpointError(f"{path}: expected a dict of state dicts, got "
                                  f"{type(ckpt).__name__}")
    missing = [k for k in DECA_PARTS if k not in ckpt]
    if missing:
        raise DecaCheckpointError(f"{path}: not a DECA checkpoint: no {missing} (has "
                                  f"{sorted(map(str, ckpt))[:8]})")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name in DECA_PARTS:
        state = ckpt[name]
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise DecaCheckpointError(f"{path}: {name} is not a state dict of tensors")
        parts[name] = dict(state)
    dropped = sorted(str(k) for k in ckpt if k not in DECA_PARTS)
    if dropped:
        log.info("%s: left out %s (training state, not networks)", path, dropped)
    return parts


def _rows(state: dict[str, torch.Tensor], key: str, part: str) -> int:
    if key not in state or state[key].dim() != 2:
        raise DecaCheckpointError(f"{part}: no 2-d {key!r}; not DECA's network")
    return int(state[key].shape[0])


def deca_network_config(parts: dict[str, dict[str, torch.Tensor]]) -> NetworkConfig:
    """The ``model`` section that holds DECA's networks (architecture deca, detail code size
    read from ``E_detail``), after checking the code sizes against DECA's layout."""
    n_detail = _rows(parts["E_detail"], "layers.2.weight", "E_detail")
    layout = CodeLayout(**DECA_FACE_COUNTS)
    n_code = _rows(parts["E_flame"], "layers.2.weight", "E_flame")
    if n_code != layout.total:
        raise DecaCheckpointError(f"E_flame predicts {n_code} numbers; DECA's layout "
                                  f"{layout.sizes()} is {layout.total}")
    w = parts["D_detail"].get("l1.0.weight")
    n_cond = 3 + layout.n_exp + n_detail
    if w is None or w.dim() != 2 or w.shape[1] != n_cond:
        raise DecaCheckpointError(f"D_detail: l1.0.weight must take jaw 3 + exp "
                                  f"{layout.n_exp} + detail {n_detail} = {n_cond} inputs")
    return NetworkConfig(architecture="deca", n_detail=n_detail, **DECA_ARCHITECTURE_FIXED)


def load_deca_weights(model: DECA, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy DECA's state dicts into ``model`` (architecture deca), every tensor under its
    own name. A missing, unexpected or misshapen tensor in any part is a
    :class:`DecaCheckpointError`, raised before anything is copied."""
    if model.network_config.architecture != "deca":
        raise ValueError("DECA's weights need a model built with architecture 'deca'")
    for part, attr in DECA_PARTS.items():
        ours = getattr(model, attr).state_dict()
        state = parts[part]
        missing = sorted(k for k in ours if k not in state and not k.endswith(_OPTIONAL_SUFFIX))
        unexpected = sorted(k for k in state if k not in ours)
        misshapen = sorted(f"{k} {tuple(v.shape)} (expected {tuple(ours[k].shape)})"
                           for k, v in state.items() if k in ours and v.shape != ours[k].shape)
        if missing or unexpected or misshapen:
            raise DecaCheckpointError(
                f"{part} does not fit DECA's network: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, misshapen {misshapen[:5]}")
    for part, attr in DECA_PARTS.items():
        module = getattr(model, attr)
        module.load_state_dict({**module.state_dict(), **parts[part]})


def import_deca(path: str | os.PathLike, face_model: FaceModelConfig,
                assets: FaceModelAssets | None = None) -> DECA:
    """A DECA model (architecture deca, eval mode) holding the weights of DECA's checkpoint
    ``path``, on ``face_model`` (its counts are set to DECA's; ``assets``: its arrays, None
    = loaded from ``face_model``). The face model must have at least DECA's components."""
    parts = read_deca_checkpoint(path)
    network = deca_network_config(parts)
    face_model = face_model.model_copy(update=DECA_FACE_COUNTS)
    model = DECA(face_model, network, assets=assets)
    expected = CodeLayout(**DECA_FACE_COUNTS)
    if model.layout != expected:
        got = model.layout.sizes()
        short = {k: got[k] for k in ("shape", "tex", "exp") if got[k] < expected.sizes()[k]}
        raise DecaCheckpointError(
            f"face model {model.face_model_name!r} has too few components for DECA's codes: "
            f"{short} (DECA needs shape {expected.n_shape}, tex {expected.n_tex}, exp "
            f"{expected.n_exp}; tex needs an albedo space such as FLAME_albedo_from_BFM)")
    load_deca_weights(model, parts)
    return model.eval()


def imported_from(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint made by the import records about its source: file name and sha256."""
    return {"file": Path(path).name, "sha256": sha256_file(path)}
