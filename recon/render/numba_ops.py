"""Compiled CPU versions (Numba) of the renderer's packed differentiable operations.

Each operation here is a ``torch.autograd.Function`` whose forward and backward are one
compiled loop over the P covered pixels, with the same maths as its PyTorch version:

===========================  ================================================
``barycentrics``             ``rasterize.barycentric_step`` (bary, depth)
``interpolate``              ``interpolate.interpolate_packed`` and corners
``sample_texture``           ``texture.sample_texture_packed`` (bilinear, border)
``sh_shading``               ``shading.sh_shading_packed``
``vertex_normals``           ``interpolate.vertex_normals``
===========================  ================================================

Why: on a CPU the PyTorch versions are tens of small tensor operations each, forward and
backward (gathers whose backward is a scatter, batched 1x3 @ 3xC products, a single-threaded
``grid_sampler_2d_backward``), and a render's forward+backward is dominated by their count,
not their arithmetic. The public functions in ``interpolate``, ``texture``, ``shading`` and
``rasterize`` call these for CPU float tensors when numba imports (:func:`usable`), and their
PyTorch code otherwise (GPU, other dtypes) or inside :func:`reference_ops` (what the parity
tests compare against).

Gradient scatters (into vertices, texture maps, lights) run in parallel over images: packed
pixels are sorted by image and each image owns its vertices and maps, so no two threads add
into the same element. A map shared by the batch gets one serial scatter. Sums over many
pixels (lights, vertices) accumulate in float64; a texel or vertex attribute receives a few
pixels' contributions and accumulates in the input dtype.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the PyTorch ops still work
    numba = None

_ENABLED = True
_FLOATS = (torch.float32, torch.float64)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled ops take these tensors: numba present, not switched off, all on
    the CPU in one float dtype (float32 or float64)."""
    if numba is None or not _ENABLED:
        return False
    dtype = tensors[0].dtype
    return dtype in _FLOATS and all(t.device.type == "cpu" and t.dtype == dtype
                                    for t in tensors)


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Use the PyTorch versions inside this block (parity tests, debugging)."""
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before


class ParallelLoop:
    """A ``numba.prange`` loop compiled twice: with OpenMP for several torch threads, as a
    plain loop for one. Calls run on ``torch.get_num_threads()`` threads (capped by numba's
    pool), so a Ray worker or a test limited to one thread starts no OpenMP team at all:
    the pool's idle threads spin-wait, and on a contended machine (Ray workers, CI) that made
    one-thread training steps 4-6x slower (docs/renderer.md)."""

    def __init__(self, fn: Callable) -> None:
        self.parallel = numba.njit(cache=True, parallel=True)(fn)
        self.serial = numba.njit(cache=True)(_renamed(fn, "_serial"))
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        if threads <= 1:
            return self.serial(*args)
        numba.set_num_threads(threads)
        return self.parallel(*args)


def _renamed(fn: Callable, suffix: str) -> Callable:
    """A copy of ``fn`` under another qualified name. Numba names its cache files after the
    function and keys their index by signature and CPU only, not by compile flags, so the
    serial and parallel builds of one loop must not share a name."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                              fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    return copy


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy())


def image_segments(batch: torch.Tensor, num_images: int) -> torch.Tensor:
    """(num_images + 1,) start of each image's run in ``batch`` (P,), the image index of
    each point. Unsorted ``batch``: one run [0, P] (the gradient scatter is then serial)."""
    if batch.numel() > 1 and not bool((batch[1:] >= batch[:-1]).all()):
        return torch.tensor([0, batch.numel()])
    counts = torch.bincount(batch, minlength=num_images)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _whole(n: int) -> np.ndarray:
    return np.array([0, n], dtype=np.int64)


