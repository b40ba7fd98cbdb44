"""Masked photometric L1 and the code regularisers: known values."""
from __future__ import annotations

import pytest
import torch

from recon.losses.photometric import photometric_loss
from recon.losses.regularizers import code_l2, light_grey_loss


def test_photometric_known_value_and_mask():
    pred = torch.zeros(2, 3, 4, 4)
    target = torch.zeros(2, 3, 4, 4)
    target[0, :, :2] = 0.5  # top half of image 0 differs by 0.5
    mask = torch.ones(2, 1, 4, 4)
    assert abs(photometric_loss(pred, target, mask).item() - 0.5 * 0.5 / 2) < 1e-7
    mask[0, :, :2] = 0.0  # masked out: no loss
    assert photometric_loss(pred, target, mask).item() == 0.0


def test_photometric_gradient_only_inside_mask():
    pred = torch.rand(1, 3, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1, 1] = 1.0
    photometric_loss(pred, torch.zeros(1, 3, 4, 4), mask).backward()
    grad = pred.grad.abs().sum(1)[0]
    assert grad[1, 1] > 0 and grad.sum() == grad[1, 1]


def test_photometric_saturated_photo_only_penalises_a_darker_render():
    # photo: channel 0 saturated (1.0), channel 1 at 0.5; render 1.5 / 0.8 everywhere
    target = torch.zeros(1, 3, 2, 2)
    target[:, 0], target[:, 1] = 1.0, 0.5
    mask = torch.ones(1, 1, 2, 2)
    brighter = torch.zeros(1, 3, 2, 2)
    brighter[:, 0], brighter[:, 1] = 1.5, 0.8
    # saturated channel: no error; the other: |0.8 - 0.5|, averaged over 3 channels
    assert photometric_loss(brighter, target, mask).item() == pytest.approx(0.3 / 3)
    darker = brighter.clone()
    darker[:, 0] = 0.6  # darker than a saturated pixel: an error of 0.4
    assert photometric_loss(darker, target, mask).item() == pytest.approx((0.4 + 0.3) / 3)
    pred = brighter.clone().requires_grad_(True)
    photometric_loss(pred, target, mask).backward()
    assert pred.grad[:, 0].abs().sum() == 0 and pred.grad[:, 1].abs().min() > 0


def test_photometric_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes"):
        photometric_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 4), torch.ones(1, 1, 4, 4))


def test_code_l2_known_value():
    code = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    assert code_l2(code).item() == pytest.approx(((1 + 4) / 2 + 9 / 2) / 2)


def test_light_grey_loss_zero_for_grey_and_known_value():
    light = torch.zeros(1, 9, 3)
    light[0, :, :] = torch.linspace(0, 1, 9)[:, None]  # same value in R, G, B
    assert light_grey_loss(light).item() == 0.0
    light[0, 0] = torch.tensor([1.0, 2.0, 3.0])  # deviations -1, 0, 1 on one coefficient
    assert light_grey_loss(light).item() == pytest.approx(2.0 / 27)
