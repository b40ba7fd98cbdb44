"""ID-MRF loss (Wang et al. 2018, used by DECA's detail stage) on VGG19 features.

For generated features G (C x N_g positions) and target features T (C x N_t), both centred on
the target's per-channel mean (over its positions, as Wang et al.) and L2-normalised per
position:
``d_ij = (1 - cos(g_i, t_j)) / 2``, relative ``r_ij = d_ij / (min_j d_ij + eps)``,
contextual similarity ``cx_ij = softmax_j(-r_ij / h)`` (h = 0.5), and
``L = -log(mean_j max_i cx_ij)``. DECA: ``L = 2 L(relu4_2) + L(relu3_2)``, averaged over images
(DECA sums over them). ``centre="channels"`` centres as DECA's release does instead: each
position on its mean over the channels (``torch.mean(tar, 1)`` on NCHW features).

Numerically safe where DECA's release produced NaNs: normalisation with an epsilon (zero
features), a softmax instead of a bare exp / sum, and ``mean_j max_i cx_ij >= 1 / N_t > 0``
so the log is always finite. Each image's similarity matrix (N_g x N_t) is recomputed in the
backward pass instead of stored (activation checkpointing), bounding memory at 256 x 256.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_WEIGHTS = {"relu3_2": 1.0, "relu4_2": 2.0}
_BANDWIDTH = 0.5
_EPS = 1e-5


def _image_mrf(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """g: (C, N_g), t: (C, N_t), both normalised -> scalar -log(mean_j max_i cx_ij)."""
    d = (1.0 - g.transpose(0, 1) @ t) / 2.0  # (N_g, N_t)
    rel = d / (d.min(dim=1, keepdim=True).values + _EPS)
    cx = torch.softmax(-rel / _BANDWIDTH, dim=1)
    return -torch.log(cx.max(dim=0).values.mean().clamp_min(1e-12))


Centre = Literal["spatial", "channels"]


def mrf_features_loss(gen: torch.Tensor, tar: torch.Tensor, centre: Centre = "spatial"
                      ) -> torch.Tensor:
    """gen, tar: (B, C, H, W) feature maps -> scalar ID-MRF term, mean over the batch.
    centre: "spatial" (per-channel mean of the target) or "channels" (DECA's release)."""
    if gen.shape[:2] != tar.shape[:2]:
        raise ValueError(f"feature shapes differ: {tuple(gen.shape)} vs {tuple(tar.shape)}")
    g = gen.float().flatten(2)
    t = tar.float().flatten(2)
    mu = t.mean(-1, keepdim=True) if centre == "spatial" else t.mean(1, keepdim=True)
    g = F.normalize(g - mu, dim=1, eps=_EPS)
    t = F.normalize(t - mu, dim=1, eps=_EPS)
    terms = []
    for b in range(g.shape[0]):
        if torch.is_grad_enabled() and (g.requires_grad or t.requires_grad):
            terms.append(checkpoint(_image_mrf, g[b], t[b], use_reentrant=False))
        else:
            terms.append(_image_mrf(g[b], t[b]))
    return torch.stack(terms).mean()


class IDMRFLoss(nn.Module):
    """ID-MRF on a feature network's ``relu3_2`` and ``relu4_2``.

    ``features``: a module mapping images (B, 3, H, W) in [0, 1] to a dict holding at least
    those layers, e.g. :class:`recon.perceptual.VGG19Features`. Its parameters are frozen here.
    ``centre``: as :func:`mrf_features_loss` (``LossConfig.mrf_centre``).
    """

    def __init__(self, features: nn.Module | Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
                 centre: Centre = "spatial") -> None:
        super().__init__()
        self.features = features
        self.centre = centre
        if isinstance(features, nn.Module):
            features.requires_grad_(False)
            features.eval()

    def train(self, mode: bool = True) -> "IDMRFLoss":
        # The feature network always runs in eval mode (fixed statistics, no dropout).
        super().train(mode)
        if isinstance(self.features, nn.Module):
            self.features.eval()
        return self

    def forward(self, gen: torch.Tensor, tar: torch.Tensor) -> torch.Tensor:
        """gen, tar: (B, 3, H, W) images in [0, 1]; gradients flow to ``gen`` only."""
        f_gen = self.features(gen)
        with torch.no_grad():
            f_tar = self.features(tar.detach())
        return sum(w * mrf_features_loss(f_gen[k], f_tar[k], self.centre)
                   for k, w in LAYER_WEIGHTS.items())
