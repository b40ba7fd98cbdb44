"""The one way a face is found in a photo and cropped, for the preprocessing (training
samples) and for reconstruction (``wildface reconstruct``, evaluation, animation) alike:
detector box -> 68 landmarks -> plausibility check -> crop box (the landmark square x the crop
scale, :func:`preprocessing.crop.crop_transform`). Training and inference therefore see a
face the same way; only the crop's size and scale are the caller's (the preprocessing's
``crop_size`` / ``crop_scale``, the model's input size and ``data.eval_scale``).

Coordinates are the photo's pixels (0-based, pixel centres at integers, x right, y down);
boxes are ``(x0, y0, x1, y1)`` with exclusive right/bottom edges (:mod:`preprocessing.detect`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocessing import annotations
from preprocessing.config import PreprocessConfig
from preprocessing.crop import apply_affine, crop_transform, to_normalised, warp
from preprocessing.decode import Rejected, decode_image
from preprocessing.detect import Face, make_detector
from preprocessing.landmarks import make_landmarker, plausible
from recon.landmarks import landmark_box

Box = tuple[float, float, float, float]


@dataclass
class FoundFace:
    landmarks: np.ndarray  # (68, 2) photo pixels
    box: Box  # what the landmarks were fitted in (detector or dataset box; landmark box)
    score: float | None  # the detector's, None when no detector found the face
    source: str  # where the landmarks come from, e.g. "dlib-68 on dlib-hog"


def _call(stage: str, fn: Callable, *args: Any) -> Any:
    return fn(*args)


class FaceFinder:
    """Faces in a photo (models loaded on first use, once per finder).

    ``timed(stage, fn, *args)`` runs the detector (stage ``detect``) and the landmarker
    (``landmarks``): the preprocessing passes its stage timer.
    """

    def __init__(self, cfg: PreprocessConfig, timed: Callable[..., Any] = _call) -> None:
        self.cfg = cfg
        self._timed = timed
        self._detector = None
        self._landmarker = None

    def decode(self, data: bytes) -> np.ndarray:
        """An encoded image -> (H, W, 3) uint8 RGB, within the configured size limits
        (:class:`preprocessing.decode.Rejected` otherwise)."""
        c = self.cfg
        return decode_image(data, min_size=c.min_image_size, max_pixels=c.max_pixels,
                            max_bytes=int(c.max_file_mb * 2**20)).rgb

    def _models(self):
        if self._detector is None:
            self._detector = make_detector(self.cfg)
            self._landmarker = make_landmarker(self.cfg)
        return self._detector, self._landmarker

    def find(self, rgb: np.ndarray, pts: bytes | None = None,
             guide: annotations.DatasetGuide | None = None, limit: int | None = None,
             seen: list[dict] | None = None) -> tuple[list[FoundFace], list[str]]:
        """Every plausible face of ``rgb`` (H, W, 3) uint8, main first, and why the others
        were dropped (``"face i: reason"``).

        pts: an iBUG ``.pts`` annotation of the main face, used instead of the models.
        guide: a dataset's labels of the one face wanted (its box, points): the detected face
        they match, else the dataset's box itself (always with ``dataset_boxes: use``);
        :class:`Rejected` when the detector found faces but none matches and there is no box.
        limit: stop after that many plausible faces (the preprocessing keeps one).
        seen: the boxes looked at are appended to it as ``{"box", "score"}`` (a sample's
        ``faces``).
        """
        seen = [] if seen is None else seen
        h, w = rgb.shape[:2]
        if pts is not None:
            lmk = annotations.read_pts(pts)
            box = tuple(float(v) for v in landmark_box(lmk))
            seen.append({"box": [round(v, 2) for v in box], "score": None})
            candidates = [FoundFace(lmk, box, None, "annotation")]
        else:
            candidates = self._fit(rgb, self._boxes(rgb, guide, seen))
        faces, dropped = [], []
        for i, face in enumerate(candidates):
            why = plausible(face.landmarks, w, h)
            if why:
                dropped.append(f"face {i}: {why}")
                continue
            faces.append(face)
            if limit is not None and len(faces) == limit:
                break
        return faces, dropped

    def main_face(self, rgb: np.ndarray, pts: bytes | None = None,
                  guide: annotations.DatasetGuide | None = None,
                  seen: list[dict] | None = None) -> FoundFace:
        """The main face of :meth:`find`; :class:`Rejected` with the reason when there is
        none."""
        faces, dropped = self.find(rgb, pts, guide, limit=1, seen=seen)
        if not faces:
            raise Rejected("; ".join(dropped) or "no face found")
        return faces[0]

    def _boxes(self, rgb: np.ndarray, guide: annotations.DatasetGuide | None,
               seen: list[dict]) -> list[tuple[Box, float | None, str]]:
        """(box, detector score, what found it) of each face to fit landmarks in, main
        first."""
        cfg = self.cfg
        if guide is not None and guide.box is not None and cfg.dataset_boxes == "use":
            seen.append({"box": [round(v, 2) for v in guide.box], "score": None})
            return [(guide.box, None, "the dataset's box")]
        detector, _ = self._models()
        found: list[Face] = self._timed("detect", detector, rgb)
        seen.extend(f.to_dict() for f in found)
        faces = [(f.box, round(float(f.score), 4), cfg.detector) for f in found]
        if guide is None:
            return faces
        i = annotations.match_face([f.box for f in found], guide)
        if i is not None:
            return [(found[i].box, faces[i][1], f"{cfg.detector}, the dataset's face")]
        if guide.box is not None:
            return [(guide.box, None, "the dataset's box")]
        if found:
            raise Rejected("no detected face matches the dataset's landmarks")
        return []

    def _fit(self, rgb: np.ndarray, boxes: list[tuple[Box, float | None, str]]
             ) -> Iterator[FoundFace]:
        """Landmarks in each box, lazily: :meth:`find` stops at its ``limit``."""
        _, landmarker = self._models()
        for box, score, found_by in boxes:
            lmk = self._timed("landmarks", landmarker, rgb, box)
            yield FoundFace(lmk, box, score, f"{landmarker.name} on {found_by}")


def crop_face(rgb: np.ndarray, lmk: np.ndarray, size: int, scale: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A face's crop: rgb (H, W, 3) uint8 and lmk (68, 2) photo pixels -> the (S, S, 3)
    uint8 crop at ``scale`` x the landmark square, the photo->crop (2, 3) transform and the
    landmarks in the crop's [-1, 1] image convention (68, 2) float32."""
    transform = crop_transform(lmk, size, scale)
    crop = warp(rgb, lmk, size, scale)
    return crop, transform, to_normalised(apply_affine(transform, lmk), size)
