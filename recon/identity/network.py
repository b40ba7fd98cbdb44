"""The identity-network interface used by DECA's identity loss, and its factory.

Every backend is an :class:`IdentityNetwork`: a frozen ``nn.Module`` whose
``forward(images: (B, 3, H, W) RGB in [0, 1]) -> (B, D)`` returns L2-normalised
embeddings and is differentiable w.r.t. the images. It does its own centre crop, resize to
the backbone's input size and normalisation, so callers pass the 224x224 face crops
(rendered or real) as they are.

``build_identity_network(cfg, device)`` builds the configured backend, or returns None when
``cfg.backend == "none"``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recon.config import IdentityConfig

log = logging.getLogger(__name__)

# Model-store entry used when ``IdentityConfig.weights`` is not set, per backend.
STORE_NAMES = {
    "facenet": "facenet-casia-webface",
    "vggface2": "vggface2-resnet50",
    "arcface": "arcface",
}


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


def _resolve_weights(cfg: IdentityConfig) -> Path:
    """The weights file for ``cfg``: an explicit path (checked against ``weights_sha256``
    when given), else the backend's model-store entry (checked against the manifest)."""
    # Imported here: the store is stdlib-only local code (+ infra.storage for s3://), and
    # only this resolution step needs it.
    from infra.model_store import ModelStore, verify_file

    if cfg.weights is not None:
        path = Path(cfg.weights).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"identity.weights: file not found: {path}")
        if cfg.weights_sha256:
            verify_file(path, cfg.weights_sha256, label=f"identity.weights ({path})")
        return path
    return ModelStore(cfg.store).path(STORE_NAMES[cfg.backend])


def build_identity_network(cfg: IdentityConfig, device: torch.device | str = "cpu"
                           ) -> IdentityNetwork | None:
    """The configured, frozen identity network on ``device``; None if the backend is 'none'.

    Weights always come from local files (config path or model store), never a download."""
    if cfg.backend == "none":
        return None
    path = _resolve_weights(cfg)
    options = {} if cfg.crop_fraction is None else {"crop_fraction": cfg.crop_fraction}
    net: IdentityNetwork
    if cfg.backend == "facenet":
        from recon.identity.facenet import FaceNetIdentity

        net = FaceNetIdentity.from_file(path, **options)
    elif cfg.backend == "vggface2":
        from recon.identity.vggface2 import VGGFace2Identity

        net = VGGFace2Identity.from_file(path, **options)
    else:
        from recon.identity.arcface import ArcFaceIdentity

        net = ArcFaceIdentity.from_file(path, **options)
    log.info("identity network: %s (%d-d) from %s", cfg.backend, net.embedding_dim, path)
    return net.freeze().to(device)
