"""A tiny FLAME-format face model for fast unit tests (NOT a head: a bumped 12x12 grid
facing +z, 144 vertices), built deterministically. Imported by test modules."""
from __future__ import annotations

import numpy as np

from recon.face_model.face_assets import FaceModelAssets


def tiny_face_assets(n: int = 12) -> FaceModelAssets:
    rng = np.random.default_rng(0)
    u = np.linspace(0.0, 1.0, n)
    uu, vv = np.meshgrid(u, u)  # row index = v
    x, y = 0.2 * uu - 0.1, 0.2 * vv - 0.1
    z = 0.05 * (1.0 - (x**2 + y**2) / 0.02)
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    V = verts.shape[0]
    idx = np.arange(V).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3),
                            np.stack([a, d, c], -1).reshape(-1, 3)])  # CCW seen from +z
    F = faces.shape[0]
    xs, ys = verts[:, 0:1], verts[:, 1:2]
    fields = [xs, ys, xs * ys * 10, xs**2 * 10, ys**2 * 10, np.ones_like(xs) * 0.1]
    dirs = [np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])]
    shape_basis = [0.05 * f * d for f in fields for d in dirs[2:]] + [0.05 * xs * dirs[0],
                                                                      0.05 * ys * dirs[1]]
    exp_basis = [0.05 * (ys < 0) * ys * dirs[1], 0.05 * np.abs(xs) * dirs[2],
                 0.05 * (xs * ys) * 10 * dirs[2]]
    shapedirs = np.stack(shape_basis + exp_basis, -1)  # (V, 3, 8 + 3)
    weights = np.zeros((V, 5))
    jaw = np.clip((-ys[:, 0] - 0.0) / 0.05, 0.0, 1.0)
    weights[:, 2] = jaw
    weights[:, 0] = 1.0 - jaw
    J = np.zeros((5, V))
    centre = np.argmin(np.linalg.norm(verts[:, :2], axis=1))
    J[0, centre] = J[1, centre] = 1.0
    J[2, idx[n // 2, n // 2]] = 1.0
    J[3, idx[3 * n // 4, n // 4]] = J[4, idx[3 * n // 4, 3 * n // 4]] = 1.0
    bary = np.full(3, 1.0 / 3.0)
    albedo_mean = np.full((16, 16, 3), 0.6) + 0.1 * np.linspace(-1, 1, 16)[None, :, None]
    return FaceModelAssets(
        v_template=verts, faces=faces, shapedirs=shapedirs, n_shape_total=8, n_exp_total=3,
        posedirs=np.zeros((V, 3, 36)), J_regressor=J, weights=weights,
        parents=np.array([-1, 0, 1, 1, 1]),
        static_lmk_faces_idx=rng.integers(0, F, 51), static_lmk_bary_coords=np.tile(bary, (51, 1)),
        dynamic_lmk_faces_idx=np.tile(rng.integers(0, F, 17), (79, 1)),
        dynamic_lmk_bary_coords=np.tile(bary, (79, 17, 1)),
        full_lmk_faces_idx=rng.integers(0, F, 68), full_lmk_bary_coords=np.tile(bary, (68, 1)),
        vt=np.stack([uu, vv], -1).reshape(-1, 2), ft=faces,
        albedo_mean=albedo_mean, albedo_basis=0.05 * rng.standard_normal((16, 16, 3, 4)),
        masks={"face": np.arange(V)}, name="tiny-test-grid",
    )
