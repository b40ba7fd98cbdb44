"""DECA-style crop: a similarity transform centred on the landmark bounding box.

Convention: pixel coordinates are 0-based with pixel centres at integers (x right, y down);
the crop's normalised coordinates are ``u = (x + 0.5) / W * 2 - 1`` so ``u = -1`` / ``+1``
are the crop's outer edges. The 2x3 ``transform`` maps photo pixels to crop pixels.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from recon.landmarks import landmark_square


def scale_shift_affine(scale: float, origin: np.ndarray) -> np.ndarray:
    """(2, 3) photo->window map in pixel-centre coords, for a window whose top-left edge
    is ``origin`` (edge coordinates, = pixel coord + 0.5) scaled by ``scale``."""
    tx, ty = scale * (0.5 - origin) - 0.5
    return np.array([[scale, 0.0, tx], [0.0, scale, ty]], dtype=np.float64)


def crop_window(lmk: np.ndarray, crop_scale: float) -> tuple[np.ndarray, float]:
    """(centre (2,) in pixel coords, side in pixels) of the crop for (68, 2) landmarks."""
    centre, size = landmark_square(np.asarray(lmk, np.float64))
    return centre, crop_scale * float(size)


def crop_transform(lmk: np.ndarray, crop_size: int, crop_scale: float) -> np.ndarray:
    """(2, 3) photo->crop affine for (68, 2) photo landmarks."""
    centre, side = crop_window(lmk, crop_scale)
    return scale_shift_affine(crop_size / side, centre + 0.5 - side / 2.0)


def warp(image: np.ndarray, lmk: np.ndarray, crop_size: int, crop_scale: float,
         nearest: bool = False) -> np.ndarray:
    """Crop (crop_size, crop_size[, C]) of ``image`` for the window of ``crop_transform``.

    Downscaling goes through an integer-sized window then area averaging (no aliasing);
    both steps compose to exactly ``crop_transform``. Outside the photo is black.
    """
    centre, side = crop_window(lmk, crop_scale)
    origin = centre + 0.5 - side / 2.0
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    if nearest or crop_size >= side:
        return cv2.warpAffine(image, scale_shift_affine(crop_size / side, origin), (crop_size, crop_size),
                              flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    n = math.ceil(side)
    window = cv2.warpAffine(image, scale_shift_affine(n / side, origin), (n, n), flags=interp,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.resize(window, (crop_size, crop_size), interpolation=cv2.INTER_AREA)


def apply_affine(transform: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(N, 2) points through a (2, 3) affine."""
    return pts @ transform[:, :2].T + transform[:, 2]


def to_normalised(pts_px: np.ndarray, size: int) -> np.ndarray:
    """(N, 2) crop pixel coords -> [-1, 1] normalised coords (pixel-centre convention)."""
    return ((pts_px + 0.5) / size * 2.0 - 1.0).astype(np.float32)


def from_normalised(uv: np.ndarray, size: int) -> np.ndarray:
    """Inverse of :func:`to_normalised`."""
    return (uv + 1.0) / 2.0 * size - 0.5
