"""Rendering in UV space: the static UV layout rasterized once, then per-texel attributes
of the posed mesh (position / normal maps), and displacement -> detail normals (DECA).

UV map convention: texel row 0 is v = 1 (top), column 0 is u = 0, texel centres like
pixel centres; a UV map is sampled in image space with ``texture.sample_texture`` and the
renderer's ``uv_grid``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recon.render.rasterize import rasterize


class UVRasterizer(torch.nn.Module):
    """The UV layout of a mesh, rasterized once at ``uv_size`` and cached as buffers.

    faces: (F, 3) mesh vertex indices; uv_coords: (T, 2) in [0, 1] (u right, v up);
    uv_faces: (F, 3) indices into uv_coords, corner for corner with ``faces``.
    """

    def __init__(self, faces: torch.Tensor, uv_coords: torch.Tensor, uv_faces: torch.Tensor,
                 uv_size: int = 256):
        super().__init__()
        if faces.shape != uv_faces.shape:
            raise ValueError(f"faces {tuple(faces.shape)} and uv_faces "
                             f"{tuple(uv_faces.shape)} must match")
        self.uv_size = int(uv_size)
        uv = uv_coords.to(torch.float64)
        layout = torch.cat([2.0 * uv - 1.0, torch.zeros_like(uv[:, :1])], dim=-1)[None]
        frags = rasterize(layout, uv_faces.long(), self.uv_size)
        self.register_buffer("texel", frags.pix, persistent=False)  # (P,)
        self.register_buffer("texel_verts", faces.long()[frags.face_packed], persistent=False)
        self.register_buffer("texel_bary", frags.bary_packed.to(torch.float32),
                             persistent=False)  # (P, 3)
        covered = (frags.pix_to_face >= 0).to(torch.float32).view(1, 1, uv_size, uv_size)
        self.register_buffer("covered", covered, persistent=False)
        # Texels whose 3x3 neighbourhood is covered: finite differences are valid there.
        interior = -F.max_pool2d(-covered, 3, stride=1, padding=1)
        self.register_buffer("interior", interior, persistent=False)
        # +1 if the layout keeps the mesh's orientation (counter-clockwise faces stay
        # counter-clockwise in (u, v)), -1 if mirrored: fixes the sign of detail normals.
        t = uv[uv_faces.long()]
        area = (t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1]) - \
            (t[:, 1, 1] - t[:, 0, 1]) * (t[:, 2, 0] - t[:, 0, 0])
        self.orientation = 1.0 if float(area.sum()) >= 0 else -1.0

    def world2uv(self, attrs: torch.Tensor) -> torch.Tensor:
        """attrs: (B, V, C) per-vertex -> (B, C, S, S) UV map (0 outside the layout)."""
        B, V, C = attrs.shape
        S = self.uv_size
        a = attrs[:, self.texel_verts]  # (B, P, 3, C)
        vals = torch.einsum("pk,bpkc->bpc", self.texel_bary.to(attrs.dtype), a)
        out = attrs.new_zeros(B, S * S, C).index_copy(1, self.texel, vals)
        return out.permute(0, 2, 1).reshape(B, C, S, S)


def grid_normals(points: torch.Tensor, orientation: float = 1.0, eps: float = 1e-12
                 ) -> torch.Tensor:
    """Vertex normals of a UV-space position map triangulated as a regular grid (each
    texel quad split into two triangles, area-weighted as ``vertex_normals``).

    points: (B, 3, S, S) -> (B, 3, S, S) unit normals; ``orientation`` as
    ``UVRasterizer.orientation``.
    """
    p00 = points[:, :, :-1, :-1]
    p10 = points[:, :, 1:, :-1]  # next row
    p01 = points[:, :, :-1, 1:]  # next column
    p11 = points[:, :, 1:, 1:]
    # Both triangles are counter-clockwise in (u, v) (v up = rows upward).
    n1 = torch.cross(p10 - p00, p01 - p00, dim=1)
    n2 = torch.cross(p10 - p01, p11 - p01, dim=1)
    pad = F.pad
    n = (pad(n1, (0, 1, 0, 1)) + pad(n1, (0, 1, 1, 0)) + pad(n1 + n2, (1, 0, 0, 1))
         + pad(n2, (0, 1, 1, 0)) + pad(n2, (1, 0, 1, 0)))
    n = orientation * n
    return n / n.norm(dim=1, keepdim=True).clamp_min(eps)
