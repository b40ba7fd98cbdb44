"""Test-time refinement (model.refine): the fit of the codes to the keypoints and the photo."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from recon.inference import fitting, reconstruct
from recon.config import FaceModelConfig, NetworkConfig, RefineConfig
from recon.deca import DECA, Codes
from recon.evaluation.alignment import aligned_error
from recon.inference.fitting import refine_codes
from recon.face_model.flame_io import load_face_model
from recon.inference.reconstruct import FaceReconstructor, ModelInfo

NET = NetworkConfig(backbone="resnet18", head="keypoints", hidden=16, n_detail=8,
                    image_size=32, uv_size=16)


def _model(steps: int = 0, image_size: int = 32, n_tex: int = 50) -> DECA:
    torch.manual_seed(0)
    net = NET.model_copy(update={"refine": RefineConfig(steps=steps), "image_size": image_size})
    # The demo head: its identity components move the landmarks as a face's do.
    return DECA(FaceModelConfig(n_shape=20, n_exp=10, n_tex=n_tex), net).eval()


def _truth(model: DECA, n: int) -> tuple[Codes, torch.Tensor, torch.Tensor]:
    """Random people (shape and albedo ~ N(0, 1), small head poses, a lamp from the upper
    left) -> their codes, 68 landmarks (n, 68, 2) and renders (n, 3, S, S) on black."""
    g = torch.Generator().manual_seed(1)
    cam = torch.tensor(model.initial_camera(0.6)).expand(n, 3)
    pose = torch.cat([0.1 * torch.randn(n, 3, generator=g), torch.zeros(n, 3)], 1)
    light = torch.zeros(n, 9, 3)
    light[:, 0], light[:, 1], light[:, 3] = 3.0, 0.6, 0.6
    codes = Codes(shape=torch.randn(n, model.flame.n_shape, generator=g),
                  tex=torch.randn(n, model.albedo.n_tex, generator=g),
                  exp=torch.zeros(n, model.flame.n_exp), pose=pose, cam=cam.clone(), light=light)
    with torch.no_grad():
        rec = model.decode(codes, with_detail=False)
    return codes, rec.landmarks2d, rec.images.clamp(0, 1)


def _start(truth: Codes, keypoints: torch.Tensor) -> Codes:
    """Where an untrained encoder starts: mean face and albedo, frontal, ambient light, the
    truth's camera scale."""
    light = torch.zeros_like(truth.light)
    light[:, 0] = 3.0
    return truth.replace(shape=torch.zeros_like(truth.shape), pose=torch.zeros_like(truth.pose),
                         tex=torch.zeros_like(truth.tex), light=light, keypoints=keypoints)


def _landmark_error(model: DECA, codes: Codes, landmarks: torch.Tensor) -> float:
    lmk = model.decode(codes, with_detail=False, render=False).landmarks2d
    return float((lmk - landmarks).norm(dim=-1).mean())


@functools.cache
def _face_region() -> np.ndarray:
    """The demo head's face-region vertex indices: what the fit can see."""
    return load_face_model(FaceModelConfig()).masks["face"]


def _shape_error(model: DECA, codes: Codes, truth: Codes) -> float:
    """Mean distance of the neutral face-region vertices after a similarity alignment (head
    size and camera scale are one unknown for a weak-perspective camera)."""
    face = _face_region()
    pred = model.neutral(codes.shape).vertices[:, face].double().numpy()
    true = model.neutral(truth.shape).vertices[:, face].double().numpy()
    return float(np.mean([aligned_error(p, t) for p, t in zip(pred, true)]))


def test_fit_to_exact_keypoints_finds_the_landmarks_and_the_shape():
    model = _model()
    truth, landmarks, images = _truth(model, 4)
    start = _start(truth, landmarks)
    with torch.no_grad():  # as inference calls it: the fit turns gradients on itself
        fitted = refine_codes(model, start, images, RefineConfig(
            steps=600, lr=2e-2, photometric=0, reg_shape=1e-6, reg_exp=1e-6))
    # measured: landmark error 0.022 x the start's, shape error 0.46 x (1000 steps at the
    # default rate: 0.017 and 0.42; 300 steps at 2e-2: 0.51, too few for the shape)
    assert _landmark_error(model, fitted, landmarks) < 0.1 * _landmark_error(model, start, landmarks)
    assert _shape_error(model, fitted, truth) < 0.5 * _shape_error(model, start, truth)
    assert not fitted.shape.requires_grad
    # keypoints only: only the geometry moves
    for name in ("tex", "light", "keypoints"):
        assert torch.equal(getattr(fitted, name), getattr(start, name))


