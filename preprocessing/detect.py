"""Face detection backends. Every backend returns faces in the photo's own pixel
coordinates: ``box = (x0, y0, x1, y1)``, 0-based, x right, y down, x1/y1 exclusive.

Default ``dlib-hog`` (measured on astronaut + t1.jpg, 2-core CPU: HOG ~25-100 ms per photo,
dlib's CNN (MMOD) ~3-10 s, both found all 7 faces). Optional backends load weights from a
local path only: ``face-alignment`` (SFD .pth) and ``insightface`` (RetinaFace/SCRFD .onnx).
"""
from __future__ import annotations

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


class SFDDetector:
    """face-alignment's S3FD from a local ``.pth`` (``detector_weights``)."""

    def __init__(self, cfg: PreprocessConfig):
        if not cfg.detector_weights:
            raise ValueError("detector 'face-alignment' needs preprocess.detector_weights (SFD .pth)")
        try:
            from face_alignment.detection.sfd.sfd_detector import SFDDetector as _SFD
        except ImportError as err:
            raise ImportError("detector 'face-alignment' needs: pip install 'wildface[face-alignment]'") from err
        self.cfg = cfg
        self._det = _SFD(device="cpu", path_to_detector=cfg.detector_weights)

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        small, scale = _downscale(rgb, self.cfg.detect_max_side)
        dets = self._det.detect_from_image(small[..., ::-1].copy()) or []
        faces = [Face(box=tuple(float(v) / scale for v in d[:4]), score=float(d[4])) for d in dets]
        return _filter(faces, self.cfg)


class InsightfaceDetector:
    """insightface RetinaFace/SCRFD from a local ``.onnx`` (``detector_weights``)."""

    def __init__(self, cfg: PreprocessConfig):
        if not cfg.detector_weights:
            raise ValueError("detector 'insightface' needs preprocess.detector_weights (.onnx)")
        try:
            from insightface.model_zoo import get_model
        except ImportError as err:
            raise ImportError("detector 'insightface' needs: pip install 'wildface[insightface]'") from err
        self.cfg = cfg
        self._det = get_model(cfg.detector_weights, providers=["CPUExecutionProvider"])
        self._det.prepare(ctx_id=-1, input_size=(640, 640))

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        small, scale = _downscale(rgb, self.cfg.detect_max_side)
        bboxes, _ = self._det.detect(small[..., ::-1].copy())
        faces = [Face(box=tuple(float(v) / scale for v in b[:4]), score=float(b[4])) for b in bboxes]
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
    if cfg.detector == "face-alignment":
        return SFDDetector(cfg)
    return InsightfaceDetector(cfg)

