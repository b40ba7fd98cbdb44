"""Read a ``wildface synth`` output back as training samples (no preprocessing needed).

Yields the decoded sample format of ``preprocessing.shards`` (``key``, ``image`` (S, S, 3)
uint8, ``landmarks`` (68, 2) in the image convention [-1, 1], ``mask`` (S, S) uint8, ``meta``
with ``identity``), so :class:`recon.training.data.SampleStore` takes it directly: the training
crops are recomputed from the landmarks, whatever the framing. Landmarks come from
``params.json`` (exact ground truth, not the rounded ``.pts``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from recon.formats.sidecars import MASK_SUFFIX
from recon.synth.generate import IMAGES_DIR, PARAMS_FILE


def load_params(root: str | os.PathLike) -> dict:
    """The ground truth ``params.json`` of a synthetic dataset."""
    return json.loads((Path(root) / PARAMS_FILE).read_text())


def pixels_to_image(landmarks_px: np.ndarray, size: int) -> np.ndarray:
    """0-based pixel coordinates (centres at integers) -> [-1, 1] image convention."""
    return ((np.asarray(landmarks_px, np.float64) + 0.5) / size * 2.0 - 1.0).astype(np.float32)


def iter_samples(root: str | os.PathLike, identities: set[str] | None = None) -> Iterator[dict]:
    """Decoded samples of a synthetic dataset in key order (``<identity>/<image>``),
    optionally only those of ``identities``."""
    root = Path(root)
    params = load_params(root)
    for key in sorted(params["images"]):
        p = params["images"][key]
        if identities is not None and p["identity"] not in identities:
            continue
        image = np.asarray(Image.open(root / IMAGES_DIR / f"{key}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(root / IMAGES_DIR / f"{key}{MASK_SUFFIX}").convert("L"))
        yield {"key": key, "image": image, "mask": mask,
               "landmarks": pixels_to_image(p["landmarks_px"], image.shape[0]),
               "meta": {"identity": p["identity"], "source": "synth"}}
