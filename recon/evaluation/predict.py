"""Write NoW-layout predictions from any model: the hook between a model and the protocol.

A model enters as a callable ``predict_neutral(image_path) -> (verts (V, 3), faces (F, 3),
lmk7 (7, 3))``: the neutral mesh of the face in the image (expression and jaw zeroed) and
its 7 NoW landmarks (FLAME: static-51 indices ``[19, 22, 25, 28, 16, 31, 37]``), in the
model's unit (metres for FLAME). :func:`predict_now` runs it over an image list and
writes ``<subject>/<challenge>/<image>.obj`` + ``.npy``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recon.evaluation.now_io import (
    N_LANDMARKS,
    find_prediction,
    image_list_path,
    read_image_list,
    write_prediction,
)
from recon.progress import Progress

PredictNeutral = Callable[[Path], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class PredictSummary:
    written: int = 0
    skipped: int = 0
    #: (image rel path, reason) of the images that got no prediction
    failed: list[tuple[str, str]] = field(default_factory=list)


def predict_now(
    predict_neutral: PredictNeutral,
    dataset_dir: str | os.PathLike,
    predictions_dir: str | os.PathLike,
    *,
    split: str = "val",
    image_root: str = "NoW_Dataset/final_release_version/iphone_pictures",
    overwrite: bool = False,
    progress: str | None = None,
) -> PredictSummary:
    """Predict every image of the split's list; existing predictions are kept unless
    ``overwrite`` (reruns are idempotent). A missing image or a failing/invalid prediction
    is recorded in ``failed`` and the run goes on. ``progress``: the label of a periodic
    progress line (:class:`recon.progress.Progress`; None: none)."""
    dataset_dir = Path(dataset_dir)
    summary = PredictSummary()
    images = read_image_list(image_list_path(dataset_dir, split))
    line = Progress(progress, len(images), "images") if progress else None
    for image in images:
        if line is not None:
            line.update(summary.written + summary.skipped + len(summary.failed))
        done = find_prediction(predictions_dir, image)
        if not overwrite and done.mesh is not None and done.landmarks is not None:
            summary.skipped += 1
            continue
        path = dataset_dir / image_root / image.rel_path
        if not path.is_file():
            summary.failed.append((image.rel_path, f"image not found: {path}"))
            continue
        try:
            verts, faces, lmk = (np.asarray(x) for x in predict_neutral(path))
            if verts.ndim != 2 or verts.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
                raise ValueError(f"mesh must be (V,3)/(F,3), got {verts.shape}/{faces.shape}")
            if not np.isfinite(verts).all():  # would be written, then fail every scoring
                raise ValueError("mesh has NaN or infinite coordinates")
            if lmk.shape != (N_LANDMARKS, 3):
                raise ValueError(f"landmarks must be (7,3), got {lmk.shape}")
            write_prediction(predictions_dir, image, verts, faces, lmk)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the benchmark
            summary.failed.append((image.rel_path, f"{type(e).__name__}: {e}"))
            continue
        summary.written += 1
    if line is not None:
        line.update(len(images))
    return summary
