"""Annotations beside an image, used instead of the models when present.

``dir/<identity>/<name>.<ext>`` may have ``<name>.pts`` (iBUG PTS, 68 points, 1-based
pixel coordinates as in 300-W; the format lives in :mod:`recon.landmarks_io`) and
``<name>.mask.png`` (8-bit skin mask of the photo's size, > 127 = skin).
"""
from __future__ import annotations

import io
import posixpath

import numpy as np
from PIL import Image

from preprocessing.decode import Rejected
from recon import landmarks_io
from recon.landmarks_io import write_pts
from recon.sidecars import MASK_SUFFIX, PTS_SUFFIX



def sidecar_stem(uri: str) -> str:
    """``a/b/img.jpg`` -> ``a/b/img``."""
    root, _ = posixpath.splitext(uri)
    return root


def is_sidecar(uri: str) -> bool:
    return uri.endswith(MASK_SUFFIX) or uri.endswith(PTS_SUFFIX)


def read_pts(data: bytes) -> np.ndarray:
    """PTS bytes -> (68, 2) float32, 0-based pixel coordinates; an unreadable file is a
    rejection of its image."""
    try:
        return landmarks_io.read_pts(data)
    except ValueError as err:
        raise Rejected(str(err)) from None


def read_mask(data: bytes, width: int, height: int) -> np.ndarray:
    """Mask PNG bytes -> (H, W) uint8 {0, 255}; must match the photo's size."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure is a rejection
        raise Rejected(f"unreadable mask annotation: {err}") from None
    if img.size != (width, height):
        raise Rejected(f"mask annotation is {img.size}, photo is {(width, height)}")
    return np.where(np.asarray(img.convert("L")) > 127, 255, 0).astype(np.uint8)


# write_pts (recon.landmarks_io) and the suffixes (recon.sidecars), re-exported for their users.
__all__ = ["MASK_SUFFIX", "PTS_SUFFIX", "is_sidecar", "read_mask", "read_pts", "sidecar_stem",
           "write_pts"]
