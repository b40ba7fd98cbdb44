"""Typed settings of the jobs that use a trained model: reconstruction (``reconstruct.*``),
the ``evaluate`` flow (``evaluate_flow.*``) and the scheduled ``retrain`` flow (``retrain.*``).
Sections of :class:`flows.config.WildfaceConfig`; no heavy imports here."""
from __future__ import annotations

from pydantic import Field

from infra.config import RayPoolConfig
from recon.config import RefineConfig, StrictModel
from recon.devices import DEVICE_PATTERN


class ReconstructRayConfig(RayPoolConfig):
    """``reconstruct --ray``: where (address, num_cpus, ...) and how wide its Ray Data actor
    pool runs (:class:`infra.config.RayPoolConfig`)."""


class ReconstructConfig(StrictModel):
    """``wildface reconstruct`` / ``animate`` and the Ray Data batch job (``ray``)."""

    batch_size: int = Field(8, ge=1, description="faces (or video frames) per network call")
    device: str = Field("auto", pattern=DEVICE_PATTERN.pattern,
                        description="torch device of the model: auto (the GPU when the process "
                        "sees one, else the CPU), cpu, cuda or cuda:N")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per process; "
                                "None: OMP_NUM_THREADS when set, else the cores the process may use")
    ray: ReconstructRayConfig = Field(default_factory=ReconstructRayConfig)
    video_every: int = Field(1, ge=1, description="videos: reconstruct every n-th frame")
    video_max_frames: int | None = Field(None, ge=1, description="videos: at most this many frames")
    animation_fps: float = Field(25.0, gt=0, description="frame rate of rendered animations")
    animation_frames: int = Field(
        48, ge=2, description="--expression: frames of the neutral -> pose -> neutral ramp")
    refine: RefineConfig | None = Field(
        None, description="test-time refinement instead of the model's own (its checkpoint's "
        "model.refine), e.g. --set reconstruct.refine.steps=1000; keypoint-head models only; "
        "None = the model's own")


class EvaluateFlowConfig(StrictModel):
    """The ``evaluate`` flow: which NoW-layout dataset scores a model."""

    dataset: str | None = Field(
        None, description="NoW-layout dataset folder (real NoW when you have it); None = a "
        "synthetic NoW-layout set rendered by `wildface synth` with the settings below")
    synthetic_identities: int = Field(4, ge=1, description="subjects of the synthetic set")
    synthetic_images_per_identity: int = Field(3, ge=1)
    synthetic_seed: int = Field(
        10_000, description="seed of the synthetic set (distinct from training sets' seeds)")


class RetrainConfig(StrictModel):
    """The ``retrain`` flow and its schedule (``prefect.yaml`` deployment ``retrain/scheduled``
    carries the same cron; ``wildface retrain --serve`` serves it from this config)."""

    cron: str = Field("0 3 * * 0", description="cron schedule (default: Sundays 03:00)")
    timezone: str = Field("UTC", description="time zone of the cron schedule")
    input: str | None = Field(None, description="photo folder or s3:// prefix watched for new images")
    out: str = Field("runs/retrain", description="output root (data, train, eval)")
    min_new_images: int = Field(
        1, ge=0, description="retrain only when at least this many new images were processed")
