"""Per-pixel attribute interpolation and mesh normals."""
from __future__ import annotations

import torch

from recon.render import numba_ops
from recon.render.rasterize import Fragments


def interpolate_packed(fragments: Fragments, attrs: torch.Tensor) -> torch.Tensor:
    """attrs: (B, V, C) per-vertex -> (P, C) at the P covered pixels (``fragments.pix``)."""
    B, V, C = attrs.shape
    if V != fragments.num_verts:
        raise ValueError(f"attrs has {V} vertices, the rasterized mesh {fragments.num_verts}")
    return _interpolate_rows(attrs.reshape(B * V, C), fragments.vert_idx,
                             fragments.bary_packed.to(attrs.dtype), fragments.segments)


def interpolate_corners_packed(fragments: Fragments, corner_attrs: torch.Tensor
                               ) -> torch.Tensor:
    """Per-face-corner attributes (e.g. UVs through ``uv_faces``), shared by the batch:
    corner_attrs (F, 3, C) -> (P, C) at the covered pixels."""
    F, _, C = corner_attrs.shape
    rows = fragments.face_packed[:, None] * 3 + torch.arange(3, device=corner_attrs.device)
    # every image reads the same rows: one run for the gradient scatter
    whole = torch.tensor([0, rows.shape[0]])
    return _interpolate_rows(corner_attrs.reshape(F * 3, C), rows,
                             fragments.bary_packed.to(corner_attrs.dtype), whole)


def _interpolate_rows(values: torch.Tensor, rows: torch.Tensor, bary: torch.Tensor,
                      segments: torch.Tensor) -> torch.Tensor:
    """values: (N, C); rows: (P, 3) indices into values; bary: (P, 3) -> (P, C).
    ``segments``: runs of P whose rows no other run reads (see ``numba_ops.Interpolate``)."""
    if numba_ops.usable(values, bary):
        return numba_ops.Interpolate.apply(values, rows, bary, segments)
    a = values.index_select(0, rows.reshape(-1)).view(-1, 3, values.shape[1])
    return torch.einsum("pk,pkc->pc", bary, a)


def scatter_packed(fragments: Fragments, values: torch.Tensor, fill: float = 0.0
                   ) -> torch.Tensor:
    """values: (P, C) at the covered pixels -> (B, C, H, W) image, ``fill`` elsewhere."""
    B, H, W = fragments.shape
    C = values.shape[-1]
    out = values.new_full((B * H * W, C), fill).index_copy(0, fragments.pix, values)
    return out.view(B, H, W, C).permute(0, 3, 1, 2)


def interpolate(fragments: Fragments, faces: torch.Tensor, attrs: torch.Tensor
                ) -> torch.Tensor:
    """Barycentric interpolation of per-vertex attributes.

    fragments: from ``rasterize`` of a mesh with these ``faces`` (F, 3) (the fragments
    already hold each pixel's vertex indices; ``faces`` is checked for consistency of
    shape only); attrs: (B, V, C). Returns (B, C, H, W), 0 where no triangle is visible.
    Differentiable w.r.t. attrs and (through the barycentrics) the vertices.
    """
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    return scatter_packed(fragments, interpolate_packed(fragments, attrs))


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """verts: (B, V, 3), faces: (F, 3) -> (B, F, 3) unnormalised, length = 2 x area,
    pointing to the side from which the triangle is counter-clockwise."""
    B, F = verts.shape[0], faces.shape[0]
    v0, v1, v2 = verts.index_select(1, faces.reshape(-1)).view(B, F, 3, 3).unbind(2)
    return torch.cross(v1 - v0, v2 - v0, dim=-1)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor, eps: float = 1e-12
                   ) -> torch.Tensor:
    """Area-weighted vertex normals, unit length (as DECA). verts: (B, V, 3) -> (B, V, 3).
    Vertices in no triangle get a zero normal."""
    if numba_ops.usable(verts):
        n = numba_ops.VertexNormalSums.apply(verts, faces)
    else:
        fn = face_normals(verts, faces)
        n = torch.zeros_like(verts)
        for k in range(3):
            n = n.index_add(1, faces[:, k], fn)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(eps)
