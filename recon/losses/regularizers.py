"""Code regularisers of DECA's coarse stage.

- :func:`code_l2`: ``sum(x^2) / 2`` per image, averaged over the batch (DECA's release sums over
  the batch as well, which makes its weight depend on the batch size; the default weights,
  ``LossConfig.reg_*`` = 3.2e-3, are its 1e-4 x its batch of 32, the same strength per image).
- :func:`light_grey_loss`: squared deviation of each SH coefficient from its mean over the RGB
  channels (pushes towards white light so colour goes into the albedo), mean over all entries.
"""
from __future__ import annotations

import torch


def code_l2(code: torch.Tensor) -> torch.Tensor:
    """code: (B, D) -> scalar ``mean_b sum_d x^2 / 2``."""
    return code.pow(2).sum(-1).mean() / 2.0


def light_grey_loss(light: torch.Tensor) -> torch.Tensor:
    """light: (B, 9, 3) SH coefficients x RGB -> scalar."""
    return (light - light.mean(-1, keepdim=True)).pow(2).mean()