if numba is not None:
    _inline = numba.njit(cache=True, inline="always")
    _pjit = ParallelLoop

    # -- barycentrics ------------------------------------------------------------------
    @_inline
    def _pixel_frame(verts, idx, pix, p, H, W, X, Y):
        """Triangle corners of pixel p relative to its centre, in pixels (float64)."""
        rem = pix[p] % (H * W)
        row = rem // W
        col = rem - row * W
        cx = (2.0 * col + 1.0) / W - 1.0
        cy = 1.0 - (2.0 * row + 1.0) / H
        for k in range(3):
            v = idx[p, k]
            X[k] = (np.float64(verts[v, 0]) - cx) * (W / 2.0)
            Y[k] = (cy - np.float64(verts[v, 1])) * (H / 2.0)

    @_pjit
    def _bary_fwd(verts, idx, pix, H, W, bary, z):
        for p in numba.prange(idx.shape[0]):
            X = np.empty(3)
            Y = np.empty(3)
            _pixel_frame(verts, idx, pix, p, H, W, X, Y)
            e0 = X[1] * Y[2] - Y[1] * X[2]
            e1 = X[2] * Y[0] - Y[2] * X[0]
            e2 = X[0] * Y[1] - Y[0] * X[1]
            s = e0 + e1 + e2
            b0, b1, b2 = e0 / s, e1 / s, e2 / s
            bary[p, 0], bary[p, 1], bary[p, 2] = b0, b1, b2
            z[p] = (b0 * np.float64(verts[idx[p, 0], 2]) + b1 * np.float64(verts[idx[p, 1], 2])
                    + b2 * np.float64(verts[idx[p, 2], 2]))

    @_pjit
    def _bary_bwd(verts, idx, pix, H, W, seg, gbary, gz, gverts):
        for s_i in numba.prange(seg.shape[0] - 1):
            X = np.empty(3)
            Y = np.empty(3)
            gb = np.empty(3)
            ge = np.empty(3)
            gX = np.empty(3)
            gY = np.empty(3)
            for p in range(seg[s_i], seg[s_i + 1]):
                _pixel_frame(verts, idx, pix, p, H, W, X, Y)
                e0 = X[1] * Y[2] - Y[1] * X[2]
                e1 = X[2] * Y[0] - Y[2] * X[0]
                e2 = X[0] * Y[1] - Y[0] * X[1]
                s = e0 + e1 + e2
                b = (e0 / s, e1 / s, e2 / s)
                g_z = np.float64(gz[p])
                dot = 0.0
                for k in range(3):
                    # z = sum_k b_k z_k
                    gb[k] = np.float64(gbary[p, k]) + g_z * np.float64(verts[idx[p, k], 2])
                    gverts[idx[p, k], 2] += g_z * b[k]
                    dot += gb[k] * b[k]
                for k in range(3):  # b = e / sum(e)
                    ge[k] = (gb[k] - dot) / s
                for k in range(3):  # e_k = X_{k+1} Y_{k+2} - Y_{k+1} X_{k+2}
                    gX[k] = ge[(k + 2) % 3] * Y[(k + 1) % 3] - ge[(k + 1) % 3] * Y[(k + 2) % 3]
                    gY[k] = ge[(k + 1) % 3] * X[(k + 2) % 3] - ge[(k + 2) % 3] * X[(k + 1) % 3]
                for k in range(3):
                    v = idx[p, k]
                    gverts[v, 0] += gX[k] * (W / 2.0)
                    gverts[v, 1] -= gY[k] * (H / 2.0)

    # -- interpolation -----------------------------------------------------------------
    @_pjit
    def _interp_fwd(values, idx, bary, out):
        C = values.shape[1]
        for p in numba.prange(idx.shape[0]):
            i0, i1, i2 = idx[p, 0], idx[p, 1], idx[p, 2]
            b0, b1, b2 = bary[p, 0], bary[p, 1], bary[p, 2]
            for c in range(C):
                out[p, c] = b0 * values[i0, c] + b1 * values[i1, c] + b2 * values[i2, c]

    @_pjit
    def _interp_bwd_bary(values, idx, grad, gbary):
        C = values.shape[1]
        for p in numba.prange(idx.shape[0]):
            for k in range(3):
                acc = 0.0
                i = idx[p, k]
                for c in range(C):
                    acc += grad[p, c] * values[i, c]
                gbary[p, k] = acc

    @_pjit
    def _interp_bwd_values(idx, bary, grad, seg, gvalues):
        C = grad.shape[1]
        for s_i in numba.prange(seg.shape[0] - 1):
            for p in range(seg[s_i], seg[s_i + 1]):
                for k in range(3):
                    i = idx[p, k]
                    w = bary[p, k]
                    for c in range(C):
                        gvalues[i, c] += w * grad[p, c]

    # -- texture -----------------------------------------------------------------------
    @_inline
    def _texel(g, size):
        """grid_sample coordinate -> (left texel, weight of the right one, d texel / d g);
        align_corners=False, border padding (clamped coordinates get no gradient). A NaN
        coordinate reads NaN (weight NaN) instead of indexing out of bounds."""
        t = ((g + 1.0) * size - 1.0) * 0.5
        if t != t:
            return 0, np.nan, np.nan
        dt = size * 0.5
        if t <= 0.0:
            t, dt = 0.0, 0.0
        elif t >= size - 1.0:
            t, dt = size - 1.0, 0.0
        t0 = min(int(np.floor(t)), size - 1)
        return t0, t - t0, dt

    @_pjit
    def _tex_fwd(tex, grid, batch, out):
        Bt, C, H, W = tex.shape
        for p in numba.prange(grid.shape[0]):
            b = batch[p] if Bt > 1 else 0
            x0, wx, _ = _texel(grid[p, 0], W)
            y0, wy, _ = _texel(grid[p, 1], H)
            x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
            for c in range(C):
                top = (1.0 - wx) * tex[b, c, y0, x0] + wx * tex[b, c, y0, x1]
                bot = (1.0 - wx) * tex[b, c, y1, x0] + wx * tex[b, c, y1, x1]
                out[p, c] = (1.0 - wy) * top + wy * bot

    @_pjit
    def _tex_bwd_grid(tex, grid, batch, grad, ggrid):
        Bt, C, H, W = tex.shape
        for p in numba.prange(grid.shape[0]):
            b = batch[p] if Bt > 1 else 0
            x0, wx, dx = _texel(grid[p, 0], W)
            y0, wy, dy = _texel(grid[p, 1], H)
            x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
            gx = 0.0
            gy = 0.0
            for c in range(C):
                t00, t01 = tex[b, c, y0, x0], tex[b, c, y0, x1]
                t10, t11 = tex[b, c, y1, x0], tex[b, c, y1, x1]
                gx += grad[p, c] * ((1.0 - wy) * (t01 - t00) + wy * (t11 - t10))
                gy += grad[p, c] * ((1.0 - wx) * (t10 - t00) + wx * (t11 - t01))
            ggrid[p, 0] = gx * dx
            ggrid[p, 1] = gy * dy

    @_pjit
    def _tex_bwd_tex(grid, batch, grad, seg, gtex):
        Bt, C, H, W = gtex.shape
        for s_i in numba.prange(seg.shape[0] - 1):
            for p in range(seg[s_i], seg[s_i + 1]):
                b = batch[p] if Bt > 1 else 0
                x0, wx, _ = _texel(grid[p, 0], W)
                y0, wy, _ = _texel(grid[p, 1], H)
                x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
                for c in range(C):
                    g = grad[p, c]
                    gtex[b, c, y0, x0] += (1.0 - wy) * (1.0 - wx) * g
                    gtex[b, c, y0, x1] += (1.0 - wy) * wx * g
                    gtex[b, c, y1, x0] += wy * (1.0 - wx) * g
                    gtex[b, c, y1, x1] += wy * wx * g

    # -- SH shading --------------------------------------------------------------------
    @_inline
    def _sh_basis(x, y, z, k, basis):
        basis[0] = k[0]
        basis[1] = k[1] * x
        basis[2] = k[2] * y
        basis[3] = k[3] * z
        basis[4] = k[4] * x * y
        basis[5] = k[5] * x * z
        basis[6] = k[6] * y * z
        basis[7] = k[7] * (x * x - y * y)
        basis[8] = k[8] * (3.0 * z * z - 1.0)

    @_pjit
    def _sh_fwd(normals, sh, batch, k, out):
        for p in numba.prange(normals.shape[0]):
            basis = np.empty(9)
            _sh_basis(normals[p, 0], normals[p, 1], normals[p, 2], k, basis)
            b = batch[p]
            for c in range(3):
                acc = 0.0
                for j in range(9):
                    acc += basis[j] * sh[b, j, c]
                out[p, c] = acc

    @_pjit
    def _sh_bwd(normals, sh, batch, k, grad, seg, need_sh, gnormals, gsh):
        for s_i in numba.prange(seg.shape[0] - 1):
            basis = np.empty(9)
            gbasis = np.empty(9)
            for p in range(seg[s_i], seg[s_i + 1]):
                x, y, z = normals[p, 0], normals[p, 1], normals[p, 2]
                b = batch[p]
                if need_sh:
                    _sh_basis(x, y, z, k, basis)
                for j in range(9):
                    acc = 0.0
                    for c in range(3):
                        acc += grad[p, c] * sh[b, j, c]
                        if need_sh:
                            gsh[b, j, c] += grad[p, c] * basis[j]
                    gbasis[j] = acc * k[j]
                gnormals[p, 0] = gbasis[1] + gbasis[4] * y + gbasis[5] * z + 2.0 * gbasis[7] * x
                gnormals[p, 1] = gbasis[2] + gbasis[4] * x + gbasis[6] * z - 2.0 * gbasis[7] * y
                gnormals[p, 2] = gbasis[3] + gbasis[5] * x + gbasis[6] * y + 6.0 * gbasis[8] * z

    # -- vertex normals ----------------------------------------------------------------
    @_inline
    def _edges(verts, b, i0, i1, i2):
        """Edges a = v1 - v0 and b = v2 - v0 of a triangle of image b, as 6 scalars."""
        return (verts[b, i1, 0] - verts[b, i0, 0], verts[b, i1, 1] - verts[b, i0, 1],
                verts[b, i1, 2] - verts[b, i0, 2], verts[b, i2, 0] - verts[b, i0, 0],
                verts[b, i2, 1] - verts[b, i0, 1], verts[b, i2, 2] - verts[b, i0, 2])

    @_pjit
    def _vn_fwd(verts, faces, acc):
        """acc (B, V, 3) += area-weighted face normals (unnormalised)."""
        for b in numba.prange(verts.shape[0]):
            for f in range(faces.shape[0]):
                i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
                ax, ay, az, bx, by, bz = _edges(verts, b, i0, i1, i2)
                nx = ay * bz - az * by
                ny = az * bx - ax * bz
                nz = ax * by - ay * bx
                for i in (i0, i1, i2):
                    acc[b, i, 0] += nx
                    acc[b, i, 1] += ny
                    acc[b, i, 2] += nz

    @_pjit
    def _vn_bwd(verts, faces, gacc, gverts):
        """gacc: (B, V, 3) gradient w.r.t. the unnormalised sums -> gverts (B, V, 3)."""
        for b in numba.prange(verts.shape[0]):
            for f in range(faces.shape[0]):
                i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
                ax, ay, az, bx, by, bz = _edges(verts, b, i0, i1, i2)
                gx = gacc[b, i0, 0] + gacc[b, i1, 0] + gacc[b, i2, 0]
                gy = gacc[b, i0, 1] + gacc[b, i1, 1] + gacc[b, i2, 1]
                gz = gacc[b, i0, 2] + gacc[b, i1, 2] + gacc[b, i2, 2]
                # n = a x b: dL/da = b x g, dL/db = g x a
                gax, gay, gaz = by * gz - bz * gy, bz * gx - bx * gz, bx * gy - by * gx
                gbx, gby, gbz = gy * az - gz * ay, gz * ax - gx * az, gx * ay - gy * ax
                gverts[b, i1, 0] += gax
                gverts[b, i1, 1] += gay
                gverts[b, i1, 2] += gaz
                gverts[b, i2, 0] += gbx
                gverts[b, i2, 1] += gby
                gverts[b, i2, 2] += gbz
                gverts[b, i0, 0] -= gax + gbx
                gverts[b, i0, 1] -= gay + gby
                gverts[b, i0, 2] -= gaz + gbz


