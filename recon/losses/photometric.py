"""Masked photometric L1 (DECA's L_pho), in image space (coarse) or UV space (detail).

``mean(mask * |pred - target|)`` over batch, channels and pixels, as DECA's release reduces it
(so its weights apply unchanged). The coarse stage compares the LIT render (albedo x SH
shading), as the paper: DECA's public release compares an unlit render since a June 2022
change, which leaves the light codes untrained; ``LossConfig.photometric_render = 'albedo'``
does as that release.

Saturation: a photo clips at 1 (an over-exposed pixel only says "at least this bright"), a
render does not. Where the photo is saturated (``>= SATURATED``), a render brighter than it is
no error; only a darker one is. Without this, over-exposed skin pulls the geometry towards
shapes whose shading is darker there (measured on the synthetic set: at the ground-truth
parameters the plain L1 was 0.091 and preferred a wrong shape; 0.044 and a minimum with this).
"""
from __future__ import annotations

import torch

# An 8-bit photo's top level, less half a step (bilinear crops blur it slightly).
SATURATED = 254.5 / 255.0


def photometric_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     saturation: bool = True) -> torch.Tensor:
    """pred, target: (B, 3, H, W); mask: (B, 1, H, W) in [0, 1]. Returns a scalar.
    ``saturation=False``: DECA's plain ``mean(mask * |pred - target|)``."""
    if pred.shape != target.shape or mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"photometric_loss: shapes differ: pred {tuple(pred.shape)}, target "
            f"{tuple(target.shape)}, mask {tuple(mask.shape)}"
        )
    diff = pred - target
    if saturation:
        diff = torch.where(target >= SATURATED, diff.clamp(max=0), diff)
    return (mask * diff.abs()).mean()
