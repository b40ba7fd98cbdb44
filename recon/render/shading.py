"""Lighting: spherical harmonics (DECA's 9 x RGB) and DECA's grey directional lights."""
from __future__ import annotations

import math

import torch

from recon.render import numba_ops

_PI = math.pi
# Standard constants of the first 9 real SH basis functions, each multiplied by the
# Lambertian convolution factor (pi, 2pi/3, pi/4), as DECA.
SH_CONSTANTS = (
    1.0 / math.sqrt(4 * _PI),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (3 / 2) * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (1 / 2) * math.sqrt(5 / (4 * _PI)),
)

# DECA's shape-render lights: 5 directions (toward the lights), intensity 1.7, averaged.
GREY_LIGHT_DIRECTIONS = ((-1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (-1.0, -1.0, 1.0),
                         (1.0, -1.0, 1.0), (0.0, 0.0, 1.0))
GREY_LIGHT_INTENSITY = 1.7
GREY_ALBEDO = 180.0 / 255.0


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """normals: (B, 3, ...) -> (B, 9, ...) scaled SH basis
    [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1] x ``SH_CONSTANTS``."""
    x, y, z = normals[:, 0], normals[:, 1], normals[:, 2]
    basis = torch.stack([torch.ones_like(x), x, y, z, x * y, x * z, y * z,
                         x * x - y * y, 3.0 * z * z - 1.0], dim=1)
    c = torch.tensor(SH_CONSTANTS, dtype=normals.dtype, device=normals.device)
    return basis * c.view(1, 9, *([1] * (normals.dim() - 2)))


def sh_shading(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """Irradiance of 9-band SH lighting (DECA's ``add_SHlight``).

    normals: (B, 3, H, W) (world space, unit length where covered); sh: (B, 9, 3).
    Returns (B, 3, H, W) = sum_k sh[:, k, c] * basis_k(n).
    """
    if sh.dim() != 3 or sh.shape[1:] != (9, 3):
        raise ValueError(f"sh must be (B, 9, 3), got {tuple(sh.shape)}")
    B, _, H, W = normals.shape
    basis = sh_basis(normals).reshape(B, 9, H * W)
    return torch.bmm(sh.transpose(1, 2).to(basis.dtype), basis).view(B, 3, H, W)


def sh_shading_packed(normals: torch.Tensor, sh: torch.Tensor, batch: torch.Tensor
                      ) -> torch.Tensor:
    """``sh_shading`` at scattered points (the covered pixels of a packed render).

    normals: (P, 3) unit normals; sh: (B, 9, 3); batch: (P,) long, each point's image,
    sorted ascending (as ``Fragments.batch_packed``). Returns (P, 3).
    One (P_b, 9) x (9, 3) product per image: a per-point gather of the lights would move
    27 floats per pixel.
    """
    if sh.dim() != 3 or sh.shape[1:] != (9, 3):
        raise ValueError(f"sh must be (B, 9, 3), got {tuple(sh.shape)}")
    light = sh.to(normals.dtype)
    if numba_ops.usable(normals, light):
        return numba_ops.SHShading.apply(normals, light, batch,
                                         numba_ops.image_segments(batch, sh.shape[0]),
                                         SH_CONSTANTS)
    basis = sh_basis(normals.unsqueeze(-1)).squeeze(-1)  # (P, 9)
    counts = torch.bincount(batch, minlength=sh.shape[0]).tolist()
    return torch.cat([part @ light[b] for b, part in enumerate(basis.split(counts))])


def directional_shading(normals: torch.Tensor,
                        directions=GREY_LIGHT_DIRECTIONS,
                        intensity: float = GREY_LIGHT_INTENSITY) -> torch.Tensor:
    """DECA's ``add_directionlight`` with equal white lights: mean over lights of
    ``intensity * clamp(n . l, 0, 1)``. normals: (B, 3, H, W) -> (B, 3, H, W) (grey)."""
    d = torch.tensor(directions, dtype=normals.dtype, device=normals.device)
    d = d / d.norm(dim=-1, keepdim=True)
    cos = torch.einsum("bchw,lc->blhw", normals, d).clamp(0.0, 1.0)
    return (intensity * cos.mean(dim=1, keepdim=True)).expand(-1, 3, -1, -1)
