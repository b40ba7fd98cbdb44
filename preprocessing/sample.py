"""One photo -> one sample record: decode, the main face and its crop
(:mod:`preprocessing.faces`, as reconstruction finds it), skin mask, embedding.

Models are loaded once per :class:`SampleMaker` (once per Ray actor). A record is a dict
``{rid, sha256, status, reason, jpg, lmk, mask, meta, embedding}``; rejected records keep
only the reason (and the faces seen). A record with status :data:`RETRY` says a transient
error (out of memory, a storage read) outlasted ``preprocess.transient_retries``: it is
not stored, so the next run tries the photo again.
"""
from __future__ import annotations

import io
import json
import logging
import time
from collections import defaultdict

import cv2
import numpy as np
from PIL import Image

from infra import storage
from preprocessing import annotations
from preprocessing.config import PreprocessConfig
from preprocessing.crop import apply_affine, warp
from preprocessing.datasets import VideoFrames
from preprocessing.decode import Rejected, decode_image
from preprocessing.faces import FaceFinder, crop_face
from preprocessing.skin_mask import make_masker
from recon.formats.files import npy_bytes

log = logging.getLogger("wildface.preprocess")

#: Status of a record that must not be stored: its photo is retried by the next run.
RETRY = "retry"


class _Transient(Exception):
    """Wraps an error that says nothing about the photo (retried, never recorded)."""


def _is_transient_in_processing(err: BaseException) -> bool:
    # torch's OutOfMemoryError (CPU or CUDA) is a RuntimeError, matched by name so this
    # module does not import torch.
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"


def _png(gray: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", gray)
    assert ok
    return buf.tobytes()


def _jpg(rgb: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=quality)
    return out.getvalue()


class SampleMaker:
    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.finder = FaceFinder(cfg, self._timed)
        self.masker = make_masker(cfg)
        self.frames = VideoFrames()
        if cfg.embedding == "dlib":
            from preprocessing.identity import Embedder

            self.embedder = Embedder()
        else:
            self.embedder = None

    def _timed(self, stage: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stage_seconds[stage] += time.perf_counter() - t

    def make(self, item: dict) -> dict:
        """item: {uri, rid, sha256, pts (uri | None), mask (uri | None), guide (a dataset's
        box and landmarks as JSON | None), frame (a video's frame index | None)} -> record.
        Transient errors are retried ``cfg.transient_retries`` times; then the record has status
        :data:`RETRY` and the error as its reason."""
        attempts = self.cfg.transient_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._attempt(item)
            except _Transient as wrapped:
                err = wrapped.__cause__
                log.warning("%s: transient %s (attempt %d of %d): %s", item["uri"],
                            type(err).__name__, attempt, attempts, err)
                if attempt < attempts:
                    time.sleep(self.cfg.transient_retry_delay * attempt)
        return {"rid": item["rid"], "sha256": item["sha256"], "status": RETRY,
                "reason": f"{type(err).__name__}: {err} (after {attempts} attempts)", "jpg": None,
                "lmk": None, "mask": None, "meta": "{}", "embedding": None}

    def _attempt(self, item: dict) -> dict:
        record = {"rid": item["rid"], "sha256": item["sha256"], "status": "rejected",
                  "reason": "", "jpg": None, "lmk": None, "mask": None, "meta": "{}",
                  "embedding": None}
        meta: dict = {}
        try:  # a failing read (timeout, connection) says nothing about the photo
            data = self._timed("read", storage.read_bytes, item["uri"])
            pts = storage.read_bytes(item["pts"]) if item.get("pts") else None
            mask = storage.read_bytes(item["mask"]) if item.get("mask") else None
        except (OSError, MemoryError) as err:
            raise _Transient() from err
        try:
            guide = annotations.DatasetGuide.from_json(item.get("guide"))
            frame = int(item["frame"]) if item.get("frame") else None
            self._make(data, pts, mask, record, meta, guide, frame)
            record["status"] = "ok"
        except Rejected as err:
            record["reason"] = str(err)
        except Exception as err:  # noqa: BLE001 - one odd file must not stop the dataset
            if _is_transient_in_processing(err):
                raise _Transient() from err
            record["reason"] = f"processing error: {type(err).__name__}: {err}"
        record["meta"] = json.dumps(meta, sort_keys=True)
        return record

    def _make(self, data: bytes, pts: bytes | None, mask_png: bytes | None, record: dict,
              meta: dict, guide: annotations.DatasetGuide | None = None,
              frame: int | None = None) -> None:
        cfg = self.cfg
        if frame is None:
            decoded = self._timed("decode", lambda: decode_image(
                data, min_size=cfg.min_image_size, max_pixels=cfg.max_pixels,
                max_bytes=int(cfg.max_file_mb * 2**20)))
            rgb = decoded.rgb
            meta["image"] = decoded.info
        else:
            rgb = self._timed("decode", self.frames, data, frame, cfg.max_pixels,
                              cfg.min_image_size)
            meta["image"] = {"format": "video", "frame": frame, "width": rgb.shape[1],
                             "height": rgb.shape[0]}
        h, w = rgb.shape[:2]
        meta["faces"] = []
        face = self.finder.main_face(rgb, pts, guide, seen=meta["faces"])
        lmk = face.landmarks
        meta["detector_score"] = face.score
        meta["landmark_source"] = face.source
        meta["landmarks_photo"] = np.round(lmk, 2).tolist()

        crop, transform, lmk_normalised = self._timed("crop", crop_face, rgb, lmk, cfg.crop_size,
                                                      cfg.crop_scale)
        lmk_crop = apply_affine(transform, lmk)
        if mask_png is not None:
            photo_mask = annotations.read_mask(mask_png, w, h)
            mask = warp(photo_mask, lmk, cfg.crop_size, cfg.crop_scale, nearest=True)
            meta["mask_source"] = "annotation"
        else:
            mask = self._timed("mask", self.masker, crop, lmk_crop)
            meta["mask_source"] = self.masker.source
        if self.embedder is not None:
            record["embedding"] = self._timed("embed", self.embedder, rgb, lmk).tolist()
        meta["transform"] = np.round(transform, 6).tolist()
        meta["crop_size"] = cfg.crop_size
        record["jpg"] = self._timed("encode", _jpg, crop, cfg.jpeg_quality)
        record["lmk"] = npy_bytes(lmk_normalised)
        record["mask"] = _png(mask)
