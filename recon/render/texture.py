"""Texture sampling: UV maps -> image space."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recon.render import numba_ops


def uv_to_grid(uv: torch.Tensor) -> torch.Tensor:
    """Texture coordinates (u right, v UP, in [0, 1]; OBJ ``vt``) -> ``grid_sample``
    coordinates (x = 2u - 1, y = 1 - 2v): row 0 of a UV map is v = 1. uv: (..., 2)."""
    return torch.stack([2.0 * uv[..., 0] - 1.0, 1.0 - 2.0 * uv[..., 1]], dim=-1)


def sample_texture(texture: torch.Tensor, uv_grid: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of a UV map at each pixel.

    texture: (B, C, Huv, Wuv); uv_grid: (B, H, W, 2) ``grid_sample`` coordinates (e.g. the
    renderer's ``uv_grid``). Returns (B, C, H, W) (``align_corners=False``, border padding).
    """
    return F.grid_sample(texture, uv_grid.to(texture.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


def sample_texture_packed(texture: torch.Tensor, grid: torch.Tensor, batch: torch.Tensor
                          ) -> torch.Tensor:
    """``sample_texture`` at scattered points: the covered pixels of a packed render.

    texture: (B, C, Huv, Wuv), or (1, C, Huv, Wuv): one map shared by every image;
    grid: (P, 2) ``grid_sample`` coordinates; batch: (P,) long, the map each point reads.
    Returns (P, C), equal to ``sample_texture`` at those pixels (bilinear,
    ``align_corners=False``, border padding).

    One ``grid_sample`` over the maps stacked vertically, (1, C, B*Huv, Wuv): each point's
    row coordinate is clamped into its own map first (what border padding does), so no
    sample blends two maps; the work is per covered pixel, not per image pixel.
    """
    B, C, H, W = texture.shape
    g = grid.to(texture.dtype)
    if numba_ops.usable(texture, g):
        return numba_ops.SampleTexture.apply(texture, g, batch,
                                             numba_ops.image_segments(batch, B))
    # texel coordinates (centres at integers), clamped as border padding clamps them
    px = ((g[:, 0] + 1.0) * W - 1.0).mul(0.5).clamp(0.0, W - 1.0)
    py = ((g[:, 1] + 1.0) * H - 1.0).mul(0.5).clamp(0.0, H - 1.0)
    if B > 1:
        py = py + batch.to(g.dtype) * H
    stacked_grid = torch.stack([(2.0 * px + 1.0) / W - 1.0, (2.0 * py + 1.0) / (B * H) - 1.0],
                               dim=-1)
    stacked = texture.transpose(0, 1).reshape(1, C, B * H, W)
    out = F.grid_sample(stacked, stacked_grid.view(1, 1, -1, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)  # (1, C, 1, P)
    return out.view(C, -1).t()
