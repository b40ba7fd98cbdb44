"""Annotations beside an image, used instead of the models when present.

``dir/<identity>/<name>.<ext>`` may have ``<name>.pts`` (iBUG PTS, 68 points, 1-based
pixel coordinates as in 300-W) and ``<name>.mask.png`` (8-bit skin mask of the photo's
size, > 127 = skin).
"""
from __future__ import annotations

import io
import posixpath

import numpy as np
from PIL import Image

from preprocessing.decode import Rejected

PTS_SUFFIX = ".pts"
MASK_SUFFIX = ".mask.png"


def sidecar_stem(uri: str) -> str:
    """``a/b/img.jpg`` -> ``a/b/img``."""
    root, _ = posixpath.splitext(uri)
    return root


def is_sidecar(uri: str) -> bool:
    return uri.endswith(MASK_SUFFIX) or uri.endswith(PTS_SUFFIX)


def read_pts(data: bytes) -> np.ndarray:
    """PTS bytes -> (68, 2) float32, 0-based pixel coordinates."""
    try:
        text = data.decode("utf-8", errors="strict")
        body = text[text.index("{") + 1:text.index("}")]
        pts = np.array([[float(v) for v in line.split()] for line in body.strip().splitlines()
                        if line.strip()], dtype=np.float32)
    except (ValueError, UnicodeDecodeError) as err:
        raise Rejected(f"unreadable .pts annotation: {err}") from None
    if pts.shape != (68, 2):
        raise Rejected(f".pts annotation has shape {pts.shape}, expected (68, 2)")
    return pts - 1.0


def write_pts(lmk: np.ndarray) -> bytes:
    """(68, 2) 0-based pixel coordinates -> PTS bytes (1-based)."""
    lines = [f"{x + 1:.3f} {y + 1:.3f}" for x, y in np.asarray(lmk, dtype=np.float64)]
    return ("version: 1\nn_points: 68\n{\n" + "\n".join(lines) + "\n}\n").encode()


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
