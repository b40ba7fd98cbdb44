"""Masked photometric L1 (DECA's L_pho), in image space (coarse) or UV space (detail).

``mean(mask * |pred - target|)`` over batch, channels and pixels, as DECA's release reduces it
(so its weights apply unchanged). ``pred`` must be the LIT render (albedo x SH shading): DECA's
public release compares an unlit render since a 2022 change, a defect not repeated here.
"""
from __future__ import annotations

import torch


def photometric_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target: (B, 3, H, W); mask: (B, 1, H, W) in [0, 1]. Returns a scalar."""
    if pred.shape != target.shape or mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"photometric_loss: shapes differ: pred {tuple(pred.shape)}, target "
            f"{tuple(target.shape)}, mask {tuple(mask.shape)}"
        )
    return (mask * (pred - target).abs()).mean()
