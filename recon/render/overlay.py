"""Landmark overlay for the images a person looks at."""
from __future__ import annotations

import torch

from recon.render.cameras import image_to_pixel


def draw_landmarks(images: torch.Tensor, landmarks: torch.Tensor,
                   color: tuple[float, float, float] = (0.0, 1.0, 0.0), radius: int = 1
                   ) -> torch.Tensor:
    """Draw landmarks as filled squares of side ``2 radius + 1`` pixels.

    images: (B, 3, H, W); landmarks: (B, N, 2) in the [-1, 1] image convention (x right,
    y down; e.g. ``ndc_to_image(verts_ndc)[..., :2]``). Points outside the image are not
    drawn. Returns a new (B, 3, H, W) tensor (no gradient).
    """
    B, C, H, W = images.shape
    out = images.detach().clone()
    pix = image_to_pixel(landmarks.detach().to(torch.float32), H, W).round().long()
    offs = torch.arange(-radius, radius + 1, device=images.device)
    col = (pix[..., 0, None, None] + offs[None, :]).expand(B, -1, offs.numel(), -1)
    row = (pix[..., 1, None, None] + offs[:, None]).expand(B, -1, -1, offs.numel())
    b = torch.arange(B, device=images.device).view(B, 1, 1, 1).expand_as(col)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    b, row, col = b[inside], row[inside], col[inside]
    value = torch.tensor(color, dtype=out.dtype, device=out.device)
    for c in range(C):
        out[b, c, row, col] = value[c]
    return out
