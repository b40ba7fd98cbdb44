"""DECA's landmark losses: known values, weights, finite gradients at closed eyes/lips."""
from __future__ import annotations

import torch

from recon.landmarks import deca_landmark_weights
from recon.losses.landmarks import eye_closure_loss, lip_closure_loss, weighted_landmark_loss


def _grid_landmarks(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 68, 2, generator=g, dtype=torch.float64) * 2 - 1


def test_weighted_landmark_zero_when_equal():
    lmk = _grid_landmarks()
    assert weighted_landmark_loss(lmk, lmk.clone()).item() == 0.0


def test_weighted_landmark_known_value_uses_deca_weights():
    target = _grid_landmarks(1)
    pred = target.clone()
    pred[0, 48, 0] += 0.3  # mouth corner, weight 3
    pred[0, 0, 1] -= 0.1  # jaw, weight 1
    w = deca_landmark_weights().astype("float64")
    expected = (3.0 * 0.3 + 1.0 * 0.1) / (2.0 * w.sum())
    assert abs(weighted_landmark_loss(pred, target).item() - expected) < 1e-12
    assert w[48] == 3.0 and w[5] == 2.0 and w[27] == 1.5 and w[60] == 1.5 and w[17] == 1.0


def test_weighted_landmark_confidence_drops_points_and_batch_mean():
    target = _grid_landmarks(2)
    pred = target.clone()
    pred[0, 10] += 1.0  # only wrong point of image 0
    conf = torch.ones(2, 68, dtype=torch.float64)
    conf[0, 10] = 0.0
    assert weighted_landmark_loss(pred, target, conf).item() == 0.0
    # without confidence: image 0's value / 2 (batch mean)
    w = deca_landmark_weights().astype("float64")
    expected = (w[10] * 2.0 / (2.0 * w.sum())) / 2.0
    assert abs(weighted_landmark_loss(pred, target).item() - expected) < 1e-12


def test_weighted_landmark_gradcheck():
    target = _grid_landmarks(2)
    pred = (target + 0.05 * torch.randn_like(target)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: weighted_landmark_loss(p, target), (pred,))


def test_eye_and_lip_closure_known_values():
    target = torch.zeros(1, 68, 2, dtype=torch.float64)
    pred = torch.zeros(1, 68, 2, dtype=torch.float64)
    # target: upper lids 0.1 above lower lids; prediction: eyes closed
    for up, low in ((37, 41), (38, 40), (43, 47), (44, 46)):
        target[0, up, 1] = -0.1
    assert abs(eye_closure_loss(pred, target).item() - 0.1) < 1e-6
    # lips: target closed, prediction opened by 0.2 on one of 3 pairs
    pred[0, 62, 1] = -0.2
    assert abs(lip_closure_loss(pred, target).item() - 0.2 / 3) < 1e-6


def test_closure_gradients_finite_at_zero_distance():
    pred = torch.zeros(2, 68, 2, requires_grad=True)
    target = torch.zeros(2, 68, 2)
    target[:, 61:68, 1] = 0.05
    (eye_closure_loss(pred, target) + lip_closure_loss(pred, target)).backward()
    assert torch.isfinite(pred.grad).all()
