"""Test-time refinement (model.refine): the fit of the geometry codes to the keypoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from recon.config import FaceModelConfig, NetworkConfig, RefineConfig
from recon.deca import DECA, Codes
from recon.evaluation.alignment import aligned_error
from recon.fitting import fit_to_keypoints
from recon.flame_io import load_face_model

NET = NetworkConfig(backbone="resnet18", head="keypoints", hidden=16, n_detail=8,
                    image_size=32, uv_size=16)


def _model(steps: int = 0) -> DECA:
    torch.manual_seed(0)
    net = NET.model_copy(update={"refine": RefineConfig(steps=steps)})
    # The demo head: its identity components move the landmarks as a face's do.
    return DECA(FaceModelConfig(n_shape=20, n_exp=10), net).eval()


def _truth(model: DECA, n: int) -> tuple[Codes, torch.Tensor]:
    """Random people (shape ~ N(0, 1), small head poses) and their 68 landmarks."""
    g = torch.Generator().manual_seed(1)
    cam = torch.tensor(model.initial_camera(0.6)).expand(n, 3)
    pose = torch.cat([0.1 * torch.randn(n, 3, generator=g), torch.zeros(n, 3)], 1)
    codes = Codes(shape=torch.randn(n, model.flame.n_shape, generator=g),
                  tex=torch.zeros(n, model.albedo.n_tex), exp=torch.zeros(n, model.flame.n_exp),
                  pose=pose, cam=cam.clone(), light=torch.zeros(n, 9, 3))
    with torch.no_grad():
        return codes, model.decode(codes, with_detail=False, render=False).landmarks2d


def _start(truth: Codes, keypoints: torch.Tensor) -> Codes:
    """Where an untrained encoder starts: mean face, frontal, the truth's camera scale."""
    return truth.replace(shape=torch.zeros_like(truth.shape), pose=torch.zeros_like(truth.pose),
                         keypoints=keypoints)


def test_fit_to_exact_keypoints_finds_the_landmarks_and_the_shape():
    model = _model()
    truth, landmarks = _truth(model, 4)
    start = _start(truth, landmarks)
    with torch.no_grad():  # as inference calls it: the fit turns gradients on itself
        fitted = fit_to_keypoints(model, start, RefineConfig(steps=1000, reg_shape=1e-6,
                                                             reg_exp=1e-6))

    def landmark_error(codes: Codes) -> float:
        lmk = model.decode(codes, with_detail=False, render=False).landmarks2d
        return float((lmk - landmarks).norm(dim=-1).mean())

    face = load_face_model(FaceModelConfig()).masks["face"]  # what landmarks can see

    def shape_error(codes: Codes) -> float:
        """Mean distance of the neutral face-region vertices after a similarity alignment
        (head size and camera scale are one unknown for a weak-perspective camera)."""
        pred = model.neutral(codes.shape).vertices[:, face].double().numpy()
        true = model.neutral(truth.shape).vertices[:, face].double().numpy()
        return float(np.mean([aligned_error(p, t) for p, t in zip(pred, true)]))

    assert landmark_error(fitted) < 0.1 * landmark_error(start)
    assert shape_error(fitted) < 0.5 * shape_error(start)
    assert not fitted.shape.requires_grad
    # only the geometry moves
    for name in ("tex", "light", "keypoints"):
        assert torch.equal(getattr(fitted, name), getattr(start, name))


def test_each_image_is_fitted_on_its_own():
    model = _model()
    truth, landmarks = _truth(model, 3)
    start = _start(truth, landmarks)
    cfg = RefineConfig(steps=40)
    together = fit_to_keypoints(model, start, cfg)
    alone = fit_to_keypoints(model, start.index(torch.tensor([1])), cfg)
    assert torch.allclose(together.shape[1:2], alone.shape, atol=1e-5)
    assert torch.allclose(together.cam[1:2], alone.cam, atol=1e-5)


def test_the_prior_pulls_the_fitted_shape_towards_the_mean():
    model = _model()
    truth, landmarks = _truth(model, 2)
    start = _start(truth, landmarks)
    weak = fit_to_keypoints(model, start, RefineConfig(steps=200, reg_shape=1e-6))
    strong = fit_to_keypoints(model, start, RefineConfig(steps=200, reg_shape=1.0))
    assert strong.shape.norm() < 0.5 * weak.shape.norm()


def test_encode_refines_only_when_asked_and_configured():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    off = _model(steps=0)
    with torch.no_grad():
        assert torch.equal(off.encode(images, refine=True).shape,
                           off.encode(images, refine=False).shape)
    on = _model(steps=20)
    with torch.no_grad():
        plain = on.encode(images, with_detail=False)
        refined = on.encode(images, with_detail=False, refine=True)
        rec = on.reconstruct(images, render=False)
    assert not torch.allclose(refined.shape, plain.shape)
    assert torch.equal(refined.keypoints, plain.keypoints)
    assert torch.allclose(rec.codes.shape, refined.shape)
    lmk = [on.decode(c, with_detail=False, render=False).landmarks2d for c in (plain, refined)]
    assert ((lmk[1] - plain.keypoints).abs().mean() < (lmk[0] - plain.keypoints).abs().mean())


def test_refinement_needs_the_keypoint_head():
    with pytest.raises(ValidationError, match="refine.steps > 0 needs head 'keypoints'"):
        NetworkConfig.model_validate({**NET.model_dump(), "head": "pooled",
                                      "refine": {"steps": 5}})
    model = _model()
    truth, _ = _truth(model, 1)
    with pytest.raises(ValueError, match="needs codes with keypoints"):
        fit_to_keypoints(model, truth, RefineConfig(steps=1))
