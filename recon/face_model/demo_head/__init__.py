"""The built-in ``demo-head``: a procedural head model in FLAME's format. NOT FLAME.

Generated deterministically by code (no data files), about FLAME's size (~5k vertices, ~10k
triangles), in FLAME's frame and units, with identity (300) and expression (100) blendshapes,
a jaw/neck/eye rig, an iBUG-68 landmark embedding with a yaw-dependent contour table, a UV
layout and a 50-component UV albedo basis. Pose correctives (``posedirs``) are zero.
See docs/face-model.md.
"""
from __future__ import annotations

import numpy as np

from recon.face_model.face_assets import FaceModelAssets

NAME = "demo-head"


def build_demo_head() -> FaceModelAssets:
    """Generate the demo head (about a second on one core)."""
    from recon.face_model.demo_head.albedo import build_albedo
    from recon.face_model.demo_head.bases import expression_basis, identity_basis
    from recon.face_model.demo_head.geometry import build_surface
    from recon.face_model.demo_head.rig import joint_regressor, landmark_embedding, skinning_weights

    surf = build_surface()
    shape = identity_basis(surf)
    expr, names = expression_basis(surf)
    albedo_mean, albedo_basis = build_albedo(surf)
    V = len(surf.verts)
    v = surf.verts
    head = np.arange(surf.head_count)
    face = head[(surf.face_weight[head] > 0.3) & (v[head, 1] > -0.1) & (v[head, 1] < 0.09)]
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    masks = {
        "face": face,
        "left_eyeball": surf.eyeballs["left"],
        "right_eyeball": surf.eyeballs["right"],
        "lips": head[(np.abs(x[head]) < 0.028) & (np.abs(y[head] + 0.043) < 0.013) & (z[head] > 0.05)],
        "nose": head[(np.abs(x[head]) < 0.02) & (y[head] > -0.022) & (y[head] < 0.035) & (z[head] > 0.08)],
        "eye_region": head[(np.abs(np.abs(x[head]) - 0.03) < 0.022) & (np.abs(y[head] - 0.033) < 0.02) & (z[head] > 0.04)],
        "neck": head[y[head] < -0.105],
        "mouth_interior": surf.mouth_bag,
        "scalp": head[(y[head] > 0.09) | ((z[head] < -0.02) & (y[head] > -0.05))],
    }
    return FaceModelAssets(
        v_template=v,
        faces=surf.faces,
        shapedirs=np.concatenate([shape, expr], axis=2),
        n_shape_total=shape.shape[2],
        n_exp_total=expr.shape[2],
        posedirs=np.zeros((V, 3, 36), np.float32),
        J_regressor=joint_regressor(surf),
        weights=skinning_weights(surf),
        parents=np.array([-1, 0, 1, 1, 1]),
        vt=surf.vt,
        ft=surf.ft,
        albedo_mean=albedo_mean,
        albedo_basis=albedo_basis,
        masks=masks,
        expression_names=names,
        name=NAME,
        **landmark_embedding(surf),
    )


__all__ = ["build_demo_head", "NAME"]
