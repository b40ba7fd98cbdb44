"""Regularisers of DECA's detail stage, on UV maps (B, C, H, W).

- :func:`symmetry_loss`: soft symmetry: where a texel is not seen, its displacement should
  match the mirrored one (``|z - flip(z)|`` with the mirror detached, summed over the invisible
  texels, i.e. the complement of the visibility mask eroded by a 5 x 5 square, as DECA's
  release; mean over the batch). Assumes a UV layout mirrored about its vertical centre line,
  as FLAME's and the demo head's.
- :func:`displacement_l1`: ``mean |z|`` (details stay small unless the photo needs them).
- :func:`shading_smoothness`: ``mean(dx^2) + mean(dy^2)`` of the UV shading's finite
  differences, DECA's release form: horizontal differences on rows 1..H-2, vertical ones on
  columns 1..W-2.

Reductions follow DECA's release (sum over texels for symmetry, means otherwise), except that
the symmetry sum is averaged over the batch where DECA sums it too (docs/model.md, "Where
wildface differs from DECA").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def erode(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Binary erosion of a (B, 1, H, W) mask in {0, 1} with a (2r+1)^2 square; outside is 0."""
    k = 2 * radius + 1
    padded = F.pad(1.0 - mask, (radius, radius, radius, radius), value=1.0)
    return 1.0 - F.max_pool2d(padded, k, stride=1)


# DECA erodes the visibility with a 5 x 5 square before taking its complement.
SYMMETRY_EROSION_RADIUS = 2


def symmetry_loss(uv_z: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """uv_z: (B, 1, H, W); visible: (B, 1, H, W) in {0, 1}. Returns a scalar."""
    invisible = 1.0 - erode((visible > 0.5).to(uv_z.dtype), SYMMETRY_EROSION_RADIUS)
    mirror = torch.flip(uv_z, dims=[-1]).detach()
    return (invisible * (uv_z - mirror).abs()).flatten(1).sum(-1).mean()


def displacement_l1(uv_z: torch.Tensor) -> torch.Tensor:
    """uv_z: (B, 1, H, W) -> scalar mean |z|."""
    return uv_z.abs().mean()


def shading_smoothness(shading: torch.Tensor) -> torch.Tensor:
    """shading: (B, C, H, W) -> scalar mean squared horizontal + vertical differences."""
    dx = shading[..., 1:-1, 1:] - shading[..., 1:-1, :-1]
    dy = shading[..., 1:, 1:-1] - shading[..., :-1, 1:-1]
    return dx.pow(2).mean() + dy.pow(2).mean()
