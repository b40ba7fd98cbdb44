"""The identity-network interface used by DECA's identity loss (the backends derive it; the
factory that picks one is :mod:`recon.identity.build`).

Every backend is an :class:`IdentityNetwork`: a frozen ``nn.Module`` whose
``forward(images: (B, 3, H, W) RGB in [0, 1]) -> (B, D)`` returns L2-normalised
embeddings and is differentiable w.r.t. the images. It does its own centre crop, resize to
the backbone's input size and normalisation, so callers pass the 224x224 face crops
(rendered or real) as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IdentityNetwork(nn.Module):
    """Frozen face-recognition backbone behind one interface.

    Subclasses set ``input_size`` and implement :meth:`normalise` (pixel normalisation of
    (B, 3, input_size, input_size) RGB in [0, 1]) and :meth:`embed` (backbone -> (B, D)).
    """

    embedding_dim: int
    input_size: int

    def __init__(self, crop_fraction: float = 1.0) -> None:
        super().__init__()
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.crop_fraction = crop_fraction

    def freeze(self) -> IdentityNetwork:
        """No parameter takes gradients; eval mode (batch norm uses its running stats)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> IdentityNetwork:
        # Always eval: a frozen recogniser must not update batch-norm statistics even when
        # a parent module is put in training mode.
        return super().train(False)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, input_size, input_size): centre crop, then bilinear resize
        (antialiased when shrinking)."""
        _, _, h, w = images.shape
        side = min(h, w) * self.crop_fraction
        ch, cw = min(h, round(side)), min(w, round(side))
        top, left = (h - ch) // 2, (w - cw) // 2
        images = images[:, :, top:top + ch, left:left + cw]
        if (ch, cw) == (self.input_size, self.input_size):
            return images
        return F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                             align_corners=False, antialias=max(ch, cw) > self.input_size)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) RGB in [0, 1] -> (B, D) unit-norm embeddings."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB images, got {tuple(images.shape)}")
        x = self.normalise(self.resize(images))
        return F.normalize(self.embed(x), dim=1)
