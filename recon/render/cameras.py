"""Cameras: mesh coordinates -> the renderer's NDC.

NDC convention (shared by every part of ``recon.render``):
x in [-1, 1] left -> right, y in [-1, 1] bottom -> top (y UP), z toward the camera (larger z
is nearer; the FLAME head faces +z, toward the camera). -1 and +1 are the outer edges of the
image, so pixel column j has its centre at x = -1 + (2j + 1) / W and row i (row 0 at the top)
at y = 1 - (2i + 1) / H, as ``grid_sample(align_corners=False)``.

Landmark / image convention (the preprocessing's): the same [-1, 1] range, x right, y DOWN.
``ndc_to_image`` converts; landmark losses compare ``ndc_to_image(verts_ndc)[..., :2]`` with
targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def weak_perspective_project(verts: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """DECA's orthographic camera: ``x = s (X + tx)``, ``y = s (Y + ty)``, ``z = s Z``.

    verts: (B, V, 3) world coordinates; cam: (B, 3) = [s, tx, ty].
    Returns (B, V, 3) NDC (x right, y up, z toward the camera, scaled like x and y).
    """
    if cam.dim() != 2 or cam.shape[-1] != 3:
        raise ValueError(f"cam must be (B, 3) [s, tx, ty], got {tuple(cam.shape)}")
    s = cam[:, None, 0:1]
    xy = s * (verts[..., :2] + cam[:, None, 1:3])
    return torch.cat([xy, s * verts[..., 2:3]], dim=-1)


@dataclass(frozen=True)
class PerspectiveCamera:
    """Pinhole camera on the +z axis at distance ``tz`` from the origin, looking toward -z.

    A point at distance ``d = tz - Z`` in front of the camera projects to
    ``x = focal * X / d + cx``, ``y = focal * Y / d + cy`` (NDC, focal in NDC units: 1.0 is
    a 90 degree field of view across the image width), and ``z = 1 / d`` (inverse depth:
    larger is nearer and it is affine over a triangle in screen space, so the z-test is
    exact). Points at or behind ``near`` become NaN, so their triangles are skipped.
    Barycentrics are screen-space (no perspective correction), as pytorch3d's
    ``perspective_correct=False``.
    """

    focal: float
    cx: float = 0.0
    cy: float = 0.0
    tz: float = 1.0
    near: float = 1e-4

    def project(self, verts: torch.Tensor) -> torch.Tensor:
        """verts: (B, V, 3) world -> (B, V, 3) NDC."""
        d = self.tz - verts[..., 2:3]
        d = torch.where(d > self.near, d, torch.full_like(d, float("nan")))
        inv = 1.0 / d
        x = self.focal * verts[..., 0:1] * inv + self.cx
        y = self.focal * verts[..., 1:2] * inv + self.cy
        return torch.cat([x, y, inv], dim=-1)


def ndc_to_image(points: torch.Tensor) -> torch.Tensor:
    """NDC (y up) -> the [-1, 1] image convention (x right, y DOWN); other channels kept.

    points: (..., C >= 2). Returns the same shape with y negated.
    """
    return torch.cat([points[..., 0:1], -points[..., 1:2], points[..., 2:]], dim=-1)


def ndc_to_pixel(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """NDC -> pixel coordinates (column, row, z): pixel centres at integers, row 0 on top.

    points: (..., 3). Returns (..., 3) with ``col = (x + 1) W / 2 - 1/2`` and
    ``row = (1 - y) H / 2 - 1/2``; z unchanged.
    """
    col = (points[..., 0:1] + 1.0) * (width / 2.0) - 0.5
    row = (1.0 - points[..., 1:2]) * (height / 2.0) - 0.5
    return torch.cat([col, row, points[..., 2:3]], dim=-1)


def image_to_pixel(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[-1, 1] image convention (x right, y down) -> (column, row) pixel coordinates.

    points: (..., 2). Pixel centres at integers, -1 / +1 are the outer image edges.
    """
    col = (points[..., 0:1] + 1.0) * (width / 2.0) - 0.5
    row = (points[..., 1:2] + 1.0) * (height / 2.0) - 0.5
    return torch.cat([col, row], dim=-1)
