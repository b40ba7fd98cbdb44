"""LBS maths against independent computations (scipy rotations, explicit per-vertex blends)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from recon.face_model.lbs import (
    batch_rigid_transform,
    batch_rodrigues,
    contour_bin_angle_deg,
    lbs,
    posedirs_matrix,
    rot_mat_to_yaw,
    vertices2landmarks,
    yaw_to_contour_bin,
)


def test_rodrigues_matches_scipy():
    rng = np.random.default_rng(0)
    rv = rng.normal(size=(20, 3))
    ours = batch_rodrigues(torch.tensor(rv)).numpy()
    ref = Rotation.from_rotvec(rv).as_matrix()
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    np.testing.assert_allclose(batch_rodrigues(torch.zeros(1, 3, dtype=torch.float64)).numpy()[0], np.eye(3), atol=1e-7)


def test_rigid_transform_chain():
    # Two joints: root at origin, child at (1,0,0). Rotate root 90 deg about z.
    rot = torch.tensor(Rotation.from_rotvec([[0, 0, np.pi / 2], [0, 0, 0]]).as_matrix())[None]
    joints = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0]]], dtype=torch.float64)
    posed, rel = batch_rigid_transform(rot, joints, torch.tensor([-1, 0]))
    np.testing.assert_allclose(posed[0, 1].numpy(), [0, 1, 0], atol=1e-9)
    # rel maps a rest point to its posed location: (2,0,0) around the child -> (0,2,0).
    p = torch.tensor([2.0, 0, 0, 1], dtype=torch.float64)
    np.testing.assert_allclose((rel[0, 1] @ p)[:3].numpy(), [0, 2, 0], atol=1e-9)


def _toy_model(V=30, J=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    v_t = torch.randn(V, 3, generator=g, dtype=torch.float64)
    shapedirs = torch.randn(V, 3, 4, generator=g, dtype=torch.float64) * 0.1
    posedirs = torch.randn(V, 3, 9 * (J - 1), generator=g, dtype=torch.float64) * 0.01
    Jr = torch.rand(J, V, generator=g, dtype=torch.float64)
    Jr = Jr / Jr.sum(1, keepdim=True)
    w = torch.rand(V, J, generator=g, dtype=torch.float64)
    w = w / w.sum(1, keepdim=True)
    parents = torch.tensor([-1, 0, 1])
    return v_t, shapedirs, posedirs, Jr, w, parents


def test_lbs_against_explicit_loop():
    v_t, sd, pd, Jr, w, parents = _toy_model()
    rng = np.random.default_rng(1)
    betas = torch.tensor(rng.normal(size=(2, 4)))
    pose = torch.tensor(rng.normal(size=(2, 9)) * 0.4)
    verts, joints = lbs(betas, pose, v_t, sd, posedirs_matrix(pd), Jr, parents, w)
    for b in range(2):
        vs = v_t.numpy() + sd.numpy() @ betas[b].numpy()
        J = Jr.numpy() @ vs
        R = Rotation.from_rotvec(pose[b].numpy().reshape(3, 3)).as_matrix()
        feat = (R[1:] - np.eye(3)).reshape(-1)
        vp = vs + pd.numpy() @ feat
        G = []
        for j in range(3):
            T = np.eye(4)
            T[:3, :3] = R[j]
            T[:3, 3] = J[j] - (J[parents[j]] if j else 0)
            G.append(T if j == 0 else G[parents[j]] @ T)
        for i in range(len(vs)):
            M = sum(w[i, j].item() * (G[j] @ np.block([[np.eye(3), -J[j][:, None]], [np.zeros((1, 3)), 1]]))
                    for j in range(3))
            expected = (M @ np.append(vp[i], 1))[:3]
            np.testing.assert_allclose(verts[b, i].numpy(), expected, atol=1e-9)
        np.testing.assert_allclose(joints[b].numpy(), [G[j][:3, 3] for j in range(3)], atol=1e-9)


def test_vertices2landmarks_barycentric():
    verts = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 1]]])
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    idx = torch.tensor([[0, 1]])
    bary = torch.tensor([[[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]])
    out = vertices2landmarks(verts, faces, idx, bary)
    np.testing.assert_allclose(out[0].numpy(), [[0.3, 0.5, 0.0], [1, 0, 0]], atol=1e-7)


def flame_contour_bin(yaw_deg: float) -> int:
    """FLAME's contour bin as DECA's ``_find_dynamic_lmk_idx_and_bcoords`` computes it (read
    from decalib/models/FLAME.py): ``a = round(min(yaw, 39))`` in degrees with yaw from
    ``rot_mat_to_euler`` (no sign change); a >= 0 -> a; -39 <= a < 0 -> 39 - a; else 78."""
    a = int(np.round(min(yaw_deg, 39.0)))
    if a >= 0:
        return a
    return 78 if a < -39 else 39 - a


@pytest.mark.parametrize("deg,expected", [(0, 0), (10, 10), (39, 39), (60, 39), (-1, 40),
                                          (-20, 59), (-39, 78), (-70, 78)])
def test_contour_bins_follow_flame_rule(deg, expected):
    R = torch.tensor(Rotation.from_euler("y", deg, degrees=True).as_matrix())[None]
    yaw = rot_mat_to_yaw(R)
    assert abs(np.rad2deg(yaw.item()) - np.clip(deg, -90, 90)) < 1e-6
    assert flame_contour_bin(deg) == expected
    assert yaw_to_contour_bin(yaw).item() == expected
    if abs(deg) <= 39:
        assert contour_bin_angle_deg(expected) == deg


def test_contour_bins_over_the_yaw_range():
    degs = np.concatenate([np.arange(-60, 60.1, 3.0), [-39.6, -39.4, -0.6, -0.4, 0.4, 38.6, 39.4]])
    R = torch.tensor(Rotation.from_euler("y", degs[:, None], degrees=True).as_matrix())
    got = yaw_to_contour_bin(rot_mat_to_yaw(R)).tolist()
    assert got == [flame_contour_bin(d) for d in degs]
