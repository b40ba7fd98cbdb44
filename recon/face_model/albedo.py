"""Linear albedo model in UV space (FLAME-texture style): mean + basis @ coefficients."""
from __future__ import annotations

import torch
from torch import nn

from recon.face_model.face_assets import FaceModelAssets


class AlbedoModel(nn.Module):
    """``forward(tex (B, n_tex)) -> (B, 3, H, W)`` UV albedo in [0, 1] (clamped)."""

    def __init__(self, assets: FaceModelAssets, n_tex: int = 50) -> None:
        super().__init__()
        if not 0 < n_tex <= assets.n_tex_total:
            raise ValueError(f"n_tex={n_tex}: model '{assets.name}' has {assets.n_tex_total} albedo components")
        self.n_tex = n_tex
        H, W, _ = assets.albedo_mean.shape
        self.size = (H, W)
        mean = torch.as_tensor(assets.albedo_mean, dtype=torch.float32).permute(2, 0, 1).contiguous()
        basis = torch.as_tensor(assets.albedo_basis[..., :n_tex], dtype=torch.float32)
        self.register_buffer("mean", mean)  # (3, H, W)
        self.register_buffer("basis", basis.permute(3, 2, 0, 1).reshape(n_tex, -1).contiguous())  # (K, 3*H*W)

    def forward(self, tex: torch.Tensor) -> torch.Tensor:
        if tex.dim() != 2 or tex.shape[1] != self.n_tex:
            raise ValueError(f"tex must be (B, {self.n_tex}), got {tuple(tex.shape)}")
        H, W = self.size
        albedo = self.mean[None] + (tex.to(self.basis.dtype) @ self.basis).reshape(-1, 3, H, W)
        return albedo.clamp(0.0, 1.0)
