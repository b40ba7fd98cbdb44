"""Linear blend skinning for FLAME-format models (pure PyTorch, batched, differentiable).

Conventions follow SMPL/FLAME: axis-angle rotations, pose correctives driven by the flattened
``R - I`` of every non-root joint, joints regressed from the shaped (unposed) vertices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_rodrigues(rot_vecs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Axis-angle to rotation matrices.

    rot_vecs: (N, 3) -> (N, 3, 3). Smooth at zero (the angle is computed from ``|v| + eps``,
    so gradients exist there too).
    """
    angle = torch.norm(rot_vecs + eps, dim=1, keepdim=True)  # (N, 1)
    axis = rot_vecs / angle
    cos = torch.cos(angle)[:, :, None]
    sin = torch.sin(angle)[:, :, None]
    rx, ry, rz = axis[:, 0], axis[:, 1], axis[:, 2]
    zeros = torch.zeros_like(rx)
    K = torch.stack([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device)[None]
    return eye + sin * K + (1 - cos) * torch.bmm(K, K)


def transform_mat(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """R: (N, 3, 3), t: (N, 3, 1) -> homogeneous (N, 4, 4)."""
    return torch.cat([F.pad(R, [0, 0, 0, 1]), F.pad(t, [0, 0, 0, 1], value=1.0)], dim=2)


def batch_rigid_transform(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose the kinematic chain.

    rot_mats: (B, J, 3, 3) local rotations; joints: (B, J, 3) rest joint locations;
    parents: (J,) long, ``parents[0] == -1`` and ``parents[i] < i``.
    Returns posed joints (B, J, 3) and relative transforms (B, J, 4, 4) mapping rest-pose
    points to posed points (the rest joint location already removed), as LBS needs.
    """
    B, J = joints.shape[:2]
    rel_joints = joints.clone()
    rel_joints[:, 1:] = rel_joints[:, 1:] - joints[:, parents[1:]]
    local = transform_mat(rot_mats.reshape(-1, 3, 3), rel_joints.reshape(-1, 3, 1)).reshape(B, J, 4, 4)
    chain = [local[:, 0]]
    for i in range(1, J):
        chain.append(torch.matmul(chain[int(parents[i])], local[:, i]))
    transforms = torch.stack(chain, dim=1)  # (B, J, 4, 4)
    posed_joints = transforms[:, :, :3, 3]
    # Remove the rest location: T_rel(x) = T (x - j) in homogeneous form.
    joints_h = F.pad(joints, [0, 1])[..., None]  # (B, J, 4, 1) with 0 in w
    rel = transforms - F.pad(torch.matmul(transforms, joints_h), [3, 0])
    return posed_joints, rel


def lbs(
    betas: torch.Tensor,
    pose: torch.Tensor,
    v_template: torch.Tensor,
    shapedirs: torch.Tensor,
    posedirs: torch.Tensor,
    J_regressor: torch.Tensor,
    parents: torch.Tensor,
    lbs_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend shapes, pose correctives and skinning.

    betas: (B, C) blendshape coefficients for ``shapedirs (V, 3, C)``;
    pose: (B, J*3) axis-angle per joint (or (B, J, 3, 3) rotation matrices);
    v_template: (V, 3); posedirs: (P, V*3) with P = 9*(J-1) (FLAME's (V,3,P) already
    reshaped, see :func:`posedirs_matrix`); J_regressor: (J, V); parents: (J,);
    lbs_weights: (V, J).
    Returns vertices (B, V, 3) and posed joints (B, J, 3).
    """
    B = betas.shape[0]
    v_shaped = v_template[None] + torch.einsum("bc,vkc->bvk", betas, shapedirs)
    joints = torch.einsum("jv,bvk->bjk", J_regressor, v_shaped)
    J = joints.shape[1]
    if pose.dim() == 4:
        rot_mats = pose
    else:
        rot_mats = batch_rodrigues(pose.reshape(-1, 3)).reshape(B, J, 3, 3)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rot_mats[:, 1:] - eye).reshape(B, -1)  # (B, 9*(J-1))
    v_posed = v_shaped + torch.matmul(pose_feature, posedirs).reshape(B, -1, 3)
    posed_joints, A = batch_rigid_transform(rot_mats, joints, parents)
    T = torch.einsum("vj,bjmn->bvmn", lbs_weights, A)  # (B, V, 4, 4)
    v_h = F.pad(v_posed, [0, 1], value=1.0)[..., None]  # (B, V, 4, 1)
    verts = torch.matmul(T, v_h)[:, :, :3, 0]
    return verts, posed_joints


def posedirs_matrix(posedirs: torch.Tensor) -> torch.Tensor:
    """FLAME's ``posedirs (V, 3, P)`` -> the ``(P, V*3)`` matrix :func:`lbs` multiplies."""
    P = posedirs.shape[-1]
    return posedirs.reshape(-1, P).t().contiguous()


def vertices2landmarks(
    vertices: torch.Tensor, faces: torch.Tensor, lmk_faces_idx: torch.Tensor, lmk_bary_coords: torch.Tensor
) -> torch.Tensor:
    """Barycentric interpolation of landmarks on mesh triangles.

    vertices: (B, V, 3); faces: (F, 3) long; lmk_faces_idx: (B, L) long;
    lmk_bary_coords: (B, L, 3). Returns (B, L, 3).
    """
    B, L = lmk_faces_idx.shape
    tri = faces[lmk_faces_idx.reshape(-1)].reshape(B, L, 3)  # vertex ids
    batch = torch.arange(B, device=vertices.device)[:, None, None]
    corners = vertices[batch, tri]  # (B, L, 3, 3): corner, xyz
    return torch.einsum("blk,blkd->bld", lmk_bary_coords.to(vertices.dtype), corners)


def rot_mat_to_yaw(rot_mats: torch.Tensor) -> torch.Tensor:
    """Rotation about y (radians) of (N, 3, 3) matrices, as DECA/FLAME compute it for the
    dynamic contour: ``atan2(-R[2,0], sqrt(R[0,0]^2 + R[1,0]^2))``. Positive yaw turns the
    face (+z) toward +x."""
    sy = torch.sqrt(rot_mats[:, 0, 0] ** 2 + rot_mats[:, 1, 0] ** 2)
    return torch.atan2(-rot_mats[:, 2, 0], sy)


def yaw_to_contour_bin(yaw: torch.Tensor) -> torch.Tensor:
    """Yaw (radians, (N,)) -> dynamic-contour bin in [0, 78], FLAME's rule and table layout.

    With ``a = round(yaw in degrees)`` clamped to at most 39 (the sign as FLAME's and DECA's
    code use it, not mirrored): bins 0..39 hold a = 0..39 and bins 40..78 hold a = -1..-39
    (bin = 39 - a); a < -39 maps to 78.
    """
    a = torch.round(torch.clamp(yaw * (180.0 / torch.pi), max=39.0)).long()
    neg = a < 0
    neg_bin = torch.where(a < -39, torch.full_like(a, 78), 39 - a)
    return torch.where(neg, neg_bin, a)


def contour_bin_angle_deg(bin_index: int) -> float:
    """Inverse of :func:`yaw_to_contour_bin`: the yaw (degrees) a bin's contour is for."""
    return float(bin_index) if bin_index <= 39 else float(39 - bin_index)
