"""Annotations of an image, used instead of (or to guide) the models when present.

``dir/<identity>/<name>.<ext>`` may have ``<name>.pts`` (iBUG PTS, 68 points, 1-based
pixel coordinates as in 300-W; the format lives in :mod:`recon.formats.landmarks_io`) and
``<name>.mask.png`` (8-bit skin mask of the photo's size, > 127 = skin).

A dataset's own face box and landmarks (:mod:`preprocessing.datasets`) travel as a
:class:`DatasetGuide`: they pick the labelled face among the detected ones
(:func:`match_face`), or stand in for the detector.
"""
from __future__ import annotations

import io
import json
import math
import posixpath
from dataclasses import dataclass

import numpy as np
from PIL import Image

from preprocessing.decode import Rejected
from recon.formats import landmarks_io
from recon.formats.landmarks_io import write_pts
from recon.formats.sidecars import MASK_SUFFIX, PTS_SUFFIX



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


@dataclass
class DatasetGuide:
    """A dataset's labels of one face, in the photo's pixels (0-based, x right, y down)."""

    box: tuple[float, float, float, float] | None  # (x0, y0, x1, y1)
    points: np.ndarray | None  # (K, 2) float64 in the dataset's order, NaN = not annotated

    @classmethod
    def from_json(cls, text: str | None) -> DatasetGuide | None:
        """``{"box": [..] | null, "points": [[x, y], ..] | null}`` (an input's ``guide``)."""
        if not text:
            return None
        d = json.loads(text)
        box = tuple(float(v) for v in d["box"]) if d.get("box") else None
        pts = np.asarray(d["points"], np.float64).reshape(-1, 2) if d.get("points") else None
        return cls(box=box, points=pts)  # type: ignore[arg-type]


#: A detected face is the labelled one when at least this share of its area lies in the
#: dataset's box (loose boxes, such as VGGFace2's, are much larger than a detector's) ...
MIN_INSIDE = 0.5
#: ... and at least this share of the dataset's annotated points lies in it (the box grown
#: by POINT_MARGIN of its size on each side: AFLW's ears and chin lie outside tight boxes).
MIN_POINTS_INSIDE = 0.5
POINT_MARGIN = 0.25


def _area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _intersection(a, b) -> float:
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def match_face(boxes: list[tuple[float, float, float, float]], guide: DatasetGuide) -> int | None:
    """Index of the detected face (``boxes``, (x0, y0, x1, y1) each) that the dataset labels,
    or None: among the faces that hold enough of the annotated points and lie mostly in the
    dataset's box, the one holding most points, then overlapping the box most (IoU)."""
    best, best_score = None, None
    pts = None if guide.points is None else guide.points[~np.isnan(guide.points).any(axis=1)]
    for i, b in enumerate(boxes):
        n_in, iou = 0, 0.0
        if pts is not None and len(pts):
            mx, my = POINT_MARGIN * (b[2] - b[0]), POINT_MARGIN * (b[3] - b[1])
            n_in = int(((pts[:, 0] >= b[0] - mx) & (pts[:, 0] <= b[2] + mx)
                        & (pts[:, 1] >= b[1] - my) & (pts[:, 1] <= b[3] + my)).sum())
            if n_in < math.ceil(MIN_POINTS_INSIDE * len(pts)):
                continue
        if guide.box is not None:
            inter = _intersection(b, guide.box)
            if inter < MIN_INSIDE * _area(b):
                continue
            iou = inter / max(_area(b) + _area(guide.box) - inter, 1e-9)
        if best_score is None or (n_in, iou) > best_score:
            best, best_score = i, (n_in, iou)
    return best


# write_pts (recon.formats.landmarks_io) and the suffixes (recon.formats.sidecars), re-exported for their users.
__all__ = ["DatasetGuide", "MASK_SUFFIX", "PTS_SUFFIX", "is_sidecar", "match_face", "read_mask",
           "read_pts", "sidecar_stem", "write_pts"]
