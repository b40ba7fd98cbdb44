"""The DECA model: encoders + face model (FLAME format) + albedo + renderer + detail decoder.

``encode(images) -> Codes``, ``decode(codes) -> Reconstruction``, ``reconstruct(images)``
(both). Conventions:

- images: (B, 3, S, S) RGB in [0, 1], S = ``NetworkConfig.image_size`` (224 in the paper);
- 2D landmarks: the [-1, 1] image convention (x right, y DOWN), as the preprocessing writes
  them; 3D quantities (vertices, landmarks3d, now7) in the face model's units (FLAME: metres);
- camera: DECA's weak perspective ``x_ndc = s (X + t)`` (``recon.render.cameras``);
- UV maps (displacement, detail normals, face mask): ``uv_size`` x ``uv_size``, row 0 = v = 1.

Only the three networks are trainable and only they are saved by ``state_dict()``: the face
model, albedo and renderer are rebuilt from the face-model config (FLAME is licensed: it never
travels inside a checkpoint). The state dict records the face-model name and network sizes;
loading it into a model built for another face model fails with a clear error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recon.face_model.albedo import AlbedoModel
from recon.config import FaceModelConfig, NetworkConfig
from recon.face_model.deca_data import deca_uv_maps
from recon.face_model.face_assets import FaceModelAssets
from recon.face_model.flame import FLAME, FlameOutput
from recon.networks import (CodeLayout, CoarseEncoder, DecaCoarseEncoder, DecaDetailDecoder,
                            DecaEncoder, DetailDecoder, Encoder, KeypointCoarseEncoder)
from recon.render import (DecaRenderer, RenderOutput, ndc_to_image,
                          vertex_normals, weak_perspective_project)
from recon.render.shading import SH_CONSTANTS


# Model-description entries added after checkpoints were written, with the value that those
# checkpoints implicitly had.
_DESCRIPTION_DEFAULTS = {"head": "pooled", "architecture": "wildface"}


@dataclass
class Codes:
    """Everything the encoders predict for a batch of B images.

    shape (B, n_shape), tex (B, n_tex), exp (B, n_exp), pose (B, 6) = global axis-angle 3 |
    jaw axis-angle 3, cam (B, 3) = weak-perspective s, tx, ty, light (B, 9, 3) SH x RGB,
    detail (B, n_detail) or None (coarse only), keypoints (B, 68, 2) the 2D landmarks the
    coarse encoder located (image convention; ``model.head: keypoints``) or None.
    """

    shape: torch.Tensor
    tex: torch.Tensor
    exp: torch.Tensor
    pose: torch.Tensor
    cam: torch.Tensor
    light: torch.Tensor
    detail: torch.Tensor | None = None
    keypoints: torch.Tensor | None = None

    @property
    def jaw(self) -> torch.Tensor:
        """(B, 3) jaw axis-angle."""
        return self.pose[:, 3:]

    def replace(self, **changes: torch.Tensor | None) -> "Codes":
        return dataclasses.replace(self, **changes)

    def index(self, idx: torch.Tensor) -> "Codes":
        """The codes of a subset / reordering of the batch (idx: (B',) long)."""
        return Codes(**{k: (None if v is None else v[idx]) for k, v in self.as_dict().items()})

    def detach(self) -> "Codes":
        return Codes(**{k: (None if v is None else v.detach()) for k, v in self.as_dict().items()})

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _render_map(render: str, name: str) -> property:
    """A read-only ``Reconstruction`` attribute: map ``name`` of its ``render`` output
    (scattered to a full image on first access), None when that render was not made."""

    def get(rec: "Reconstruction") -> torch.Tensor | None:
        out = getattr(rec, render)
        return None if out is None else getattr(out, name)

    return property(get, doc=f"``{render}.{name}`` or None")


@dataclass
class Reconstruction:
    """What ``decode`` returns (B images, V vertices, H x W renders, S x S UV maps).

    Always: ``codes``; ``vertices`` (B, V, 3) coarse posed mesh; ``vertices_ndc`` (B, V, 3)
    projected (renderer NDC, y up); ``landmarks2d`` (B, 68, 2) image convention;
    ``landmarks3d`` (B, 68, 3); ``now7`` (B, 7, 3).
    With ``render=True``: ``albedo`` (B, 3, Ha, Wa) UV albedo; ``images`` (B, 3, H, W) coarse
    lit render (albedo x SH shading, black background); ``alpha`` (B, 1, H, W) coverage;
    ``face_mask`` (B, 1, H, W) the face region of the render (UV face mask x alpha; no gradient);
    ``coarse_render`` the renderer's ``RenderOutput``, from which the properties
    ``normal_images`` and ``shading_images`` (B, 3, H, W), ``uv_grid`` (B, H, W, 2) UV
    lookup of each pixel and ``shape_images`` (B, 3, H, W) grey shaded coarse shape are
    scattered on first use.
    With detail (``codes.detail`` set): ``uv_displacement`` (B, 1, S, S);
    ``uv_detail_normals`` (B, 3, S, S); ``uv_detail_vertices`` (B, 3, S, S) position map of
    the detailed surface (the dense detailed mesh); and, when rendering,
    ``images_detail`` and ``detail_render`` (its ``shape_detail_images`` (B, 3, H, W)).
    """

    codes: Codes
    vertices: torch.Tensor
    vertices_ndc: torch.Tensor
    landmarks2d: torch.Tensor
    landmarks3d: torch.Tensor
    now7: torch.Tensor
    albedo: torch.Tensor | None = None
    images: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    face_mask: torch.Tensor | None = None
    uv_displacement: torch.Tensor | None = None
    uv_detail_normals: torch.Tensor | None = None
    uv_detail_vertices: torch.Tensor | None = None
    images_detail: torch.Tensor | None = None
    # the renderer's outputs: the image maps below are scattered from them on first use
    coarse_render: RenderOutput | None = None
    detail_render: RenderOutput | None = None

    normal_images = _render_map("coarse_render", "normal_images")
    shading_images = _render_map("coarse_render", "shading_images")
    uv_grid = _render_map("coarse_render", "uv_grid")
    shape_images = _render_map("coarse_render", "shape_images")
    shape_detail_images = _render_map("detail_render", "shape_images")


def _non_persistent(module: nn.Module) -> None:
    """Keep a module's buffers out of ``state_dict`` (they are rebuilt from the face model)."""
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            sub.register_buffer(name, buf, persistent=False)


class DECA(nn.Module):
    """DECA (Feng et al. 2021) on a FLAME-format face model.

    ``network.architecture``: wildface's networks or DECA's released ones as written
    (``recon.networks``: ``DecaCoarseEncoder``, ``DecaEncoder``, ``DecaDetailDecoder``); the
    state dict records which, and loading into the other refuses.

    ``assets``: the face model's arrays; None loads them from ``face_model``
    (``recon.face_model.flame_io.load_face_model``). Component counts are ``face_model``'s, capped at
    what the face model has.
    """

    def __init__(
        self,
        face_model: FaceModelConfig | None = None,
        network: NetworkConfig | None = None,
        assets: FaceModelAssets | None = None,
        render_backend: str = "auto",
    ) -> None:
        super().__init__()
        face_model = face_model or FaceModelConfig()
        network = network or NetworkConfig()
        if assets is None:
            from recon.face_model.flame_io import load_face_model

            assets = load_face_model(face_model)
        self.network_config = network
        self.face_model_name = assets.name
        self.image_size = network.image_size
        self.uv_size = network.uv_size

        self.flame = FLAME(assets, min(face_model.n_shape, assets.n_shape_total),
                           min(face_model.n_exp, assets.n_exp_total))
        self.albedo = AlbedoModel(assets, min(face_model.n_tex, assets.n_tex_total))
        self.renderer = DecaRenderer(assets.faces, assets.vt, assets.ft, network.image_size,
                                     network.uv_size, backend=render_backend)
        for fixed in (self.flame, self.albedo, self.renderer):
            _non_persistent(fixed)
            fixed.requires_grad_(False)
        self.layout = CodeLayout(self.flame.n_shape, self.albedo.n_tex, self.flame.n_exp)

        face = torch.zeros(1, assets.n_vertices, 1)
        face[0, assets.masks["face"] if "face" in assets.masks else slice(None)] = 1.0
        uv_face = (self.renderer.world2uv(face) > 0.5).float() * self.renderer.uv.covered
        # A model converted with DECA's data folder brings DECA's face/eye mask: DECA masks
        # both the photometric render and the details with it, so it replaces ours; and its
        # fixed displacement (None without it), added in the detail step.
        deca_mask, fixed = deca_uv_maps(assets, network.uv_size)
        self.register_buffer("uv_face_mask", uv_face if deca_mask is None else deca_mask,
                             persistent=False)  # (1, 1, S, S)
        self.register_buffer("uv_fixed_displacement", fixed, persistent=False)  # (S, S) | None

        init = {"cam_init": self.initial_camera(network.init_face_fraction),
                # constant SH band = 1 / its basis constant: unit grey irradiance
                "light_init": 1.0 / SH_CONSTANTS[0]}
        if network.architecture == "deca":
            # DECA's released networks as written (recon.face_model.deca_import loads its weights).
            self.coarse_encoder = DecaCoarseEncoder(self.layout, network.hidden, **init)
            self.detail_encoder = DecaEncoder(network.n_detail, network.hidden)
            self.detail_decoder = DecaDetailDecoder(self.flame.n_exp, network.n_detail,
                                                    network.max_z)
        else:
            coarse_encoder = (KeypointCoarseEncoder if network.head == "keypoints"
                              else CoarseEncoder)
            self.coarse_encoder = coarse_encoder(network.backbone, self.layout, network.hidden,
                                                 network.backbone_weights, **init)
            self.detail_encoder = Encoder(network.backbone, network.n_detail, network.hidden,
                                          network.backbone_weights)
            self.detail_decoder = DetailDecoder(self.flame.n_exp, network.n_detail,
                                                network.uv_size, network.max_z)

    @property
    def device(self) -> torch.device:
        """Where the model lives (its buffers and parameters move together)."""
        return self.uv_face_mask.device

    @torch.no_grad()
    def initial_camera(self, fraction: float) -> tuple[float, float, float]:
        """Camera that centres the template's landmarks, their box spanning ``fraction``
        of the crop."""
        lmk = self.flame.template_output().landmarks2d[0, :, :2]
        lo, hi = lmk.min(0).values, lmk.max(0).values
        scale = 2.0 * fraction / float((hi - lo).max())
        centre = (lo + hi) / 2
        return scale, -float(centre[0]), -float(centre[1])

    # -- parameters -------------------------------------------------------------------
    def coarse_parameters(self) -> list[nn.Parameter]:
        """What the coarse stage trains: the coarse encoder."""
        return list(self.coarse_encoder.parameters())

    def detail_parameters(self) -> list[nn.Parameter]:
        """What the detail stage trains: the detail encoder and decoder."""
        return list(self.detail_encoder.parameters()) + list(self.detail_decoder.parameters())

    # -- checkpoints ------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        n = self.network_config
        return {"face_model": self.face_model_name, "n_shape": self.flame.n_shape,
                "n_exp": self.flame.n_exp, "n_tex": self.albedo.n_tex, "backbone": n.backbone,
                "head": n.head, "architecture": n.architecture, "hidden": n.hidden, "n_detail": n.n_detail, "uv_size": n.uv_size}

    def get_extra_state(self) -> dict[str, Any]:
        return self._identity()

    def set_extra_state(self, state: Any) -> None:
        ours = self._identity()
        if not isinstance(state, dict):
            raise ValueError("not a wildface DECA checkpoint (no model description)")
        state = {**_DESCRIPTION_DEFAULTS, **state}
        diff = {k: (state.get(k), v) for k, v in ours.items() if state.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint does not fit this model ({details})")

    # -- encode / decode --------------------------------------------------------------
    def encode(self, images: torch.Tensor, with_detail: bool = True) -> Codes:
        """images: (B, 3, S, S) in [0, 1] -> Codes (float32; detail None unless with_detail):
        the encoders' output. The test-time fit of ``network.refine`` is a step of
        reconstruction (:func:`recon.inference.fitting.refine_codes`, called by
        ``recon.inference.reconstruct.FaceReconstructor``), never run here."""
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"expected images (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}")
        parts = {k: v.float() for k, v in self.coarse_encoder(images).items()}
        detail = self.detail_encoder(images).float() if with_detail else None
        return Codes(detail=detail, **parts)

    def project(self, points: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3) -> renderer NDC (B, N, 3) with the weak-perspective camera."""
        return weak_perspective_project(points, cam)

    def decode(self, codes: Codes, with_detail: bool = True, render: bool = True) -> Reconstruction:
        """Codes -> Reconstruction (see its fields). The face model and the renderer run in
        float32 with autocast off; only the detail decoder follows an enclosing autocast."""
        with torch.autocast(codes.shape.device.type, enabled=False):
            out = self.flame(codes.shape.float(), codes.exp.float(), codes.pose.float())
            cam = codes.cam.float()
            verts = out.vertices
            verts_ndc = self.project(verts, cam)
            lmk2d = ndc_to_image(self.project(out.landmarks2d, cam))[..., :2]
            rec = Reconstruction(codes=codes, vertices=verts, vertices_ndc=verts_ndc,
                                 landmarks2d=lmk2d, landmarks3d=out.landmarks3d, now7=out.now7)
            light = codes.light.float()
            if render:
                self._render_coarse(rec, light)
        if with_detail and codes.detail is not None:
            uv_z = self.detail_decoder(codes.jaw, codes.exp, codes.detail).float()
            with torch.autocast(codes.shape.device.type, enabled=False):
                self._add_detail(rec, uv_z, light, render)
        return rec

    def _render_coarse(self, rec: Reconstruction, light: torch.Tensor) -> None:
        albedo = self.albedo(rec.codes.tex.float())
        out = self.renderer.render(rec.vertices, rec.vertices_ndc, albedo, light)
        rec.albedo = albedo
        rec.images, rec.alpha, rec.coarse_render = out.images, out.alpha, out
        # A selection mask, without gradient (DECA samples it with a detached grid): a live
        # one lets the geometry move the face region's border off pixels it renders badly,
        # a systematic pull on the shape codes.
        with torch.no_grad():
            rec.face_mask = out.sample(self.uv_face_mask)

    def _add_detail(self, rec: Reconstruction, uv_z: torch.Tensor, light: torch.Tensor,
                    render: bool) -> None:
        mask = self.uv_face_mask
        keep = mask * self.renderer.uv.interior  # where displacement_to_normals applies it
        rec.uv_displacement = uv_z
        fixed = self.uv_fixed_displacement
        rec.uv_detail_normals = self.renderer.displacement_to_normals(uv_z, rec.vertices, mask,
                                                                      fixed_uv=fixed)
        coarse_normals = F.normalize(
            self.renderer.world2uv(vertex_normals(rec.vertices, self.renderer.faces)), dim=1)
        offset = uv_z * keep if fixed is None else uv_z * keep + fixed  # DECA's, unmasked
        rec.uv_detail_vertices = self.renderer.world2uv(rec.vertices) + offset * coarse_normals
        if render:
            out = self.renderer.render(rec.vertices, rec.vertices_ndc, rec.albedo, light,
                                       detail_normals_uv=rec.uv_detail_normals)
            rec.images_detail, rec.detail_render = out.images, out

    def reconstruct(self, images: torch.Tensor, with_detail: bool = True,
                    render: bool = True) -> Reconstruction:
        """``decode(encode(images))``: images (B, 3, S, S) in [0, 1]; no test-time fit."""
        return self.decode(self.encode(images, with_detail), with_detail, render)

    def forward(self, images: torch.Tensor) -> Reconstruction:
        return self.reconstruct(images)

    # -- helpers ----------------------------------------------------------------------
    def neutral(self, shape: torch.Tensor) -> FlameOutput:
        """The neutral mesh of identities (expression, jaw and head pose zero), as NoW
        evaluates it. shape: (B, n_shape). Returns the FLAME output (vertices, now7, ...)."""
        B = shape.shape[0]
        zeros = shape.new_zeros
        with torch.autocast(shape.device.type, enabled=False):
            return self.flame(shape.float(), zeros(B, self.flame.n_exp), zeros(B, 6))

    def image_to_uv(self, maps: torch.Tensor, vertices_ndc: torch.Tensor) -> torch.Tensor:
        """Sample image-space maps (B, C, H, W) (photo, mask) at each texel's projected
        position: (B, C, S, S) (DECA's UV texture of the photo; 0 outside the layout)."""
        grid = self.renderer.world2uv(ndc_to_image(vertices_ndc))[:, :2].permute(0, 2, 3, 1)
        return F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", padding_mode="zeros",
                             align_corners=False) * self.renderer.uv.covered
