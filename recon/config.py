"""Typed configuration of the pure-PyTorch core.

Defaults here are the single source of truth; YAML files under ``configs/`` only override
them. Every model forbids unknown fields so a typo fails before any work starts.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StrictModel(BaseModel):
    """Base for every config section: unknown fields and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEMO_HEAD = "demo-head"


class FaceModelConfig(StrictModel):
    """Which 3D face model to use and how many of its components."""

    path: str = Field(
        DEMO_HEAD,
        description="'demo-head' (built-in procedural model, NOT FLAME), a FLAME pickle, "
        "or a converted .npz",
    )
    landmarks: str | None = Field(
        None, description="landmark embedding file for a FLAME pickle (DECA's .npy)"
    )
    n_shape: int = Field(100, ge=1, le=300)
    n_exp: int = Field(50, ge=1, le=100)
    n_tex: int = Field(50, ge=1, le=200)


class NetworkConfig(StrictModel):
    """DECA's networks. Paper setup: ResNet50, 224x224 crops, 256x256 UV maps. Component
    counts (shape, expression, albedo) come from ``FaceModelConfig``."""

    backbone: Literal["resnet50", "resnet18", "mobilenet_v3_small"] = Field(
        "resnet50", description="encoder backbone: resnet50 (paper) or a small one for CPU demos"
    )
    backbone_weights: str | None = Field(
        None, description="local state-dict file for the backbone (never downloaded); "
        "None = random init"
    )
    hidden: int = Field(1024, ge=8, description="width of the encoders' MLP head")
    n_detail: int = Field(128, ge=1, description="detail code size")
    image_size: int = Field(224, ge=32, description="input crop and render size (pixels)")
    uv_size: int = Field(256, description="UV map size: 8 x 2^k, k in 1..5 (paper 256)")
    max_z: float = Field(0.01, gt=0, description="displacement bound: tanh x max_z (model units)")
    init_face_fraction: float = Field(
        0.625, gt=0, le=1.0,
        description="initial camera scale: the template's landmark box spans this fraction "
        "of the crop (1/1.6, the middle of DECA's 1.4-1.8 crop scale)",
    )

    @field_validator("uv_size")
    @classmethod
    def _uv_size_power_of_two(cls, v: int) -> int:
        if v not in (16, 32, 64, 128, 256):
            raise ValueError("uv_size must be one of 16, 32, 64, 128, 256 (8 x 2^k)")
        return v


class LossConfig(StrictModel):
    """Loss weights; defaults are DECA's (paper / public release). 0 disables a term."""

    # coarse stage
    landmarks: float = Field(1.0, ge=0, description="weighted 68-landmark L1")
    eye_closure: float = Field(1.0, ge=0)
    lip_closure: float = Field(0.5, ge=0)
    photometric: float = Field(2.0, ge=0, description="masked L1 on the lit render")
    identity: float = Field(0.2, ge=0, description="1 - cosine of identity features")
    shape_consistency: float = Field(1.0, ge=0, description="weight of the shape-swapped pass")
    reg_shape: float = Field(1e-4, ge=0)
    reg_exp: float = Field(1e-4, ge=0)
    reg_tex: float = Field(1e-4, ge=0)
    reg_light: float = Field(1.0, ge=0, description="SH light deviation from grey")
    # detail stage
    photometric_detail: float = Field(2.0, ge=0, description="UV-space L1, visible texels")
    mrf: float = Field(0.1, ge=0, description="ID-MRF; paper: 0.05 x photometric_detail")
    symmetry: float = Field(5e-3, ge=0, description="soft symmetry on invisible texels")
    displacement: float = Field(5e-3, ge=0, description="L1 on the UV displacement")
    shading_smoothness: float = Field(5e-3, ge=0)
    detail_consistency: float = Field(1.0, ge=0, description="weight of the detail-swapped pass")


class TrainConfig(StrictModel):
    """Optimisation. Batches hold N identities x K images (paper: coarse 8 x 4, detail 2 x 3)."""

    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    identities_per_batch: int = Field(8, ge=1, description="N, coarse stage")
    images_per_identity: int = Field(4, ge=1, description="K, coarse stage")
    detail_identities_per_batch: int = Field(2, ge=1, description="N, detail stage")
    detail_images_per_identity: int = Field(3, ge=1, description="K, detail stage")
    steps: int = Field(200_000, ge=0, description="optimiser steps of the stage being trained")
    pretrain_steps: int = Field(
        20_000, ge=0, description="coarse stage: first steps use landmark losses + "
        "regularisers only (paper: 2 epochs)"
    )
    amp: bool = Field(True, description="mixed precision for the encoders on CUDA (ignored on CPU)")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm; None = off")
    seed: int = 0
    checkpoint_every: int = Field(1000, ge=1)

    def batch_shape(self, stage: Literal["coarse", "detail"]) -> tuple[int, int]:
        """(N identities, K images each) for a stage."""
        if stage == "coarse":
            return self.identities_per_batch, self.images_per_identity
        return self.detail_identities_per_batch, self.detail_images_per_identity
