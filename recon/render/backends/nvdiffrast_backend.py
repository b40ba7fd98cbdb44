"""Optional nvdiffrast face-id pass (CUDA rasterizer, OpenGL conventions).

Our z (larger nearer) is mapped per mesh into clip depth in (-1, 1) with nearer smaller,
and nvdiffrast's bottom-up rows are flipped. Only the triangle ids are used; barycentrics
are recomputed by the shared differentiable step.
"""
from __future__ import annotations

import torch

from recon.render.backends.errors import BackendUnavailable

try:
    import nvdiffrast.torch as dr
except ImportError as err:  # pragma: no cover - depends on the optional install
    raise BackendUnavailable(
        "backend 'nvdiffrast' needs nvdiffrast installed (pip extra 'gpu') and a CUDA device"
    ) from err

_CONTEXTS: dict[torch.device, object] = {}


def face_ids(verts_pix: torch.Tensor, faces: torch.Tensor, height: int, width: int,
             cull_backfaces: bool = False, chunk_pairs: int = 0) -> torch.Tensor:
    device = verts_pix.device
    if device.type != "cuda":
        raise BackendUnavailable("backend 'nvdiffrast' runs on CUDA tensors only")
    ctx = _CONTEXTS.setdefault(device, dr.RasterizeCudaContext(device=device))
    vp = verts_pix.detach().to(torch.float32)
    x = (vp[..., 0] + 0.5) * (2.0 / width) - 1.0
    y = 1.0 - (vp[..., 1] + 0.5) * (2.0 / height)
    z = vp[..., 2]
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    lo, hi = zf.amin(1, keepdim=True), zf.amax(1, keepdim=True)
    depth = 0.98 * (hi + lo - 2.0 * z) / (hi - lo).clamp_min(1e-12)
    bad = ~torch.isfinite(vp).all(-1)
    pos = torch.stack([x, y, depth, torch.ones_like(z)], dim=-1)
    # a non-finite vertex becomes (0, 0, 0, 0): its triangles are clipped away
    pos = torch.where(bad[..., None], torch.zeros_like(pos), pos).contiguous()
    tri = faces.to(torch.int32).contiguous()
    if not cull_backfaces:
        rast, _ = dr.rasterize(ctx, pos, tri, resolution=[height, width])
    else:
        # Front faces are counter-clockwise in NDC (negative area with rows downward);
        # culled triangles become degenerate, per mesh.
        t = vp[:, faces]
        area = (t[..., 1, 0] - t[..., 0, 0]) * (t[..., 2, 1] - t[..., 0, 1]) - \
            (t[..., 1, 1] - t[..., 0, 1]) * (t[..., 2, 0] - t[..., 0, 0])
        rast = torch.cat([
            dr.rasterize(ctx, pos[b:b + 1].contiguous(),
                         torch.where((area[b] >= 0)[:, None], tri[:, :1].expand(-1, 3),
                                     tri).contiguous(),
                         resolution=[height, width])[0]
            for b in range(pos.shape[0])
        ])
    ids = rast[..., 3].round().long() - 1  # 0 means empty
    return ids.flip(1)
