"""Rasterization in two stages.

1. A backend (``auto``, ``torch``, ``numba``, ``pytorch3d`` or ``nvdiffrast``) finds the
   nearest triangle at each pixel centre (non-differentiable).
2. A shared differentiable step recomputes the winning triangle's barycentrics and depth
   from the vertex positions, so gradients w.r.t. vertices flow through the barycentrics
   and are identical whichever backend found the ids.

Conventions (see ``recon.render.cameras``): input NDC x right, y up, z toward the camera.
Pixel (i, j) is row i (row 0 at the top, y = +1 side), column j (x = -1 side), sampled at its
centre ``x = -1 + (2j + 1) / W``, ``y = 1 - (2i + 1) / H``. Depth: the nearest surface is the
one with the LARGEST z; ``zbuf`` holds that z (interpolated with the screen-space
barycentrics) and ``-inf`` where no triangle covers the pixel. Front faces are
counter-clockwise in NDC (the usual outward winding seen from the camera).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from recon.render import numba_ops
from recon.render.backends import get_backend
from recon.render.cameras import ndc_to_pixel

DEFAULT_CHUNK_PAIRS = 1 << 22


@dataclass(eq=False)
class Fragments:
    """Result of ``rasterize``.

    pix_to_face: (B, H, W) long, local face index of the visible triangle, -1 where empty.
    bary: (B, H, W, 3) barycentrics of the pixel centre in that triangle (0 where empty),
        differentiable w.r.t. the vertices.
    zbuf: (B, H, W) depth (NDC z, larger is nearer), ``-inf`` where empty.
    Packed form over the P covered pixels, used by ``interpolate``: ``pix`` (P,) flat index
    into B*H*W, ``face_packed`` (P,) local face index, ``vert_idx`` (P, 3) flat index into
    B*V of the triangle's vertices, ``bary_packed`` (P, 3), ``z_packed`` (P,).
    """

    pix_to_face: torch.Tensor
    pix: torch.Tensor
    face_packed: torch.Tensor
    vert_idx: torch.Tensor
    bary_packed: torch.Tensor
    z_packed: torch.Tensor
    num_verts: int = field(default=0)

    @property
    def shape(self) -> tuple[int, int, int]:
        B, H, W = self.pix_to_face.shape
        return B, H, W

    @cached_property
    def bary(self) -> torch.Tensor:
        B, H, W = self.shape
        out = self.bary_packed.new_zeros(B * H * W, 3)
        return out.index_copy(0, self.pix, self.bary_packed).view(B, H, W, 3)

    @cached_property
    def zbuf(self) -> torch.Tensor:
        B, H, W = self.shape
        out = self.z_packed.new_full((B * H * W,), float("-inf"))
        return out.index_copy(0, self.pix, self.z_packed).view(B, H, W)

    @cached_property
    def batch_packed(self) -> torch.Tensor:
        """(P,) batch index of each covered pixel."""
        B, H, W = self.shape
        return torch.div(self.pix, H * W, rounding_mode="floor")

    @cached_property
    def segments(self) -> torch.Tensor:
        """(B + 1,) start of each image's run of covered pixels (they are sorted by image)."""
        return numba_ops.image_segments(self.batch_packed, self.shape[0])

    @cached_property
    def mask(self) -> torch.Tensor:
        """(B, 1, H, W) float coverage (1 where a triangle is visible)."""
        return (self.pix_to_face >= 0).unsqueeze(1).to(self.bary_packed.dtype)


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def rasterize(
    verts_ndc: torch.Tensor,
    faces: torch.Tensor,
    image_size: int | tuple[int, int],
    cull_backfaces: bool = False,
    backend: str = "auto",
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
) -> Fragments:
    """Rasterize a batch of meshes sharing one topology.

    verts_ndc: (B, V, 3) NDC (x right, y up, z larger nearer); faces: (F, 3) long;
    image_size: N or (H, W). Like pytorch3d's ``rasterize_meshes`` with ``blur_radius=0``,
    ``faces_per_pixel=1``: a pixel centre on an edge counts as inside (watertight), exact
    depth ties go to the lowest face id, degenerate / non-finite triangles are skipped,
    no back-face culling unless asked. ``chunk_pairs`` bounds the torch backend's working
    memory (candidate triangle-pixel pairs per chunk).
    """
    if verts_ndc.dim() != 3 or verts_ndc.shape[-1] != 3:
        raise ValueError(f"verts_ndc must be (B, V, 3), got {tuple(verts_ndc.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    height, width = _size(image_size)
    faces = faces.to(device=verts_ndc.device, dtype=torch.long)
    with torch.no_grad():
        verts_pix = ndc_to_pixel(verts_ndc.detach().to(torch.float32), height, width)
        pix_to_face = get_backend(backend)(verts_pix, faces, height, width,
                                           cull_backfaces, chunk_pairs)
    return barycentric_step(verts_ndc, faces, pix_to_face)


def barycentric_step(verts_ndc: torch.Tensor, faces: torch.Tensor,
                     pix_to_face: torch.Tensor) -> Fragments:
    """The shared differentiable stage: barycentrics and depth of each pixel centre in its
    triangle, from the vertex positions. verts_ndc: (B, V, 3); faces: (F, 3) long;
    pix_to_face: (B, H, W) long from a backend.

    The vertices are taken relative to the pixel centre in float64 before anything else, so
    float32 input loses no precision to the NDC -> pixel scaling (barycentrics stay within
    ~1e-6 of a float64 computation on non-sliver triangles); the rest runs in the input dtype
    (``numba_ops``, used for CPU tensors: all in float64).
    """
    B, H, W = pix_to_face.shape
    V = verts_ndc.shape[1]
    flat = pix_to_face.reshape(-1)
    pix = (flat >= 0).nonzero().squeeze(1)
    batch = torch.div(pix, H * W, rounding_mode="floor")
    face = flat[pix]
    vert_idx = faces[face] + (batch * V)[:, None]  # (P, 3)
    if numba_ops.usable(verts_ndc):
        bary, zp = numba_ops.Barycentrics.apply(verts_ndc.reshape(-1, 3), vert_idx, pix,
                                                numba_ops.image_segments(batch, B), H, W)
    else:
        bary, zp = _barycentrics(verts_ndc, vert_idx, pix, H, W)
    return Fragments(pix_to_face=pix_to_face, pix=pix, face_packed=face, vert_idx=vert_idx,
                     bary_packed=bary, z_packed=zp, num_verts=V)


def _barycentrics(verts_ndc: torch.Tensor, vert_idx: torch.Tensor, pix: torch.Tensor,
                  H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of ``numba_ops.Barycentrics``: (P, 3) barycentrics and (P,) depth of
    each covered pixel's centre (``pix``, flat into B*H*W) in its triangle ``vert_idx``."""
    tri = verts_ndc.reshape(-1, 3).index_select(0, vert_idx.reshape(-1)).view(-1, 3, 3)
    rem = torch.remainder(pix, H * W)
    row = torch.div(rem, W, rounding_mode="floor")
    col = rem - row * W
    # pixel centre in NDC and vertex offsets from it, in pixels (x right, rows down)
    cx = (2.0 * col.to(torch.float64) + 1.0) / W - 1.0
    cy = 1.0 - (2.0 * row.to(torch.float64) + 1.0) / H
    xy = tri[..., :2].to(torch.float64)
    x = ((xy[..., 0] - cx[:, None]) * (W / 2.0)).to(verts_ndc.dtype)  # (P, 3)
    y = ((cy[:, None] - xy[..., 1]) * (H / 2.0)).to(verts_ndc.dtype)
    x0, x1, x2 = x.unbind(-1)
    y0, y1, y2 = y.unbind(-1)
    # edge functions at the pixel centre (the origin): e_k = cross(v_{k+1}, v_{k+2})
    e = torch.stack([x1 * y2 - y1 * x2, x2 * y0 - y2 * x0, x0 * y1 - y0 * x1], dim=-1)
    bary = e / e.sum(-1, keepdim=True)
    zp = (bary * tri[..., 2]).sum(-1)
    return bary, zp
