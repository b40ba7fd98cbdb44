"""Differentiable renderer in pure PyTorch (CPU and GPU), DECA-style.

Conventions: NDC x right, y up, z toward the camera (larger z nearer); pixel (i, j) is row
i from the top, column j from the left, sampled at its centre; the landmark / image
convention is [-1, 1] with y DOWN (``ndc_to_image``). See docs/renderer.md.
"""
from recon.render.backends import BackendUnavailable, available_backends, get_backend
from recon.render.cameras import (PerspectiveCamera, image_to_pixel, ndc_to_image,
                                  ndc_to_pixel, weak_perspective_project)
from recon.render.interpolate import (face_normals, interpolate, interpolate_packed,
                                      vertex_normals)
from recon.render.overlay import draw_landmarks
from recon.render.rasterize import Fragments, barycentric_step, rasterize
from recon.render.renderer import DecaRenderer, RenderOutput, render_grey, shade_grey
from recon.render.shading import directional_shading, sh_basis, sh_shading, sh_shading_packed
from recon.render.texture import sample_texture, sample_texture_packed, uv_to_grid
from recon.render.uv import UVRasterizer, grid_normals

__all__ = [
    "BackendUnavailable", "DecaRenderer", "Fragments", "PerspectiveCamera", "RenderOutput",
    "UVRasterizer",
    "available_backends", "barycentric_step", "directional_shading", "draw_landmarks",
    "face_normals", "get_backend", "grid_normals", "image_to_pixel", "interpolate",
    "interpolate_packed", "ndc_to_image", "ndc_to_pixel", "rasterize", "render_grey",
    "sample_texture", "sample_texture_packed", "sh_basis", "sh_shading",
    "sh_shading_packed", "shade_grey", "uv_to_grid",
    "vertex_normals", "weak_perspective_project",
]