# -- autograd Functions -------------------------------------------------------------------
class Barycentrics(torch.autograd.Function):
    """verts: (N, 3) NDC (flattened B*V); vert_idx: (P, 3) rows of verts; pix: (P,) flat
    pixel index into B*H*W -> bary (P, 3), z (P,). Offsets from the pixel centre and the
    edge functions in float64, as ``barycentric_step``."""

    @staticmethod
    def forward(ctx, verts, vert_idx, pix, segments, height, width):
        P = vert_idx.shape[0]
        v, idx, px = _np(verts), _np(vert_idx), _np(pix)
        bary = np.empty((P, 3), dtype=v.dtype)
        z = np.empty(P, dtype=v.dtype)
        _bary_fwd(v, idx, px, height, width, bary, z)
        ctx.save_for_backward(verts, vert_idx, pix, segments)
        ctx.size = (height, width)
        return torch.from_numpy(bary), torch.from_numpy(z)

    @staticmethod
    def backward(ctx, gbary, gz):
        verts, vert_idx, pix, segments = ctx.saved_tensors
        v = _np(verts)
        P = vert_idx.shape[0]
        gb = _np(gbary) if gbary is not None else np.zeros((P, 3), v.dtype)
        gzn = _np(gz) if gz is not None else np.zeros(P, v.dtype)
        gverts = np.zeros(v.shape, dtype=np.float64)
        _bary_bwd(v, _np(vert_idx), _np(pix), *ctx.size, _np(segments), gb, gzn, gverts)
        return torch.from_numpy(gverts).to(verts.dtype), None, None, None, None, None


