"""Held-out neutral-shape error on a synthetic set (``wildface synth``): does a model read
identity from images of people it never saw?

For every image, the identity's predicted neutral mesh (shape code only: expression, jaw and
head pose zero, as NoW evaluates) is compared with the neutral mesh of its true shape code
over the face-region vertices, after a similarity (Umeyama) alignment
(:func:`recon.evaluation.alignment.aligned_error`: the mean per-vertex distance). The mean
shape (the template, shape code 0) is scored on the same images as the baseline a model
must beat. Used by the pipeline's evaluation (``flows.pipeline``), ``benchmarks/learning.py``
and the tests; the caller loads the model and crops the images.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.config import FaceModelConfig
from recon.evaluation.alignment import aligned_error
from recon.formats.mesh_io import write_obj

#: metres (the face model's unit: FLAME and the demo head) -> mm
MM = 1000.0

#: images (B, 3, S, S) in [0, 1] -> codes with ``shape`` (B, n_shape): the model's encoder,
#: or the reconstruction path with its test-time refinement
Encode = Callable[[torch.Tensor], Any]
#: called with each batch's ``(keys, batch, codes)``, for a caller's own diagnostics
OnBatch = Callable[[list[str], dict[str, torch.Tensor], Any], None]


def face_region(face_model: FaceModelConfig) -> np.ndarray:
    """Vertex ids of the face model's face region (all vertices when it has none)."""
    from recon.face_model.flame_io import load_face_model

    assets = load_face_model(face_model)
    return assets.masks["face"] if "face" in assets.masks else np.arange(assets.n_vertices)


def truth_shape_codes(params: dict, keys: list[str], n_shape: int) -> torch.Tensor:
    """(B, n_shape) true shape codes of the images ``keys`` of a synthetic set's
    ``params.json`` (:func:`recon.synth.load_params`), cut or zero-padded to ``n_shape``
    (components a code lacks are the mean's)."""
    out = torch.zeros(len(keys), n_shape)
    for i, k in enumerate(keys):
        code = params["identities"][params["images"][k]["identity"]]["shape"][:n_shape]
        out[i, :len(code)] = torch.tensor(code, dtype=torch.float32)
    return out


@torch.no_grad()
def neutral_errors(model, shape: torch.Tensor, truth: torch.Tensor, region: np.ndarray
                   ) -> list[float]:
    """Per-image aligned error of the neutral meshes of ``shape`` against those of ``truth``
    (both (B, n_shape), any device) over the ``region`` vertices, in the model's unit.
    model: a ``recon.deca.DECA`` (its ``neutral``)."""
    device = model.device  # evaluate where it lives (the GPU in a --device cuda run)
    pred = model.neutral(shape.to(device)).vertices.double().cpu().numpy()
    true = model.neutral(truth.to(device)).vertices.double().cpu().numpy()
    return [aligned_error(p[region], t[region]) for p, t in zip(pred, true)]


@dataclass
class HeldoutErrors:
    """Per-image errors (model units) of the model and of the mean shape, in key order."""

    keys: list[str] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    mean_shape_errors: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The pipeline's metrics (mm): ``heldout_shape_error_median_mm``,
        ``heldout_shape_error_mean_mm``, ``heldout_mean_shape_error_mm``, ``heldout_images``."""
        return {"heldout_shape_error_median_mm": float(np.median(self.errors)) * MM,
                "heldout_shape_error_mean_mm": float(np.mean(self.errors)) * MM,
                "heldout_mean_shape_error_mm": float(np.mean(self.mean_shape_errors)) * MM,
                "heldout_images": float(len(self.errors))}


@torch.no_grad()
def heldout_shape_errors(model, batches: Iterable[tuple[list[str], dict[str, torch.Tensor]]],
                         params: dict, region: np.ndarray, encode: Encode | None = None,
                         on_batch: OnBatch | None = None, mesh_dir: Path | None = None,
                         n_meshes: int = 4) -> HeldoutErrors:
    """The held-out neutral-shape errors of ``model`` (a ``recon.deca.DECA``, evaluated
    where it lives) and of the mean shape.

    batches: ``(keys, batch)`` with ``batch["images"]`` (B, 3, S, S) in [0, 1], as
    :func:`recon.training.data.iter_eval_batches` yields them; params: the set's
    ``params.json`` (each key's identity and its true shape code); region: the vertex ids
    compared (:func:`face_region`); encode: the predicted codes (default the model's
    encoders, ``model.encode(images, with_detail=False)``); on_batch: sees every batch
    (moved to the model's device) with its codes; mesh_dir: the first ``n_meshes``
    predictions are written there as OBJ (``<key>_posed.obj``: the posed coarse mesh,
    ``<key>_neutral.obj``: the neutral one).
    """
    n_shape = model.flame.n_shape
    if encode is None:
        def encode(images: torch.Tensor) -> Any:
            return model.encode(images, with_detail=False)
    out = HeldoutErrors()
    for keys, batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        codes = encode(batch["images"])
        truth = truth_shape_codes(params, keys, n_shape)
        written = len(out.keys)
        out.keys += keys
        out.errors += neutral_errors(model, codes.shape, truth, region)
        out.mean_shape_errors += neutral_errors(model, torch.zeros_like(truth), truth, region)
        if on_batch is not None:
            on_batch(keys, batch, codes)
        if mesh_dir is not None and written < n_meshes:
            _write_meshes(model, codes, keys[:n_meshes - written], Path(mesh_dir))
    return out


def _write_meshes(model, codes: Any, keys: list[str], mesh_dir: Path) -> None:
    """The posed coarse and the neutral mesh of the first len(keys) images of ``codes``."""
    faces = model.flame.faces.cpu().numpy()
    posed = model.decode(codes, with_detail=False, render=False).vertices.cpu().numpy()
    neutral = model.neutral(codes.shape).vertices.cpu().numpy()
    for i, k in enumerate(keys):
        stem = k.replace("/", "_")
        write_obj(mesh_dir / f"{stem}_posed.obj", posed[i], faces)
        write_obj(mesh_dir / f"{stem}_neutral.obj", neutral[i], faces)
