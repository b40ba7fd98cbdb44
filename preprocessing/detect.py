"""Face detection backends. Every backend returns faces in the photo's own pixel
coordinates: ``box = (x0, y0, x1, y1)``, 0-based, x right, y down, x1/y1 exclusive.

Default ``dlib-hog`` (measured on astronaut + t1.jpg, 2-core CPU: HOG ~25-100 ms per photo,
dlib's CNN (MMOD) ~3-10 s, both found all 7 faces). Optional backends load weights from a
local path only: ``face-alignment`` (SFD .pth) and ``insightface`` (RetinaFace/SCRFD .onnx).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from preprocessing.assets import dlib_model_path
from preprocessing.config import PreprocessConfig


@dataclass
class Face:
    box: tuple[float, float, float, float]
    score: float

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4)}


class Detector(Protocol):
    def __call__(self, rgb: np.ndarray) -> list[Face]:
        """rgb: (H, W, 3) uint8 -> faces, best (main face) first."""
        ...


def _downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return rgb, 1.0
    small = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return small, scale


class DlibDetector:
    """dlib's HOG (``cnn=False``) or MMOD CNN detector."""

    def __init__(self, cfg: PreprocessConfig, cnn: bool = False):
        import dlib

        self.cfg = cfg
        self.cnn = cnn
        if cnn:
            self._net = dlib.cnn_face_detection_model_v1(str(dlib_model_path(
                "mmod_human_face_detector.dat")))
        else:
            self._hog = dlib.get_frontal_face_detector()

    def _run(self, img: np.ndarray, upsample: int) -> list[tuple[tuple[int, int, int, int], float]]:
        if self.cnn:
            return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()),
                     float(d.confidence)) for d in self._net(img, upsample)]
        rects, scores, _ = self._hog.run(img, upsample, self.cfg.min_score)
        return [((r.left(), r.top(), r.right(), r.bottom()), float(s))
                for r, s in zip(rects, scores)]

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        small, scale = _downscale(rgb, self.cfg.detect_max_side)
        found = self._run(small, self.cfg.upsample)
        if not found and self.cfg.retry_upsample and self.cfg.upsample < 2:
            found = self._run(small, self.cfg.upsample + 1)
        # dlib's right/bottom are inclusive pixel indices: +1 makes them exclusive edges.
        faces = [Face(box=(l / scale, t / scale, (r + 1) / scale, (b + 1) / scale), score=s)
                 for (l, t, r, b), s in found]
        return _filter(faces, self.cfg)


# A loaded optional model: (H, W, 3) uint8 BGR image -> rows ``x0, y0, x1, y1, score, ...``
# in that image's pixels.
FindBoxes = Callable[[np.ndarray], Iterable[np.ndarray]]


def _load_sfd(weights: str) -> FindBoxes:
    from face_alignment.detection.sfd.sfd_detector import SFDDetector

    det = SFDDetector(device="cpu", path_to_detector=weights)
    return lambda bgr: det.detect_from_image(bgr) or []


def _load_insightface(weights: str) -> FindBoxes:
    from insightface.model_zoo import get_model

    det = get_model(weights, providers=["CPUExecutionProvider"])
    det.prepare(ctx_id=-1, input_size=(640, 640))
    return lambda bgr: det.detect(bgr)[0]


@dataclass(frozen=True)
class OptionalBackend:
    """A detector from an optional package, with weights from a local file: ``load(weights
    path)`` imports the package and returns the model as :data:`FindBoxes`."""

    name: str  # PreprocessConfig.detector
    weights: str  # what preprocess.detector_weights must be, for the error message
    extra: str  # the pip extra that installs the package
    load: Callable[[str], FindBoxes]


OPTIONAL_BACKENDS = {b.name: b for b in (
    OptionalBackend("face-alignment", "SFD .pth", "face-alignment", _load_sfd),
    OptionalBackend("insightface", "RetinaFace/SCRFD .onnx", "insightface", _load_insightface),
)}


class OptionalDetector:
    """An :class:`OptionalBackend` behind the :class:`Detector` interface: downscaled input,
    boxes back in the photo's pixels, filtered like the dlib ones."""

    def __init__(self, cfg: PreprocessConfig, backend: OptionalBackend):
        if not cfg.detector_weights:
            raise ValueError(f"detector {backend.name!r} needs preprocess.detector_weights "
                             f"({backend.weights})")
        try:
            self._detect = backend.load(cfg.detector_weights)
        except ImportError as err:
            raise ImportError(f"detector {backend.name!r} needs: pip install "
                              f"'wildface[{backend.extra}]'") from err
        self.cfg = cfg

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        small, scale = _downscale(rgb, self.cfg.detect_max_side)
        rows = self._detect(small[..., ::-1].copy())  # both backends take BGR
        faces = [Face(box=tuple(float(v) / scale for v in r[:4]), score=float(r[4]))
                 for r in rows]
        return _filter(faces, self.cfg)


def _filter(faces: list[Face], cfg: PreprocessConfig) -> list[Face]:
    kept = [f for f in faces if f.score >= cfg.min_score
            and min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= cfg.min_face_size]
    # Best score first: the main face. (Largest-first picked a HOG false positive on a
    # badge over the real face of skimage's astronaut.)
    return sorted(kept, key=lambda f: (-f.score, -f.area))


def make_detector(cfg: PreprocessConfig) -> Detector:
    if cfg.detector == "dlib-hog":
        return DlibDetector(cfg, cnn=False)
    if cfg.detector == "dlib-cnn":
        return DlibDetector(cfg, cnn=True)
    return OptionalDetector(cfg, OPTIONAL_BACKENDS[cfg.detector])

