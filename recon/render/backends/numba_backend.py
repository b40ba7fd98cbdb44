"""Compiled CPU face-id pass (Numba): the torch backend's rule, one loop per image.

Same result as ``recon.render.backends.torch_backend`` to the bit: the same float32
arithmetic in the same order (canonical-order edge functions, so shared edges stay
watertight; the depth plane of the winning triangle; the packed ``(ordered depth << 32) |
(2^32 - 1 - face id)`` key, nearest wins and exact ties go to the lowest id), the same
bounding boxes, and the same skipped triangles (non-finite, zero area, culled, overflowing
depth plane). What changes is the cost: per image, a loop over each triangle's box instead
of ~1000 tensor operations, images in parallel (``numba.prange``, on as many threads as
``torch.get_num_threads()``). CPU only; the compiled
kernel is cached on disk after the first call (a few seconds).
"""
from __future__ import annotations

import numpy as np
import torch

from recon.render.backends.errors import BackendUnavailable
from recon.render.numba_ops import ParallelLoop

try:
    import numba
except ImportError as err:  # pragma: no cover - numba is a dependency; guard for slim installs
    raise BackendUnavailable("rasterizer backend 'numba' needs the numba package") from err

_LOW = np.int64(0xFFFFFFFF)
_EMPTY = np.iinfo(np.int64).min


@numba.njit(cache=True, inline="always")
def _ordered(bits: np.int32) -> np.int64:
    """float32 bit pattern -> int64 with the float order (as torch_backend._ordered_int)."""
    if bits < 0:
        bits = bits ^ np.int32(0x7FFFFFFF)
    return np.int64(bits)


@ParallelLoop
def _face_ids(vp: np.ndarray, faces: np.ndarray, height: int, width: int, cull: bool,
              out: np.ndarray) -> None:
    """vp: (B, V, 3) float32 pixel coordinates; faces: (F, 3) int64; out: (B, H*W) int64."""
    B = vp.shape[0]
    F = faces.shape[0]
    big = np.float32(max(height, width) + 2)
    one, zero, neg1 = np.float32(1.0), np.float32(0.0), np.float32(-1.0)
    for b in numba.prange(B):
        keys = np.full(height * width, _EMPTY, dtype=np.int64)
        zf = np.empty(1, dtype=np.float32)
        zi = zf.view(np.int32)
        x = np.empty(3, dtype=np.float32)
        y = np.empty(3, dtype=np.float32)
        z = np.empty(3, dtype=np.float32)
        ex = np.empty(3, dtype=np.float32)
        ey = np.empty(3, dtype=np.float32)
        xa = np.empty(3, dtype=np.float32)
        ya = np.empty(3, dtype=np.float32)
        for f in range(F):
            for k in range(3):
                v = faces[f, k]
                x[k] = vp[b, v, 0]
                y[k] = vp[b, v, 1]
                z[k] = vp[b, v, 2]
            area = (x[1] - x[0]) * (y[2] - y[0]) - (y[1] - y[0]) * (x[2] - x[0])
            if not np.isfinite(area) or area == zero:
                continue
            if not (np.isfinite(z[0]) and np.isfinite(z[1]) and np.isfinite(z[2])):
                continue
            if cull and not area < zero:
                continue
            lo_x = min(max(min(x[0], x[1], x[2]), neg1), big)
            hi_x = min(max(max(x[0], x[1], x[2]), neg1), big)
            lo_y = min(max(min(y[0], y[1], y[2]), neg1), big)
            hi_y = min(max(max(y[0], y[1], y[2]), neg1), big)
            x0 = max(np.int64(np.ceil(lo_x)), 0)
            x1 = min(np.int64(np.floor(hi_x)), width - 1)
            y0 = max(np.int64(np.ceil(lo_y)), 0)
            y1 = min(np.int64(np.floor(hi_y)), height - 1)
            if x1 < x0 or y1 < y0:
                continue
            s_area = one if area > zero else neg1
            abs_area = area if area > zero else -area
            for k in range(3):
                c1, c2 = (k + 1) % 3, (k + 2) % 3
                swap = faces[f, c1] > faces[f, c2]
                a, e = (c2, c1) if swap else (c1, c2)
                sgn = (neg1 if swap else one) * s_area
                xa[k] = x[a]
                ya[k] = y[a]
                ex[k] = sgn * (x[e] - x[a])
                ey[k] = sgn * (y[e] - y[a])
            fx0, fy0 = np.float32(x0), np.float32(y0)
            gx = zero
            gy = zero
            z0 = zero
            for k in range(3):
                zk = z[k] / abs_area
                gx = gx + ey[k] * zk if k else ey[k] * zk
                gy = gy + ex[k] * zk if k else ex[k] * zk
                e0 = ex[k] * (fy0 - ya[k]) - ey[k] * (fx0 - xa[k])
                z0 = z0 + e0 * zk if k else e0 * zk
            gx = -gx
            if not (np.isfinite(z0) and np.isfinite(gx) and np.isfinite(gy)):
                continue
            low = _LOW - np.int64(f)
            for row in range(y0, y1 + 1):
                fy = np.float32(row)
                dy = np.float32(row - y0)
                for col in range(x0, x1 + 1):
                    fx = np.float32(col)
                    inside = True
                    for k in range(3):
                        if ex[k] * (fy - ya[k]) - ey[k] * (fx - xa[k]) < zero:
                            inside = False
                            break
                    if not inside:
                        continue
                    zf[0] = (z0 + gx * np.float32(col - x0)) + gy * dy + zero
                    key = (_ordered(zi[0]) << 32) | low
                    p = row * width + col
                    if key > keys[p]:
                        keys[p] = key
        for p in range(height * width):
            out[b, p] = -1 if keys[p] == _EMPTY else _LOW - (keys[p] & _LOW)


def face_ids(
    verts_pix: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: int,
    cull_backfaces: bool = False,
    chunk_pairs: int = 1 << 22,  # noqa: ARG001 - the loop needs no candidate buffer
) -> torch.Tensor:
    """verts_pix: (B, V, 3) [column, row, z] pixel coordinates; faces: (F, 3) long.
    Returns pix_to_face (B, H, W) long (-1 empty). CPU tensors only."""
    if verts_pix.device.type != "cpu":
        raise BackendUnavailable("rasterizer backend 'numba' runs on the CPU only")
    B = verts_pix.shape[0]
    vp = np.ascontiguousarray(verts_pix.detach().to(torch.float32).numpy())
    fc = np.ascontiguousarray(faces.detach().to(torch.int64).numpy())
    out = np.empty((B, height * width), dtype=np.int64)
    if B:
        _face_ids(vp, fc, int(height), int(width), bool(cull_backfaces), out)
    return torch.from_numpy(out).view(B, height, width)
