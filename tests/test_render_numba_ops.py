"""The compiled CPU ops (recon.render.numba_ops) against the PyTorch ops they replace:
same values and gradients on random inputs, float64 gradcheck of every backward, and a
full render whose image and gradients match the PyTorch path."""
from __future__ import annotations

import contextlib

import pytest
import torch

from recon.render import (DecaRenderer, interpolate_packed, rasterize, sample_texture_packed,
                          sh_shading_packed, vertex_normals, weak_perspective_project)
from recon.devices import cpu_threads_within
from recon.render import numba_ops
from recon.render.interpolate import interpolate_corners_packed
from render_reference import demo_head, rotation_y, t64, uv_sphere


def _both(fn, *inputs):
    """fn's outputs and the gradients of a random projection of them w.r.t. ``inputs``,
    compiled and PyTorch."""
    results = []
    for reference in (False, True):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        with numba_ops.reference_ops() if reference else contextlib.nullcontext():
            out = fn(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(7)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
        loss.backward()
        results.append(([o.detach() for o in outs], [x.grad for x in xs]))
    return results


def _close(a, b, rtol, atol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _sphere_frags(dtype, B=2, size=48):
    v, f = uv_sphere(10, 20)
    verts = torch.stack([t64(v) @ t64(rotation_y(0.3 * b)).T * 0.8 for b in range(B)]).to(dtype)
    faces = torch.as_tensor(f)
    return verts, faces, size


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_barycentrics_and_interpolation_match_pytorch(dtype, tol):
    verts, faces, size = _sphere_frags(dtype)
    attrs = torch.randn(verts.shape[0], verts.shape[1], 4, dtype=dtype,
                        generator=torch.Generator().manual_seed(1))
    corners = torch.rand(faces.shape[0], 3, 2, dtype=dtype)

    def fn(v, a, c):
        frags = rasterize(v, faces, size)
        return (frags.bary_packed, frags.z_packed, interpolate_packed(frags, a),
                interpolate_corners_packed(frags, c))

    (out_n, grad_n), (out_r, grad_r) = _both(fn, verts, attrs, corners)
    _close(out_n, out_r, tol, tol)
    _close(grad_n, grad_r, tol, tol * 10)


@pytest.mark.parametrize("shared", [False, True])
def test_texture_lookup_matches_grid_sample(shared):
    g = torch.Generator().manual_seed(2)
    tex = torch.rand(1 if shared else 3, 2, 9, 7, dtype=torch.float64, generator=g)
    # inside, on and beyond the border (border padding clamps; no gradient there)
    grid = torch.rand(300, 2, dtype=torch.float64, generator=g) * 2.4 - 1.2
    batch = torch.sort(torch.randint(0, 3, (300,), generator=g)).values
    (out_n, grad_n), (out_r, grad_r) = _both(
        lambda t, q: sample_texture_packed(t, q, batch), tex, grid)
    _close(out_n, out_r, 1e-12, 1e-12)
    _close(grad_n, grad_r, 1e-10, 1e-10)


def test_sh_shading_and_vertex_normals_match_pytorch():
    g = torch.Generator().manual_seed(3)
    n = torch.nn.functional.normalize(torch.randn(200, 3, dtype=torch.float64, generator=g),
                                      dim=-1)
    sh = torch.randn(4, 9, 3, dtype=torch.float64, generator=g)
    batch = torch.sort(torch.randint(0, 4, (200,), generator=g)).values
    (out_n, grad_n), (out_r, grad_r) = _both(lambda a, s: sh_shading_packed(a, s, batch), n, sh)
    _close(out_n, out_r, 1e-12, 1e-12)
    _close(grad_n, grad_r, 1e-10, 1e-10)

    verts, faces, _ = _sphere_frags(torch.float64)
    verts = verts + 0.01 * torch.randn(verts.shape, dtype=torch.float64, generator=g)
    (out_n, grad_n), (out_r, grad_r) = _both(lambda v: vertex_normals(v, faces), verts)
    _close(out_n, out_r, 1e-12, 1e-12)
    _close(grad_n, grad_r, 1e-9, 1e-9)


def test_gradcheck_every_op_float64():
    g = torch.Generator().manual_seed(4)
    verts, faces, size = _sphere_frags(torch.float64, B=2, size=12)
    frags = rasterize(verts, faces, size)
    P = frags.pix.shape[0]
    v = verts.reshape(-1, 3).clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: numba_ops.Barycentrics.apply(x, frags.vert_idx, frags.pix, frags.segments,
                                               size, size), (v,))
    values = torch.randn(v.shape[0], 2, dtype=torch.float64, generator=g, requires_grad=True)
    bary = frags.bary_packed.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: numba_ops.Interpolate.apply(a, frags.vert_idx, b, frags.segments),
        (values, bary))
    tex = torch.rand(2, 3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    # away from texel centres and the border, where bilinear lookup is not differentiable
    grid = (torch.rand(P, 2, dtype=torch.float64, generator=g) * 1.4 - 0.7).requires_grad_()
    batch = frags.batch_packed
    assert torch.autograd.gradcheck(
        lambda t, q: numba_ops.SampleTexture.apply(t, q, batch, frags.segments), (tex, grid))
    n = torch.randn(P, 3, dtype=torch.float64, generator=g, requires_grad=True)
    sh = torch.randn(2, 9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, s: numba_ops.SHShading.apply(a, s, batch, frags.segments,
                                               (0.5, 1, 2, 3, 4, 5, 6, 7, 8)), (n, sh))
    vv = verts.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: numba_ops.VertexNormalSums.apply(x, faces), (vv,))


