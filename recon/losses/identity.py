"""DECA's identity loss: 1 - cosine similarity of face-recognition embeddings.

The recogniser is any :class:`recon.identity.network.IdentityNetwork` (frozen; embeddings
L2-normalised). As in DECA, the rendered face is pasted onto the real image's background
where ``mask`` is 0, so the recogniser sees a complete photo, and the real image's
embedding is a constant target (no gradient).
"""
from __future__ import annotations

import torch
from torch import nn


def identity_loss(net: nn.Module, rendered: torch.Tensor, real: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``1 - cos(net(rendered'), net(real))``.

    rendered, real: (B, 3, H, W) RGB in [0, 1]; mask: (B, 1, H, W) in [0, 1], 1 where the
    render covers the face (``rendered' = mask * rendered + (1 - mask) * real``), or None to
    use ``rendered`` as it is. Returns a scalar in [0, 2]; 0 for identical inputs."""
    if rendered.shape != real.shape:
        raise ValueError(f"rendered {tuple(rendered.shape)} and real {tuple(real.shape)} differ")
    if mask is not None:
        rendered = mask * rendered + (1.0 - mask) * real
    with torch.no_grad():
        target = net(real)
    pred = net(rendered)
    # Embeddings are unit vectors, so the dot product is the cosine.
    return (1.0 - (pred * target).sum(dim=1)).mean()
