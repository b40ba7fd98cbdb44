"""Detail-stage regularisers on hand-made UV maps: known values."""
from __future__ import annotations

import pytest
import torch

from recon.losses.detail import displacement_l1, erode, shading_smoothness, symmetry_loss


def test_erode_shrinks_by_one_texel_and_edges_count_as_outside():
    m = torch.zeros(1, 1, 6, 6)
    m[..., 1:5, 1:5] = 1.0
    e = erode(m)
    assert e.sum() == 4 and e[0, 0, 2:4, 2:4].sum() == 4
    assert erode(torch.ones(1, 1, 3, 3)).sum() == 1  # border texels lose their outer neighbour


def test_symmetry_loss_known_value():
    z = torch.zeros(1, 1, 6, 6)
    z[0, 0, 1, 0] = 0.2  # left column texel, mirrored by column 5 (value 0)
    visible = torch.zeros(1, 1, 6, 6)  # nothing visible: every texel counts
    # |0.2 - 0| at (1, 0) and |0 - 0.2| at (1, 5)
    assert symmetry_loss(z, visible).item() == pytest.approx(0.4)
    # All visible: the 5 x 5 erosion keeps the 2x2 centre; (1,0),(1,5) are still invisible.
    visible[...] = 1.0
    assert symmetry_loss(z, visible).item() == pytest.approx(0.4)
    z2 = torch.zeros(1, 1, 6, 6)
    z2[0, 0, 2, 2] = 0.2  # centre texel and its mirror (2, 3): both visible after erosion
    assert symmetry_loss(z2, visible).item() == pytest.approx(0.0)
    assert symmetry_loss(z2, torch.zeros(1, 1, 6, 6)).item() == pytest.approx(0.4)
    # A 4 x 4 map has no texel whose 5 x 5 neighbourhood is inside it: nothing stays visible.
    z4 = torch.zeros(1, 1, 4, 4)
    z4[0, 0, 1, 1] = 0.2
    assert symmetry_loss(z4, torch.ones(1, 1, 4, 4)).item() == pytest.approx(0.4)


def test_symmetry_gradient_does_not_flow_through_the_mirror():
    z = torch.zeros(1, 1, 2, 2, requires_grad=True)
    with torch.no_grad():
        z[0, 0, 0, 0] = 1.0
    symmetry_loss(z, torch.zeros(1, 1, 2, 2)).backward()
    assert z.grad[0, 0, 0].tolist() == [1.0, -1.0]


def test_displacement_l1_and_shading_smoothness_known_values():
    z = torch.full((2, 1, 3, 3), -0.01)
    assert displacement_l1(z).item() == pytest.approx(0.01)
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 3, 4, 4) * 0.5  # dx = 0.5, dy = 0
    assert shading_smoothness(ramp).item() == pytest.approx(0.25)
    assert shading_smoothness(torch.ones(1, 3, 5, 5)).item() == 0.0