def test_full_render_matches_pytorch_path():
    B = 3
    v, faces, uv, uv_faces = demo_head([(0.1, 0.3 * b, 0.0) for b in range(B)])
    r = DecaRenderer(faces, uv, uv_faces, image_size=64, uv_size=32)
    g = torch.Generator().manual_seed(5)
    cam = torch.tensor([[7.5, 0.0, 0.02]]).expand(B, 3)
    albedo = torch.rand(B, 3, 32, 32, generator=g)
    sh = 0.3 * torch.randn(B, 9, 3, generator=g)
    sh[:, 0] += 3.0

    def fn(vv, a, s):
        return r.render(vv, weak_perspective_project(vv, cam), a, s)["images"]

    (out_n, grad_n), (out_r, grad_r) = _both(fn, v, albedo, sh)
    _close(out_n, out_r, 1e-4, 1e-4)
    for gn, gr in zip(grad_n, grad_r):
        # float32 sums in a different order: compare relative to the gradient's scale
        assert (gn - gr).abs().max() <= 1e-3 * gr.abs().max()


def _render_and_grads(threads: int):
    with cpu_threads_within(threads):
        v, faces, uv, uv_faces = demo_head([(0.1, 0.4 * b - 0.4, 0.0) for b in range(3)])
        r = DecaRenderer(faces, uv, uv_faces, image_size=48, uv_size=16)
        g = torch.Generator().manual_seed(6)
        albedo = torch.rand(3, 3, 16, 16, generator=g).requires_grad_()
        sh = (0.3 * torch.randn(3, 9, 3, generator=g) + 1.0).requires_grad_()
        verts = v.clone().requires_grad_()
        out = r.render(verts, weak_perspective_project(verts, torch.tensor([[7.5, 0.0, 0.0]])),
                       albedo, sh)["images"]
        (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), verts.grad, albedo.grad, sh.grad


def test_one_thread_runs_the_serial_build_with_the_same_results(monkeypatch):
    """One torch thread takes the plain-loop build (no OpenMP team: nothing spins on a
    contended machine); it must give what the parallel build gives. Not to the bit: torch's
    own ops around them (matmuls, sums) change rounding with the thread count, by ~2e-5 of
    the scale, as much with the PyTorch ops."""
    if numba_ops.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one CPU: numba has no parallel build to compare with")
    calls = []
    loop = numba_ops._bary_fwd
    for build in ("serial", "parallel"):
        fn = getattr(loop, build)
        monkeypatch.setattr(loop, build,
                            lambda *a, fn=fn, build=build: calls.append(build) or fn(*a))
    one = _render_and_grads(1)
    assert set(calls) == {"serial"}
    calls.clear()
    two = _render_and_grads(2)
    assert set(calls) == {"parallel"}
    for a, b in zip(one, two):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
