"""The FLAME layer: shape/expression blendshapes, pose correctives, skinning, landmarks.

Works with any :class:`recon.face_model.face_assets.FaceModelAssets` (real FLAME or the demo head).
Pose convention as DECA: ``pose (B, 6)`` = global axis-angle (3) | jaw axis-angle (3); neck and
eye poses default to zero. All tensors follow the module's device/dtype (``.to(...)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recon.config import FaceModelConfig
from recon.face_model.face_assets import FaceModelAssets
from recon.landmarks import NOW7_STATIC
from recon.face_model.lbs import (
    batch_rodrigues,
    lbs,
    posedirs_matrix,
    rot_mat_to_yaw,
    vertices2landmarks,
    yaw_to_contour_bin,
)


@dataclass
class FlameOutput:
    """vertices (B, V, 3); landmarks2d (B, 68, 3): 17 yaw-dependent contour + 51 static points
    (3D positions, to be projected by the camera); landmarks3d (B, 68, 3): full embedding;
    now7 (B, 7, 3); joints (B, 5, 3) posed joints."""

    vertices: torch.Tensor
    landmarks2d: torch.Tensor
    landmarks3d: torch.Tensor
    now7: torch.Tensor
    joints: torch.Tensor


class FLAME(nn.Module):
    """FLAME as a ``torch.nn.Module`` (no trainable parameters, only buffers)."""

    def __init__(self, assets: FaceModelAssets, n_shape: int = 100, n_exp: int = 50) -> None:
        super().__init__()
        if not 0 < n_shape <= assets.n_shape_total:
            raise ValueError(f"n_shape={n_shape}: model '{assets.name}' has {assets.n_shape_total} shape components")
        if not 0 < n_exp <= assets.n_exp_total:
            raise ValueError(f"n_exp={n_exp}: model '{assets.name}' has {assets.n_exp_total} expression components")
        self.n_shape, self.n_exp = n_shape, n_exp
        self.model_name = assets.name
        self.expression_names = list(assets.expression_names)
        S = assets.n_shape_total
        f32 = torch.float32
        shapedirs = torch.cat(
            [torch.as_tensor(assets.shapedirs[:, :, :n_shape]), torch.as_tensor(assets.shapedirs[:, :, S : S + n_exp])],
            dim=2,
        )
        self.register_buffer("v_template", torch.as_tensor(assets.v_template, dtype=f32))
        self.register_buffer("shapedirs", shapedirs.to(f32).contiguous())
        self.register_buffer("posedirs", posedirs_matrix(torch.as_tensor(assets.posedirs, dtype=f32)))
        self.register_buffer("J_regressor", torch.as_tensor(assets.J_regressor, dtype=f32))
        self.register_buffer("lbs_weights", torch.as_tensor(assets.weights, dtype=f32))
        self.register_buffer("parents", torch.as_tensor(assets.parents, dtype=torch.long))
        self.register_buffer("faces", torch.as_tensor(assets.faces, dtype=torch.long))
        self.register_buffer("uv_coords", torch.as_tensor(assets.vt, dtype=f32))
        self.register_buffer("uv_faces", torch.as_tensor(assets.ft, dtype=torch.long))
        self.register_buffer("static_lmk_faces_idx", torch.as_tensor(assets.static_lmk_faces_idx, dtype=torch.long))
        self.register_buffer("static_lmk_bary_coords", torch.as_tensor(assets.static_lmk_bary_coords, dtype=f32))
        self.register_buffer("dynamic_lmk_faces_idx", torch.as_tensor(assets.dynamic_lmk_faces_idx, dtype=torch.long))
        self.register_buffer("dynamic_lmk_bary_coords", torch.as_tensor(assets.dynamic_lmk_bary_coords, dtype=f32))
        self.register_buffer("full_lmk_faces_idx", torch.as_tensor(assets.full_lmk_faces_idx, dtype=torch.long))
        self.register_buffer("full_lmk_bary_coords", torch.as_tensor(assets.full_lmk_bary_coords, dtype=f32))
        self.register_buffer("now7_idx", torch.as_tensor(NOW7_STATIC, dtype=torch.long))
        # Chain from the root to the neck: the contour's yaw is that of global x neck.
        chain, j = [], 1
        while j != -1:
            chain.append(j)
            j = int(assets.parents[j])
        self._neck_chain = chain[::-1]  # [0, 1]

    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    def _zeros(self, B: int, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(B, n, dtype=like.dtype, device=like.device)

    def forward(
        self,
        shape: torch.Tensor,
        expression: torch.Tensor,
        pose: torch.Tensor,
        neck_pose: torch.Tensor | None = None,
        eye_pose: torch.Tensor | None = None,
    ) -> FlameOutput:
        """shape (B, n_shape), expression (B, n_exp), pose (B, 6) [global 3 | jaw 3],
        neck_pose (B, 3) or None (zeros), eye_pose (B, 6) [left 3 | right 3] or None."""
        B = shape.shape[0]
        if shape.shape != (B, self.n_shape) or expression.shape != (B, self.n_exp) or pose.shape != (B, 6):
            raise ValueError(
                f"expected shape (B,{self.n_shape}), expression (B,{self.n_exp}), pose (B,6); got "
                f"{tuple(shape.shape)}, {tuple(expression.shape)}, {tuple(pose.shape)}"
            )
        dtype = self.v_template.dtype
        shape, expression, pose = (t.to(dtype) for t in (shape, expression, pose))
        neck_pose = self._zeros(B, 3, pose) if neck_pose is None else neck_pose.to(dtype)
        eye_pose = self._zeros(B, 6, pose) if eye_pose is None else eye_pose.to(dtype)
        full_pose = torch.cat([pose[:, :3], neck_pose, pose[:, 3:], eye_pose], dim=1)  # (B, 15)
        betas = torch.cat([shape, expression], dim=1)
        rot_mats = batch_rodrigues(full_pose.reshape(-1, 3)).reshape(B, -1, 3, 3)
        vertices, joints = lbs(
            betas, rot_mats, self.v_template, self.shapedirs, self.posedirs,
            self.J_regressor, self.parents, self.lbs_weights,
        )
        # Dynamic contour chosen by the yaw of the neck chain.
        chain_rot = rot_mats[:, self._neck_chain[0]]
        for j in self._neck_chain[1:]:
            chain_rot = torch.bmm(chain_rot, rot_mats[:, j])
        bins = yaw_to_contour_bin(rot_mat_to_yaw(chain_rot.detach()))
        dyn_idx = self.dynamic_lmk_faces_idx[bins]  # (B, 17)
        dyn_bary = self.dynamic_lmk_bary_coords[bins]
        static_idx = self.static_lmk_faces_idx[None].expand(B, -1)
        static_bary = self.static_lmk_bary_coords[None].expand(B, -1, -1)
        lmk2d = vertices2landmarks(
            vertices, self.faces, torch.cat([dyn_idx, static_idx], 1), torch.cat([dyn_bary, static_bary], 1)
        )
        lmk3d = vertices2landmarks(
            vertices, self.faces, self.full_lmk_faces_idx[None].expand(B, -1),
            self.full_lmk_bary_coords[None].expand(B, -1, -1),
        )
        static = lmk2d[:, 17:]
        now7 = static[:, self.now7_idx]
        return FlameOutput(vertices=vertices, landmarks2d=lmk2d, landmarks3d=lmk3d, now7=now7, joints=joints)

    def template_output(self, batch_size: int = 1) -> FlameOutput:
        """The neutral model (all parameters zero)."""
        z = self.v_template
        return self(
            torch.zeros(batch_size, self.n_shape, dtype=z.dtype, device=z.device),
            torch.zeros(batch_size, self.n_exp, dtype=z.dtype, device=z.device),
            torch.zeros(batch_size, 6, dtype=z.dtype, device=z.device),
        )


def build_flame(cfg: FaceModelConfig | None = None) -> FLAME:
    """The FLAME layer for a config (default: the demo head, 100 shape / 50 expression)."""
    from recon.face_model.flame_io import load_face_model

    cfg = cfg or FaceModelConfig()
    assets = load_face_model(cfg)
    return FLAME(assets, n_shape=min(cfg.n_shape, assets.n_shape_total), n_exp=min(cfg.n_exp, assets.n_exp_total))
