"""Cameras, interpolation, shading, textures, UV space, visibility, overlay and the
DECA-style renderer, against closed forms and float64 gradcheck."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon.render import (DecaRenderer, PerspectiveCamera, draw_landmarks, interpolate,
                          ndc_to_image, rasterize, sample_texture, sample_texture_packed,
                          sh_shading, sh_shading_packed, vertex_normals,
                          weak_perspective_project)
from render_reference import demo_head, grid_mesh, rotation_y, t64, uv_sphere


def _quad(z: float = 0.0, flip: bool = False):
    """A quad covering the whole NDC square, uv = ((x+1)/2, (y+1)/2)."""
    v = torch.tensor([[-1, -1, z], [1, -1, z], [1, 1, z], [-1, 1, z]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    if flip:
        f = f[:, [0, 2, 1]]
    uv = (v[:, :2] + 1) / 2
    return v, f, uv


def test_cameras():
    X = torch.tensor([[[0.1, -0.2, 0.3]]])
    ndc = weak_perspective_project(X, torch.tensor([[2.0, 0.5, -0.5]]))
    torch.testing.assert_close(ndc, torch.tensor([[[1.2, -1.4, 0.6]]]))
    torch.testing.assert_close(ndc_to_image(ndc), torch.tensor([[[1.2, 1.4, 0.6]]]))
    cam = PerspectiveCamera(focal=2.0, cx=0.1, cy=-0.1, tz=3.0)
    p = cam.project(torch.tensor([[[0.5, 0.25, 1.0], [0.0, 0.0, 3.5]]]))
    torch.testing.assert_close(p[0, 0], torch.tensor([2.0 * 0.5 / 2 + 0.1, 2.0 * 0.25 / 2 - 0.1,
                                                      0.5]))
    assert torch.isnan(p[0, 1]).all()  # behind the camera


def test_pixel_convention_top_left():
    # a small triangle in the upper-left quadrant of NDC lands in the top-left pixels
    v = torch.tensor([[[-0.9, 0.9, 0.0], [-0.5, 0.9, 0.0], [-0.9, 0.5, 0.0]]])
    p2f = rasterize(v, torch.tensor([[0, 1, 2]]), 20).pix_to_face[0]
    rows, cols = torch.nonzero(p2f >= 0).unbind(1)
    assert rows.max() < 5 and cols.max() < 5 and rows.min() == 1 and cols.min() == 1


def test_interpolation_reproduces_affine_functions():
    v, f = uv_sphere(12, 24)
    vt = t64(v @ rotation_y(0.4).T * 0.8)[None]
    ft = torch.as_tensor(f)
    attrs = torch.stack([2 * vt[..., 0] - vt[..., 1] + 0.3, vt[..., 2]], -1)
    frags = rasterize(vt, ft, 40)
    img = interpolate(frags, ft, attrs)
    mask = frags.pix_to_face[0] >= 0
    c = -1 + (2 * torch.arange(40, dtype=torch.float64) + 1) / 40
    X, Y = c[None, :].expand(40, 40), -c[:, None].expand(40, 40)
    torch.testing.assert_close(img[0, 0][mask], (2 * X - Y + 0.3)[mask])
    torch.testing.assert_close(img[0, 1][mask], frags.zbuf[0][mask])
    assert (img[0][:, ~mask] == 0).all()


def test_vertex_normals_of_sphere_are_radial():
    v, f = uv_sphere(24, 48)
    n = vertex_normals(t64(v)[None], torch.as_tensor(f))[0]
    cos = (n * t64(v)).sum(-1)
    assert cos.min() > 0.995


def test_sh_constants_and_shading():
    rng = np.random.default_rng(0)
    n = rng.normal(size=(1, 3, 4, 5))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    sh = rng.normal(size=(1, 9, 3))
    x, y, z = n[0]
    # DECA's constants: 1/sqrt(4 pi), (2 pi / 3) sqrt(3 / 4 pi), (pi / 4) 3 sqrt(5 / 12 pi),
    # (pi / 4) (3 / 2) sqrt(5 / 12 pi), (pi / 4) (1 / 2) sqrt(5 / 4 pi)
    k = [0.28209479, 1.02332671, 1.02332671, 1.02332671, 0.85808553, 0.85808553, 0.85808553,
         0.42904276, 0.24770795]
    basis = [np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1]
    want = sum(k[i] * basis[i][None] * sh[0, i][:, None, None] for i in range(9))
    got = sh_shading(t64(n), t64(sh))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)


def test_packed_texture_lookup_equals_grid_sample_per_image():
    """The stacked-maps lookup equals grid_sample on each map, values and gradients,
    including points beyond the border (clamped, never reading the neighbouring map)."""
    g = torch.Generator().manual_seed(0)
    B, C, H, W, P = 3, 2, 5, 7, 200
    tex = torch.rand(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    grid = ((torch.rand(P, 2, generator=g, dtype=torch.float64) - 0.5) * 2.4).requires_grad_()
    batch = torch.randint(0, B, (P,), generator=g)
    got = sample_texture_packed(tex, grid, batch)
    want = torch.cat([sample_texture(tex[b:b + 1], grid[batch == b].view(1, 1, -1, 2))
                      [0, :, 0].t() for b in range(B)])
    order = torch.cat([(batch == b).nonzero().squeeze(1) for b in range(B)])
    torch.testing.assert_close(got[order], want)
    w = torch.rand(P, C, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad((got[order] * w[order]).sum(), (tex, grid))
    g2 = torch.autograd.grad((want * w[order]).sum(), (tex, grid))
    torch.testing.assert_close(g1[0], g2[0])
    torch.testing.assert_close(g1[1], g2[1])
    # one map shared by every image (B = 1): every point reads it
    shared = sample_texture_packed(tex[1:2], grid, batch)
    torch.testing.assert_close(shared, sample_texture(tex[1:2], grid.view(1, 1, -1, 2))[0, :, 0].t())


def test_packed_sh_shading_equals_image_shading():
    g = torch.Generator().manual_seed(1)
    n = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64), dim=1)
    sh = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    want = sh_shading(n, sh)  # (2, 3, 4, 5)
    packed = n.permute(0, 2, 3, 1).reshape(-1, 3)
    batch = torch.arange(2).repeat_interleave(20)
    got = sh_shading_packed(packed, sh, batch)
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(-1, 3))


def test_texture_and_world2uv_identity_layout():
    v, f, uv = _quad()
    S = 16
    r = DecaRenderer(f, uv, f, image_size=S, uv_size=S).double()
    tex = torch.rand(1, 3, S, S, dtype=torch.float64)
    out = r.render(v[None], v[None], tex, lights=None)
    torch.testing.assert_close(out["albedo_images"], tex)  # pixel centre == texel centre
    assert (out["alpha"] == 1).all()
    pos = r.world2uv(v[None])
    c = -1 + (2 * torch.arange(S, dtype=torch.float64) + 1) / S
    torch.testing.assert_close(pos[0, 0], c[None, :].expand(S, S))  # u right
    torch.testing.assert_close(pos[0, 1], -c[:, None].expand(S, S))  # row 0 is v = 1


def test_displacement_to_normals_of_a_ramp():
    n = 9
    v, f = grid_mesh(n, -1.0, 1.0)
    uv = (v[:, :2] + 1) / 2
    vt, ft = t64(v)[None], torch.as_tensor(f)
    r = DecaRenderer(ft, t64(uv), ft, image_size=32, uv_size=32).double()
    flat = r.displacement_to_normals(torch.zeros(1, 1, 32, 32, dtype=torch.float64), vt)
    inner = r.uv.interior[0, 0] > 0
    torch.testing.assert_close(flat[0, 2][inner], torch.ones_like(flat[0, 2][inner]))
    a = 0.3  # displacement a*u -> surface z = a (x + 1) / 2, normal ~ (-a/2, 0, 1)
    u = ((torch.arange(32, dtype=torch.float64) + 0.5) / 32)[None, :].expand(32, 32)
    nd = r.displacement_to_normals((a * u)[None, None], vt)
    want = torch.tensor([-a / 2, 0.0, 1.0], dtype=torch.float64)
    want = want / want.norm()
    got = nd[0][:, inner].T
    torch.testing.assert_close(got, want.expand_as(got))
    # mask: no detail where the mask is 0
    nm = r.displacement_to_normals((a * u)[None, None], vt, torch.zeros(1, 1, 32, 32,
                                                                        dtype=torch.float64))
    torch.testing.assert_close(nm[0][:, inner], flat[0][:, inner])


def test_visibility_uv_facing_and_occlusion():
    # front quad (z = 0.5) owns the left half of UV space, a back quad (z = -0.5) right
    # behind it owns the right half: both face the camera, only the front one is seen.
    v = torch.tensor([[-0.8, -0.8, 0.5], [0.8, -0.8, 0.5], [0.8, 0.8, 0.5], [-0.8, 0.8, 0.5],
                      [-0.8, -0.8, -0.5], [0.8, -0.8, -0.5], [0.8, 0.8, -0.5],
                      [-0.8, 0.8, -0.5]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    uv = torch.tensor([[0.0, 0], [0.5, 0], [0.5, 1], [0, 1], [0.5, 0], [1, 0], [1, 1],
                       [0.5, 1]], dtype=torch.float64)
    r = DecaRenderer(f, uv, f, image_size=32, uv_size=16).double()
    vis = r.visibility_uv(v[None])[0, 0]
    assert (vis[:, :8] == 1).all() and (vis[:, 8:] == 0).all()
    facing_only = r.visibility_uv(v[None], occlusion=False)[0, 0]
    assert (facing_only == 1).all()
    # turned away from the camera: nothing visible
    back = v.clone()
    back[:, 0] = -back[:, 0]
    assert (r.visibility_uv(back[None]) == 0).all()


def test_draw_landmarks():
    img = torch.zeros(1, 3, 10, 10)
    lmk = torch.tensor([[[-0.9, -0.9], [0.3, 0.5], [5.0, 5.0]]])  # image convention, y down
    out = draw_landmarks(img, lmk, color=(1.0, 0.0, 0.0), radius=0)
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 7, 6] == 1  # row = (0.5+1)*5-0.5 = 7
    assert out.sum() == 2 and img.sum() == 0


def test_render_gradcheck_float64():
    v, f, uv = _quad()
    v = v * torch.tensor([0.8, 0.7, 1.0], dtype=torch.float64) + torch.tensor(
        [0.05, -0.03, 0.0], dtype=torch.float64)
    v[2, 2] = 0.3  # not planar: normals vary
    r = DecaRenderer(f, uv, f, image_size=8, uv_size=4).double()
    tex = torch.rand(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    sh = (torch.rand(1, 9, 3, dtype=torch.float64) * 0.5).requires_grad_()
    vw = (v + 0.01 * torch.rand_like(v))[None].requires_grad_()
    vn = v[None].clone().requires_grad_()

    def fn(vw, vn, tex, sh):
        return r.render(vw, vn, tex, sh)["images"]

    assert torch.autograd.gradcheck(fn, (vw, vn, tex, sh), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.fixture(scope="module")
def head():
    verts, faces, vt, ft = demo_head([(0.0, 0.3, 0.0), (0.1, -0.5, 0.0)])
    return verts, faces, vt, ft


def test_deca_renderer_on_demo_head(head):
    verts, faces, vt, ft = head
    r = DecaRenderer(faces, vt, ft, image_size=64, uv_size=64)
    cam = torch.tensor([[7.0, 0.0, 0.02], [7.5, 0.02, 0.0]])
    verts = verts.clone().requires_grad_()
    ndc = weak_perspective_project(verts, cam)
    albedo = torch.full((2, 3, 64, 64), 0.5, requires_grad=True)
    sh = torch.zeros(2, 9, 3)
    sh[:, 0] = 3.0
    sh[:, 3] = 1.0
    sh.requires_grad_()
    bg = torch.ones(2, 3, 64, 64)
    out = r.render(verts, ndc, albedo, sh, background=bg)
    alpha = out["alpha"]
    assert 0.15 < alpha.mean() < 0.9
    assert torch.isfinite(out["images"]).all()
    torch.testing.assert_close(out["images"] * (1 - alpha), bg * (1 - alpha))
    # front-lit head: shading = 3 * 0.282 + 1.023 * n_z, brighter where n_z is large
    n = out["normal_images"]
    cov = alpha[:, 0] > 0
    torch.testing.assert_close(n.norm(dim=1)[cov], torch.ones_like(n[:, 0][cov]))
    torch.testing.assert_close(out["shading_images"][:, 0][cov],
                               3 * 0.2820948 + 1.0233267 * n[:, 2][cov], rtol=1e-5, atol=1e-5)
    loss = (out["images"] * alpha).mean()
    loss.backward()
    assert verts.grad.abs().sum() > 0 and albedo.grad.abs().sum() > 0
    assert sh.grad.abs().sum() > 0
    shape = r.render_shape(verts.detach(), ndc.detach())
    assert shape.shape == (2, 3, 64, 64) and 0 <= shape.min() and shape.max() <= 1
    assert (shape * (1 - alpha) == 0).all() and shape[alpha.expand_as(shape) > 0].mean() > 0.2
    # landmarks from projected vertices land on covered pixels
    lmk = ndc_to_image(ndc.detach()[:, ::500])[..., :2]
    marked = draw_landmarks(torch.zeros(2, 3, 64, 64), lmk, color=(1.0, 1.0, 1.0), radius=0)
    assert (alpha.expand_as(marked)[marked > 0] == 1).float().mean() > 0.9
    # detail normals from a zero displacement reproduce the coarse shading look
    dn = r.displacement_to_normals(torch.zeros(2, 1, 64, 64), verts.detach())
    vis = r.visibility_uv(ndc.detach())
    assert 0.1 < vis.mean() < 0.9
    detail = r.render_shape(verts.detach(), ndc.detach(), detail_normals_uv=dn)
    assert (detail - shape).abs()[alpha.expand_as(shape) > 0].mean() < 0.1
