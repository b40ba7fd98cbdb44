"""The FLAME layer on the demo head: template, skinning, linearity, gradients, batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from recon.face_model.albedo import AlbedoModel
from recon.config import FaceModelConfig
from recon.face_model.flame import FLAME, build_flame
from recon.face_model.flame_io import load_face_model


@pytest.fixture(scope="module")
def assets():
    return load_face_model("demo-head")  # cached in-process: built once per test session


@pytest.fixture(scope="module")
def flame(assets):
    return FLAME(assets, n_shape=20, n_exp=10).double()


def zeros(flame, B=1):
    d = dict(dtype=torch.float64)
    return torch.zeros(B, flame.n_shape, **d), torch.zeros(B, flame.n_exp, **d), torch.zeros(B, 6, **d)


def test_zero_parameters_give_template(flame, assets):
    out = flame(*zeros(flame))
    np.testing.assert_allclose(out.vertices[0].numpy(), assets.v_template, atol=1e-6)
    np.testing.assert_allclose(out.joints[0].numpy(), assets.J_regressor @ assets.v_template, atol=1e-5)
    assert out.landmarks2d.shape == (1, 68, 3) and out.landmarks3d.shape == (1, 68, 3)
    assert out.now7.shape == (1, 7, 3)
    # At zero pose the frontal contour equals the full embedding's jaw line.
    np.testing.assert_allclose(out.landmarks2d.numpy(), out.landmarks3d.numpy(), atol=1e-6)
    np.testing.assert_allclose(out.now7[0].numpy(), out.landmarks3d[0, [36, 39, 42, 45, 33, 48, 54]].numpy(), atol=1e-9)


def test_jaw_rotation_moves_vertices_as_weights_say(flame, assets):
    shape, exp, pose = zeros(flame)
    angle = 0.3
    pose[0, 3] = angle
    out = flame(shape, exp, pose)
    v = assets.v_template.astype(np.float64)
    J = assets.J_regressor.astype(np.float64) @ v
    R = Rotation.from_rotvec([angle, 0, 0]).as_matrix()
    jaw = J[2]
    rotated = (v - jaw) @ R.T + jaw  # where a vertex would go if fully on the jaw
    w = assets.weights[:, 2:3].astype(np.float64)
    expected = (1 - w) * v + w * rotated  # other joints are not rotated: identity transform
    np.testing.assert_allclose(out.vertices[0].numpy(), expected, atol=1e-6)
    moved = np.linalg.norm(out.vertices[0].numpy() - v, axis=1)
    assert moved[assets.weights[:, 2] > 0.99].min() > 1e-3  # chin really moves
    assert moved[assets.weights[:, 2] == 0].max() < 1e-7


def test_global_rotation_is_rigid(flame, assets):
    shape, exp, pose = zeros(flame)
    pose[0, :3] = torch.tensor([0.1, 0.5, -0.2])
    out = flame(shape, exp, pose)
    R = Rotation.from_rotvec([0.1, 0.5, -0.2]).as_matrix()
    J0 = assets.J_regressor[0].astype(np.float64) @ assets.v_template
    expected = (assets.v_template - J0) @ R.T + J0
    np.testing.assert_allclose(out.vertices[0].numpy(), expected, atol=1e-6)


def test_eye_pose_rotates_only_eyeballs(flame, assets):
    shape, exp, pose = zeros(flame)
    out = flame(shape, exp, pose, eye_pose=torch.tensor([[0.0, 0.4, 0.0, 0.0, -0.4, 0.0]], dtype=torch.float64))
    d = np.linalg.norm(out.vertices[0].numpy() - assets.v_template, axis=1)
    eyes = np.concatenate([assets.masks["left_eyeball"], assets.masks["right_eyeball"]])
    others = np.setdiff1d(np.arange(len(d)), eyes)
    assert d[eyes].max() > 1e-3 and d[others].max() < 1e-7


def test_shape_and_expression_are_linear(flame, assets):
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(2, 1, flame.n_shape, generator=g, dtype=torch.float64)
    e1, e2 = torch.randn(2, 1, flame.n_exp, generator=g, dtype=torch.float64)
    pose = torch.zeros(1, 6, dtype=torch.float64)
    f = lambda s, e: flame(s, e, pose).vertices  # noqa: E731
    v0 = f(0 * s1, 0 * e1)
    lin = f(s1, e1) - v0 + 2 * (f(s2, e2) - v0)
    np.testing.assert_allclose((f(s1 + 2 * s2, e1 + 2 * e2) - v0).numpy(), lin.numpy(), atol=1e-9)
    # and equal to the basis columns
    S = assets.n_shape_total
    sd = np.concatenate([assets.shapedirs[:, :, : flame.n_shape], assets.shapedirs[:, :, S : S + flame.n_exp]], 2)
    expected = assets.v_template + sd @ np.concatenate([s1[0].numpy(), e1[0].numpy()])
    np.testing.assert_allclose(f(s1, e1)[0].numpy(), expected, atol=1e-5)


def test_gradients_reach_every_input(flame):
    g = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(2, flame.n_shape, generator=g, dtype=torch.float64) * 0.5,
        torch.randn(2, flame.n_exp, generator=g, dtype=torch.float64) * 0.5,
        torch.randn(2, 6, generator=g, dtype=torch.float64) * 0.2,
        torch.randn(2, 3, generator=g, dtype=torch.float64) * 0.2,
        torch.randn(2, 6, generator=g, dtype=torch.float64) * 0.2,
    ]
    for t in inputs:
        t.requires_grad_(True)
    out = flame(*inputs)
    loss = out.vertices.pow(2).sum() + out.landmarks2d.abs().sum() + out.landmarks3d.sum() + out.now7.sum()
    loss.backward()
    for name, t in zip(["shape", "expression", "pose", "neck_pose", "eye_pose"], inputs):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    # Jaw pose grads also exist at exactly zero pose (smooth Rodrigues).
    p0 = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    flame(*zeros(flame)[:2], p0).vertices.sum().backward()
    assert torch.isfinite(p0.grad).all() and p0.grad[0, 3].abs() > 0


def test_mixed_batch_equals_per_sample(flame):
    g = torch.Generator().manual_seed(2)
    B = 4
    shape = torch.randn(B, flame.n_shape, generator=g, dtype=torch.float64)
    exp = torch.randn(B, flame.n_exp, generator=g, dtype=torch.float64)
    pose = torch.randn(B, 6, generator=g, dtype=torch.float64) * 0.3
    pose[:, 1] = torch.tensor([-1.0, -0.3, 0.2, 0.9])  # different yaw bins per sample
    neck = torch.randn(B, 3, generator=g, dtype=torch.float64) * 0.1
    eye = torch.randn(B, 6, generator=g, dtype=torch.float64) * 0.1
    out = flame(shape, exp, pose, neck, eye)
    for b in range(B):
        one = flame(shape[b : b + 1], exp[b : b + 1], pose[b : b + 1], neck[b : b + 1], eye[b : b + 1])
        for key in ("vertices", "landmarks2d", "landmarks3d", "now7", "joints"):
            np.testing.assert_allclose(getattr(out, key)[b].numpy(), getattr(one, key)[0].numpy(), atol=1e-10)


def test_dynamic_contour_depends_on_yaw(flame):
    shape, exp, pose = zeros(flame, 2)
    pose[0, 1], pose[1, 1] = 0.5, -0.5
    out = flame(shape, exp, pose)
    assert not torch.allclose(out.landmarks2d[:, :17], out.landmarks3d[:, :17])
    torch.testing.assert_close(out.landmarks2d[:, 17:], out.landmarks3d[:, 17:])


def test_float32_and_device_follow_module(assets):
    f = FLAME(assets, 10, 5)
    out = f(torch.zeros(1, 10), torch.zeros(1, 5), torch.zeros(1, 6))
    assert out.vertices.dtype == torch.float32
    assert f.faces.dtype == torch.long and f.uv_faces.shape == f.faces.shape
    assert f.uv_coords.shape == (assets.vt.shape[0], 2)
    if torch.cuda.is_available():
        fc = f.to("cuda")
        out_c = fc(torch.zeros(1, 10, device="cuda"), torch.zeros(1, 5, device="cuda"), torch.zeros(1, 6, device="cuda"))
        assert out_c.vertices.is_cuda


def test_bad_sizes_are_rejected(assets):
    with pytest.raises(ValueError, match="n_shape"):
        FLAME(assets, n_shape=assets.n_shape_total + 1)
    f = FLAME(assets, 10, 5)
    with pytest.raises(ValueError, match="expected"):
        f(torch.zeros(1, 11), torch.zeros(1, 5), torch.zeros(1, 6))


def test_build_flame_from_config():
    f = build_flame(FaceModelConfig(n_shape=100, n_exp=50))
    assert (f.n_shape, f.n_exp) == (100, 50)


def test_albedo_model(assets):
    alb = AlbedoModel(assets, n_tex=50)
    tex = torch.zeros(2, 50)
    tex[1, 0] = 3.0
    out = alb(tex)
    assert out.shape == (2, 3, 256, 256)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), np.clip(assets.albedo_mean, 0, 1), atol=1e-6)
    assert (out[1] - out[0]).abs().max() > 0.05
    with pytest.raises(ValueError):
        AlbedoModel(assets, n_tex=assets.n_tex_total + 1)


def test_contour_bin_chosen_as_flame_does_from_root_and_neck():
    """A hand-made contour table whose 79 bins are told apart (bin b -> corner 0 of triangle
    b): the bin FLAME/DECA pick is computed here from their rule as read in DECA's
    ``FLAME._find_dynamic_lmk_idx_and_bcoords``: the relative rotation root @ neck, its yaw
    ``atan2(-R[2,0], hypot(R[0,0], R[1,0]))`` in degrees, ``a = round(min(yaw, 39))``, bin a
    for a >= 0, 39 - a down to -39, 78 below."""
    from tiny_face_model import tiny_face_assets

    assets = tiny_face_assets()
    assets.dynamic_lmk_faces_idx = np.repeat(np.arange(79)[:, None], 17, axis=1)
    assets.dynamic_lmk_bary_coords = np.tile(np.array([1.0, 0.0, 0.0]), (79, 17, 1))
    flame = FLAME(assets, n_shape=8, n_exp=3).double()
    rng = np.random.default_rng(3)
    yaws = np.concatenate([np.arange(-60.0, 61.0, 6.0), [-39.7, -0.3, 0.7, 38.8]])
    B = len(yaws)
    shape, exp, pose = (torch.zeros(B, n, dtype=torch.float64) for n in (8, 3, 6))
    root = Rotation.from_euler("xy", np.stack([rng.uniform(-15, 15, B), yaws / 2], 1), degrees=True)
    neck = Rotation.from_euler("xy", np.stack([rng.uniform(-15, 15, B), yaws / 2], 1), degrees=True)
    pose[:, :3] = torch.tensor(root.as_rotvec())
    out = flame(shape, exp, pose, neck_pose=torch.tensor(neck.as_rotvec()))
    R = (root * neck).as_matrix()
    yaw = np.rad2deg(np.arctan2(-R[:, 2, 0], np.hypot(R[:, 0, 0], R[:, 1, 0])))
    a = np.round(np.minimum(yaw, 39.0)).astype(int)
    expected = np.where(a >= 0, a, np.where(a < -39, 78, 39 - a))
    corner = torch.as_tensor(assets.faces[expected, 0])
    want = out.vertices[torch.arange(B), corner]  # (B, 3)
    torch.testing.assert_close(out.landmarks2d[:, :17], want[:, None].expand(-1, 17, -1))
    assert len(set(expected.tolist())) > 15  # the table's bins are really told apart
