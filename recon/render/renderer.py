"""A DECA-style renderer composed of the parts of ``recon.render``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from recon.render.cameras import ndc_to_pixel
from recon.render.interpolate import (interpolate_corners_packed, interpolate_packed,
                                      scatter_packed, vertex_normals)
from recon.render.rasterize import DEFAULT_CHUNK_PAIRS, Fragments, rasterize
from recon.render.shading import GREY_ALBEDO, directional_shading, sh_shading_packed
from recon.render.texture import sample_texture_packed, uv_to_grid
from recon.render.uv import UVRasterizer, grid_normals


def _normalize(x: torch.Tensor, dim: int, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def shade_grey(normals: torch.Tensor, batch: torch.Tensor,
               lights: torch.Tensor | None = None) -> torch.Tensor:
    """DECA's grey shape look at the covered pixels of a packed render: albedo 180/255
    under DECA's five directional lights, or under SH ``lights`` (B, 9, 3) if given.
    normals: (P, 3) unit normals; batch: (P,) sorted image index. Returns (P, 3)."""
    if lights is None:
        shading = directional_shading(normals[:, :, None, None])[:, :, 0, 0]
    else:
        shading = sh_shading_packed(normals, lights, batch)
    return GREY_ALBEDO * shading


def coarse_normals_packed(frags: Fragments, verts_world: torch.Tensor, faces: torch.Tensor
                          ) -> torch.Tensor:
    """(P, 3) unit vertex normals of ``verts_world`` (B, V, 3) interpolated at the covered
    pixels of ``frags``."""
    return _normalize(interpolate_packed(frags, vertex_normals(verts_world, faces)), -1)


def render_grey(verts_world: torch.Tensor, verts_ndc: torch.Tensor, faces: torch.Tensor,
                image_size: int | tuple[int, int], backend: str = "auto",
                cull_backfaces: bool = False) -> tuple[torch.Tensor, Fragments]:
    """Grey shaded render of any mesh (no UVs needed; what ``wildface render`` writes).

    verts_world: (B, V, 3) for the normals; verts_ndc: (B, V, 3). Returns the image
    (B, 3, H, W) in [0, 1], black background, and the fragments."""
    frags = rasterize(verts_ndc, faces, image_size, cull_backfaces, backend)
    normals = coarse_normals_packed(frags, verts_world, faces)
    return scatter_packed(frags, shade_grey(normals, frags.batch_packed)), frags


@dataclass(eq=False)
class RenderOutput:
    """What ``DecaRenderer.render`` returns. The per-pixel work is done on the P covered
    pixels only (packed, ``fragments.pix`` order); full images are scattered on first use.

    Always computed: ``images`` (B, 3, H, W) = albedo x shading (+ background outside the
    face), ``alpha`` (B, 1, H, W) coverage (no gradient, as DECA), ``fragments``.
    Packed (P, C): ``albedo_packed``, ``normals_packed`` (unit, world), ``shading_packed``,
    ``grid_packed`` (UV ``grid_sample`` coordinates).
    On first access (B, C, H, W), 0 where no face is visible: ``albedo_images``,
    ``normal_images``, ``shading_images`` (1 everywhere for an unlit render),
    ``shape_images`` (DECA's grey shape look of these normals); ``uv_grid`` (B, H, W, 2).
    Also readable as ``out["images"]`` etc.
    """

    fragments: Fragments
    images: torch.Tensor
    albedo_packed: torch.Tensor
    normals_packed: torch.Tensor
    shading_packed: torch.Tensor | None
    grid_packed: torch.Tensor

    def __getitem__(self, name: str) -> torch.Tensor | Fragments:
        return getattr(self, name)

    @cached_property
    def alpha(self) -> torch.Tensor:
        return self.fragments.mask

    @property
    def pix_to_face(self) -> torch.Tensor:
        return self.fragments.pix_to_face

    @cached_property
    def albedo_images(self) -> torch.Tensor:
        return scatter_packed(self.fragments, self.albedo_packed)

    @cached_property
    def normal_images(self) -> torch.Tensor:
        return scatter_packed(self.fragments, self.normals_packed)

    @cached_property
    def shading_images(self) -> torch.Tensor:
        if self.shading_packed is None:
            return torch.ones_like(self.albedo_images)
        return scatter_packed(self.fragments, self.shading_packed)

    @cached_property
    def uv_grid(self) -> torch.Tensor:
        return scatter_packed(self.fragments, self.grid_packed).permute(0, 2, 3, 1)

    @cached_property
    def shape_images(self) -> torch.Tensor:
        return scatter_packed(self.fragments,
                              shade_grey(self.normals_packed, self.fragments.batch_packed))

    def sample(self, texture: torch.Tensor) -> torch.Tensor:
        """A UV map (B or 1, C, Huv, Wuv) looked up at every covered pixel: (B, C, H, W),
        0 where no face is visible."""
        values = sample_texture_packed(texture, self.grid_packed, self.fragments.batch_packed)
        return scatter_packed(self.fragments, values)


class DecaRenderer(torch.nn.Module):
    """DECA's renderer (SRenderY) on ``recon.render``.

    faces: (F, 3) mesh triangles; uv_coords: (T, 2) in [0, 1] (u right, v up, OBJ ``vt``);
    uv_faces: (F, 3) indices into uv_coords (OBJ ``ft``); image_size: rendered images are
    image_size x image_size; uv_size: UV maps are uv_size x uv_size; backend: the face-id
    pass (``torch`` | ``pytorch3d`` | ``nvdiffrast``). The UV layout is rasterized once here.
    Move to a device with ``.to(device)``.
    """

    def __init__(self, faces: torch.Tensor, uv_coords: torch.Tensor, uv_faces: torch.Tensor,
                 image_size: int = 224, uv_size: int = 256, backend: str = "auto",
                 cull_backfaces: bool = False, chunk_pairs: int = DEFAULT_CHUNK_PAIRS):
        super().__init__()
        self.image_size = int(image_size)
        self.uv_size = int(uv_size)
        self.backend = backend
        self.cull_backfaces = cull_backfaces
        self.chunk_pairs = chunk_pairs
        faces = torch.as_tensor(faces).long()
        uv_coords = torch.as_tensor(uv_coords).float()
        uv_faces = torch.as_tensor(uv_faces).long()
        self.register_buffer("faces", faces, persistent=False)
        # grid_sample coordinates of each face corner's UV: (F, 3, 2)
        self.register_buffer("corner_grid", uv_to_grid(uv_coords)[uv_faces],
                             persistent=False)
        self.uv = UVRasterizer(faces, uv_coords, uv_faces, uv_size)

    # -- image space -------------------------------------------------------------------
    def rasterize(self, verts_ndc: torch.Tensor) -> Fragments:
        """verts_ndc: (B, V, 3) -> Fragments at image_size (see ``rasterize``)."""
        return rasterize(verts_ndc, self.faces, self.image_size, self.cull_backfaces,
                         self.backend, self.chunk_pairs)

    def render(self, verts_world: torch.Tensor, verts_ndc: torch.Tensor,
               albedo: torch.Tensor, lights: torch.Tensor | None,
               detail_normals_uv: torch.Tensor | None = None,
               background: torch.Tensor | None = None) -> RenderOutput:
        """Textured, SH-lit render (DECA's ``render``).

        verts_world: (B, V, 3) posed mesh (its normals light the surface); verts_ndc:
        (B, V, 3) projected (``weak_perspective_project``); albedo: (B, 3, Huv, Wuv) UV map;
        lights: (B, 9, 3) SH coefficients or None (unlit: images = albedo);
        detail_normals_uv: (B, 3, Huv, Wuv) replaces the coarse normals if given;
        background: (B, 3, H, W) composited where no face is visible.
        Returns a ``RenderOutput`` (images, alpha and the other maps, see there).
        """
        frags = self.rasterize(verts_ndc)
        batch = frags.batch_packed
        grid, normals = self._surface(frags, verts_world, detail_normals_uv)
        albedo_p = sample_texture_packed(albedo, grid, batch)
        shading = None if lights is None else sh_shading_packed(normals, lights, batch)
        images = scatter_packed(frags, albedo_p if shading is None else albedo_p * shading)
        if background is not None:
            images = images + background * (1.0 - frags.mask)
        return RenderOutput(fragments=frags, images=images, albedo_packed=albedo_p,
                            normals_packed=normals, shading_packed=shading, grid_packed=grid)

    def render_shape(self, verts_world: torch.Tensor, verts_ndc: torch.Tensor,
                     detail_normals_uv: torch.Tensor | None = None,
                     lights: torch.Tensor | None = None) -> torch.Tensor:
        """Grey shaded shape (DECA's ``render_shape``): (B, 3, H, W), black background.
        With detail_normals_uv (B, 3, Huv, Wuv) the detail normals are shown; lights
        (B, 9, 3) SH, else DECA's five grey directional lights."""
        frags = self.rasterize(verts_ndc)
        _, normals = self._surface(frags, verts_world, detail_normals_uv)
        return scatter_packed(frags, shade_grey(normals, frags.batch_packed, lights))

    def _surface(self, frags: Fragments, verts_world: torch.Tensor,
                 detail_normals_uv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """At the covered pixels: (P, 2) UV ``grid_sample`` coordinates and (P, 3) unit
        normals, the detail normal map's (B, 3, Huv, Wuv) if given, else the mesh's."""
        grid = interpolate_corners_packed(frags, self.corner_grid.to(verts_world.dtype))
        if detail_normals_uv is None:
            return grid, coarse_normals_packed(frags, verts_world, self.faces)
        normals = sample_texture_packed(detail_normals_uv, grid, frags.batch_packed)
        return grid, _normalize(normals, -1)

    # -- UV space ----------------------------------------------------------------------
    def world2uv(self, attrs: torch.Tensor) -> torch.Tensor:
        """Per-vertex attributes (B, V, C) -> UV map (B, C, Huv, Wuv), 0 outside the layout
        (the layout is rasterized once and cached). E.g. ``world2uv(verts_world)`` is the
        position map; ``world2uv(ndc_to_image(verts_ndc))[:, :2]`` gives, per texel, the
        ``grid_sample`` coordinates of the photo (DECA's UV texture from the image)."""
        return self.uv.world2uv(attrs)

    def displacement_to_normals(self, uv_z: torch.Tensor, verts_world: torch.Tensor,
                                mask_uv: torch.Tensor | None = None,
                                fixed_uv: torch.Tensor | None = None) -> torch.Tensor:
        """DECA's ``displacement2normal``: displace the coarse surface along its normals in
        UV space and recompute normals on the texel grid.

        uv_z: (B, 1, Huv, Wuv) displacement (mesh units); verts_world: (B, V, 3) coarse
        mesh; mask_uv: (1 or B, 1, Huv, Wuv) where detail applies (DECA's face/eye mask);
        fixed_uv: (Huv, Wuv) or None, DECA's fixed displacement (``fixed_displacement_256``),
        added unmasked as DECA does. Returns (B, 3, Huv, Wuv) unit normals: detail normals
        inside the mask and the layout's interior, coarse normals elsewhere (0 outside the
        layout). Not detached: detach the coarse mesh if it must not receive gradients (as
        DECA's detail stage).
        """
        coarse_pos = self.world2uv(verts_world)
        coarse_n = self.world2uv(vertex_normals(verts_world, self.faces))
        coarse_n = _normalize(coarse_n, 1)
        keep = self.uv.interior
        if mask_uv is not None:
            keep = keep * mask_uv
        detail_pos = coarse_pos + (uv_z * keep) * coarse_n
        if fixed_uv is not None:
            detail_pos = detail_pos + fixed_uv.to(coarse_n.dtype).reshape(1, 1, *uv_z.shape[-2:]) * coarse_n
        detail_n = grid_normals(detail_pos, self.uv.orientation)
        return detail_n * keep + coarse_n * (1.0 - keep)

    def visibility_uv(self, verts_ndc: torch.Tensor, threshold: float = 0.05,
                      occlusion: bool = True, depth_tolerance: float = 0.02,
                      fragments: Fragments | None = None) -> torch.Tensor:
        """Texels seen by the camera, (B, 1, Huv, Wuv) in {0, 1}, for the detail stage.

        A texel is visible if its screen-space normal faces the camera (NDC normal z >
        ``threshold``, DECA's test) and, with ``occlusion``, its depth is within
        ``depth_tolerance`` (NDC z units) of the rendered depth at its nearest pixel (so
        self-occluded texels, e.g. behind the nose, are excluded). verts_ndc: (B, V, 3).
        """
        n = vertex_normals(verts_ndc, self.faces)
        facing = (self.world2uv(n)[:, 2:3] > threshold).to(verts_ndc.dtype)
        vis = facing * self.uv.covered.to(verts_ndc.dtype)
        if occlusion:
            frags = fragments if fragments is not None else self.rasterize(verts_ndc)
            B, H, W = frags.shape
            pos = self.world2uv(verts_ndc.detach())  # (B, 3, S, S)
            pix = ndc_to_pixel(pos.permute(0, 2, 3, 1), H, W)
            col = pix[..., 0].round().long().clamp(0, W - 1)
            row = pix[..., 1].round().long().clamp(0, H - 1)
            flat = (torch.arange(B, device=col.device)[:, None, None] * H + row) * W + col
            zb = frags.zbuf.detach().reshape(-1)[flat]
            seen = (pix[..., 2] >= zb - depth_tolerance).unsqueeze(1)
            vis = vis * seen.to(vis.dtype)
        return vis
