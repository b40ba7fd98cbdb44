"""Optional pytorch3d face-id pass (``rasterize_meshes``, blur 0, one face per pixel).

pytorch3d's NDC has +x LEFT, +y up and +z into the screen (smaller z nearer, z must be
positive), so x and z are flipped and z shifted before the call. Only pix_to_face is used;
barycentrics are recomputed by the shared differentiable step. Ties and pixel centres
exactly on edges may resolve differently from the torch backend.
"""
from __future__ import annotations

import torch

from recon.render.backends.errors import BackendUnavailable

try:
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes
except ImportError as err:  # pragma: no cover - depends on the optional install
    raise BackendUnavailable(
        "backend 'pytorch3d' needs pytorch3d installed (not installable on this stack; "
        "use backend='torch')"
    ) from err


def face_ids(verts_pix: torch.Tensor, faces: torch.Tensor, height: int, width: int,
             cull_backfaces: bool = False, chunk_pairs: int = 0) -> torch.Tensor:
    B, V, _ = verts_pix.shape
    F = faces.shape[0]
    vp = verts_pix.detach().to(torch.float32)
    # back to NDC, then into pytorch3d's convention; pytorch3d scales the shorter side to
    # [-1, 1], which equals ours for square images only.
    if height != width:
        raise BackendUnavailable("backend 'pytorch3d' is wired for square images only")
    x = (vp[..., 0] + 0.5) * (2.0 / width) - 1.0
    y = 1.0 - (vp[..., 1] + 0.5) * (2.0 / height)
    z = vp[..., 2]
    finite_z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    zmax = finite_z.amax(dim=1, keepdim=True)
    p3 = torch.stack([-x, y, zmax + 1.0 - z], dim=-1)
    meshes = Meshes(verts=list(p3), faces=[faces] * B)
    p2f, _, _, _ = rasterize_meshes(
        meshes, image_size=height, blur_radius=0.0, faces_per_pixel=1,
        perspective_correct=False, cull_backfaces=cull_backfaces,
    )
    p2f = p2f[..., 0]
    offset = (torch.arange(B, device=p2f.device) * F)[:, None, None]
    return torch.where(p2f >= 0, p2f - offset, -1).long()
