"""Texture sampling: UV maps -> image space."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