class Interpolate(torch.autograd.Function):
    """values: (N, C); idx: (P, 3) rows of values; bary: (P, 3) -> (P, C).
    ``segments`` (S+1,): runs of pixels whose ``idx`` rows no other run touches (images),
    so the gradient scatter into ``values`` runs in parallel over them."""

    @staticmethod
    def forward(ctx, values, idx, bary, segments):
        out = np.empty((idx.shape[0], values.shape[1]), dtype=_np(values).dtype)
        _interp_fwd(_np(values), _np(idx), _np(bary), out)
        ctx.save_for_backward(values, idx, bary, segments)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad):
        values, idx, bary, segments = ctx.saved_tensors
        g = _np(grad)
        i = _np(idx)
        gvalues = gbary = None
        if ctx.needs_input_grad[0]:
            gv = np.zeros(values.shape, dtype=g.dtype)
            _interp_bwd_values(i, _np(bary), g, _np(segments), gv)
            gvalues = torch.from_numpy(gv)
        if ctx.needs_input_grad[2]:
            gb = np.empty(bary.shape, dtype=g.dtype)
            _interp_bwd_bary(_np(values), i, g, gb)
            gbary = torch.from_numpy(gb)
        return gvalues, None, gbary, None


class SampleTexture(torch.autograd.Function):
    """texture: (B or 1, C, H, W); grid: (P, 2) grid_sample coordinates; batch: (P,) ->
    (P, C), bilinear, align_corners=False, border padding."""

    @staticmethod
    def forward(ctx, texture, grid, batch, segments):
        tex = _np(texture)
        out = np.empty((grid.shape[0], tex.shape[1]), dtype=tex.dtype)
        _tex_fwd(tex, _np(grid), _np(batch), out)
        ctx.save_for_backward(texture, grid, batch, segments)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad):
        texture, grid, batch, segments = ctx.saved_tensors
        g, gr, bt = _np(grad), _np(grid), _np(batch)
        gtex = ggrid = None
        if ctx.needs_input_grad[0]:
            seg = _np(segments) if texture.shape[0] > 1 else _whole(grid.shape[0])
            gt = np.zeros(texture.shape, dtype=g.dtype)
            _tex_bwd_tex(gr, bt, g, seg, gt)
            gtex = torch.from_numpy(gt)
        if ctx.needs_input_grad[1]:
            gg = np.empty(grid.shape, dtype=g.dtype)
            _tex_bwd_grid(_np(texture), gr, bt, g, gg)
            ggrid = torch.from_numpy(gg)
        return gtex, ggrid, None, None