def test_the_photo_corrects_keypoints_that_lean_to_the_mean_face():
    """The keypoint head's errors lean towards the mean face (docs/training.md); its points
    here are the truth's landmarks pulled halfway to the mean face's. Fitted to them alone
    the shape keeps that lean; with the photometric term, the renders of the true people pull
    the shape, albedo and light back towards the truth. 10 albedo components: each
    photometric step reads the whole UV basis, 5 times less of it than with 50."""
    model = _model(image_size=64, n_tex=10)
    truth, landmarks, images = _truth(model, 3)
    with torch.no_grad():
        mean_face = model.decode(truth.replace(shape=torch.zeros_like(truth.shape)),
                                 with_detail=False, render=False).landmarks2d
    start = _start(truth, 0.5 * (landmarks + mean_face))
    cfg = RefineConfig(steps=600, lr=2e-2, photometric=0, reg_shape=1e-6)
    keypoints_only = refine_codes(model, start, images, cfg)
    with_photo = refine_codes(model, start, images, cfg.model_copy(update={"photometric": 2.0}))
    errors = [_shape_error(model, c, truth) for c in (start, keypoints_only, with_photo)]
    # measured: 2.09e-3 (start), 1.67e-3 (keypoints only), 1.12e-3 (with the photo); albedo
    # error 0.44 x the start's, light 0.61 x (300 steps at 3e-2: the photo gains 0.79 x only)
    assert errors[1] < 0.85 * errors[0]
    assert errors[2] < 0.75 * errors[1]
    # albedo and light are fitted too (their scales trade off, so light moves less)
    assert (with_photo.tex - truth.tex).norm() < 0.5 * (start.tex - truth.tex).norm()
    assert (with_photo.light - truth.light).norm() < 0.8 * (start.light - truth.light).norm()


@pytest.mark.parametrize("photometric", [0.0, 2.0])
def test_each_image_is_fitted_on_its_own(photometric):
    model = _model()
    truth, landmarks, images = _truth(model, 3)
    start = _start(truth, landmarks)
    cfg = RefineConfig(steps=40, photometric=photometric)
    together = refine_codes(model, start, images, cfg)
    alone = refine_codes(model, start.index(torch.tensor([1])), images[1:2], cfg)
    # Up to float rounding: the batched renderer sums in another order, and Adam's
    # normalised steps carry that to ~1e-4 in 40 steps; coupled images differ by far more.
    for name in ("shape", "cam", "tex", "light"):
        assert torch.allclose(getattr(together, name)[1:2], getattr(alone, name), atol=1e-3)


def test_the_prior_pulls_the_fitted_shape_towards_the_mean():
    model = _model()
    truth, landmarks, images = _truth(model, 2)
    start = _start(truth, landmarks)
    weak = refine_codes(model, start, images, RefineConfig(steps=200, reg_shape=1e-6))
    strong = refine_codes(model, start, images, RefineConfig(steps=200, reg_shape=1.0))
    assert strong.shape.norm() < 0.5 * weak.shape.norm()


def _reconstructor(model: DECA) -> FaceReconstructor:
    info = ModelInfo(checkpoint="-", stage="coarse", step=0, face_model=model.face_model_name,
                     face_model_fingerprint="-", backbone=NET.backbone)
    return FaceReconstructor(model, 1.6, info)


def test_the_model_never_refines(monkeypatch):
    """Encoding is the networks alone, whatever ``model.refine`` says: training steps and
    training figures (which call encode / reconstruct / forward) never run the fit."""
    def fail(*args, **kwargs):
        raise AssertionError("the model ran the test-time refinement")

    monkeypatch.setattr(fitting, "refine_codes", fail)
    monkeypatch.setattr(reconstruct, "refine_codes", fail)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = _model(steps=20)
    with torch.no_grad():
        codes = model.encode(images, with_detail=False)
        rec = model(images)  # = reconstruct(images): what the training figures draw
    assert torch.equal(rec.codes.shape, codes.shape)


def test_fitting_needs_nothing_from_the_model_module():
    """recon.deca's model is handed in (duck-typed): no import of recon.deca, lazy or for
    type checking, so the two modules form no import circle."""
    tree = ast.parse(Path(fitting.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "recon.deca" not in imported and "recon" in {m.split(".")[0] for m in imported}


@pytest.mark.parametrize("steps", [0, 20])
def test_reconstruction_refines_when_configured(monkeypatch, steps):
    """The reconstructor (``wildface reconstruct``, the registered model, evaluation) calls
    the fit when ``model.refine.steps`` > 0, with the model's own refinement config, and
    the refined codes are closer to the keypoints than the encoder's."""
    calls = []

    def spy(model, codes, images, cfg):
        calls.append(cfg)
        return refine_codes(model, codes, images, cfg)

    monkeypatch.setattr(reconstruct, "refine_codes", spy)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = _model(steps=steps)
    recon = _reconstructor(model)
    with torch.no_grad():
        plain = model.encode(images)
        refined = recon.encode(images)  # what reconstruct() decodes
    if steps == 0:
        assert calls == []
        assert torch.equal(refined.shape, plain.shape)
        return
    assert calls == [model.network_config.refine]
    assert not torch.allclose(refined.shape, plain.shape)
    assert not torch.allclose(refined.light, plain.light)  # the photometric phase ran
    assert torch.equal(refined.keypoints, plain.keypoints)
    assert torch.equal(refined.detail, plain.detail)  # the detail code is the encoder's
    lmk = [model.decode(c, with_detail=False, render=False).landmarks2d for c in (plain, refined)]
    assert ((lmk[1] - plain.keypoints).abs().mean() < (lmk[0] - plain.keypoints).abs().mean())


def test_refinement_needs_the_keypoint_head():
    with pytest.raises(ValidationError, match="refine.steps > 0 needs head 'keypoints'"):
        NetworkConfig.model_validate({**NET.model_dump(), "head": "pooled",
                                      "refine": {"steps": 5}})
    model = _model()
    truth, _, images = _truth(model, 1)
    with pytest.raises(ValueError, match="needs codes with keypoints"):
        refine_codes(model, truth, images, RefineConfig(steps=1))
