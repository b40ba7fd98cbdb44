"""Skin masks of the crop: by default from the landmarks, without a network; or from a
face-parsing network given as a local file (``mask: segmentation``,
:mod:`preprocessing.face_parsing`).

The default: the landmark face polygon (jaw + brows lifted towards the forehead) minus
eyes, brows and mouth, refined by a per-image skin colour model: a Gaussian in YCrCb chroma
fitted robustly (median / MAD) to the polygon's pixels, keeping pixels within ``sigma``.
Hair, glasses and shadows over the polygon drop out. When the colour model would keep less
than a third of the polygon (odd lighting, grey images) the polygon alone is used.
"""
from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from preprocessing.config import PreprocessConfig
from recon.landmarks import JAW, LEFT_BROW, LEFT_EYE, OUTER_LIPS, RIGHT_BROW, RIGHT_EYE


def _poly(mask: np.ndarray, pts: np.ndarray, value: int) -> None:
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], value, lineType=cv2.LINE_8,
                 shift=4)


def polygon_mask(lmk: np.ndarray, size: int) -> np.ndarray:
    """(size, size) uint8 {0, 255} from (68, 2) landmarks in crop pixels."""
    mask = np.zeros((size, size), np.uint8)
    brows = lmk[list(RIGHT_BROW + LEFT_BROW)]
    # Lift the brow line by a fraction of the brow-to-chin height to include the forehead.
    lift = 0.2 * (lmk[JAW, 1].max() - brows[:, 1].mean())
    forehead = brows[::-1] - np.array([0.0, lift])
    _poly(mask, np.concatenate([lmk[list(JAW)], forehead]), 255)
    scale = max(np.ptp(lmk[:, 0]), 1.0)
    for part, grow in ((RIGHT_EYE, 0.03), (LEFT_EYE, 0.03), (OUTER_LIPS, 0.02)):
        pts = lmk[list(part)]
        c = pts.mean(axis=0)
        d = pts - c
        _poly(mask, c + d * (1 + grow * scale / max(np.linalg.norm(d, axis=1).mean(), 1e-6)), 0)
    thick = max(1, int(round(0.04 * scale)))
    for part in (RIGHT_BROW, LEFT_BROW):
        cv2.polylines(mask, [np.round(lmk[list(part)]).astype(np.int32)], False, 0, thickness=thick)
    return mask


def skin_mask(crop: np.ndarray, lmk: np.ndarray, sigma: float) -> np.ndarray:
    """crop: (S, S, 3) uint8 RGB; lmk: (68, 2) crop pixels -> (S, S) uint8 {0, 255}."""
    size = crop.shape[0]
    poly = polygon_mask(lmk, size)
    inside = poly > 0
    if inside.sum() < 50:
        return poly
    chroma = cv2.cvtColor(crop, cv2.COLOR_RGB2YCrCb)[..., 1:].astype(np.float32)
    samples = chroma[inside]
    med = np.median(samples, axis=0)
    mad = np.median(np.abs(samples - med), axis=0) * 1.4826 + 1.5  # floor: flat colour
    dist = np.sqrt((((chroma - med) / mad) ** 2).sum(axis=-1))
    refined = (inside & (dist <= sigma)).astype(np.uint8) * 255
    refined = cv2.morphologyEx(refined, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    if (refined > 0).sum() < inside.sum() / 3:
        return poly
    return refined


class SkinMasker(Protocol):
    source: str  # recorded in the sample's meta as the mask source

    def __call__(self, crop: np.ndarray, lmk: np.ndarray) -> np.ndarray:
        """crop: (S, S, 3) uint8 RGB; lmk: (68, 2) crop pixels -> (S, S) uint8 {0, 255}."""
        ...


class LandmarkSkinMask:
    """:func:`skin_mask` behind the mask interface."""

    source = "landmark polygon + skin colour"

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, crop: np.ndarray, lmk: np.ndarray) -> np.ndarray:
        return skin_mask(crop, lmk, self.sigma)


def make_masker(cfg: PreprocessConfig) -> SkinMasker:
    if cfg.mask == "segmentation":
        from preprocessing.face_parsing import SegmentationSkinMask  # imports torch

        return SegmentationSkinMask(cfg)
    return LandmarkSkinMask(cfg.skin_colour_sigma)