class SHShading(torch.autograd.Function):
    """normals: (P, 3); sh: (B, 9, 3); batch: (P,) -> (P, 3) = sum_k sh[b, k] basis_k(n)."""

    @staticmethod
    def forward(ctx, normals, sh, batch, segments, constants):
        n = _np(normals)
        out = np.empty(n.shape, dtype=n.dtype)
        k = np.asarray(constants, dtype=n.dtype)
        _sh_fwd(n, _np(sh), _np(batch), k, out)
        ctx.save_for_backward(normals, sh, batch, segments)
        ctx.constants = k
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad):
        normals, sh, batch, segments = ctx.saved_tensors
        n = _np(normals)
        gn = np.empty(n.shape, dtype=n.dtype)
        gsh = np.zeros(sh.shape, dtype=np.float64)
        need_sh = bool(ctx.needs_input_grad[1])
        _sh_bwd(n, _np(sh), _np(batch), ctx.constants, _np(grad), _np(segments), need_sh,
                gn, gsh)
        return (torch.from_numpy(gn), torch.from_numpy(gsh).to(sh.dtype) if need_sh else None,
                None, None, None)


class VertexNormalSums(torch.autograd.Function):
    """verts: (B, V, 3); faces: (F, 3) -> (B, V, 3) sums of the adjacent face normals
    (cross products, length 2 x area), i.e. vertex normals before normalisation."""

    @staticmethod
    def forward(ctx, verts, faces):
        v = _np(verts)
        acc = np.zeros(v.shape, dtype=v.dtype)
        _vn_fwd(v, _np(faces), acc)
        ctx.save_for_backward(verts, faces)
        return torch.from_numpy(acc)

    @staticmethod
    def backward(ctx, grad):
        verts, faces = ctx.saved_tensors
        v = _np(verts)
        gv = np.zeros(v.shape, dtype=np.float64)
        _vn_bwd(v, _np(faces), _np(grad), gv)
        return torch.from_numpy(gv).to(verts.dtype), None
