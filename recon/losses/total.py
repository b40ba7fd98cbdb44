"""Each stage's loss terms, weighted by :class:`recon.config.LossConfig`.

Every function returns a dict ``name -> weighted scalar`` (terms whose weight is 0, or whose
network is absent, are left out), so that the stage loss is the sum of the values and the
values are what training logs. The shape / detail consistency passes reuse the image terms on
re-rendered images; the training steps weight them (``recon.training.steps``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from recon.config import LossConfig
from recon.deca import Codes, Reconstruction
from recon.losses.detail import displacement_l1, shading_smoothness, symmetry_loss
from recon.losses.landmarks import (eye_closure_loss, keypoint_loss, lip_closure_loss,
                                    weighted_landmark_loss)
from recon.losses.mrf import IDMRFLoss
from recon.losses.photometric import photometric_loss
from recon.losses.regularizers import code_l2, light_grey_loss
from recon.render import sample_texture, sh_shading


def coarse_image_terms(
    cfg: LossConfig,
    rec: Reconstruction,
    batch: Mapping[str, torch.Tensor],
    pretrain: bool = False,
    identity_net: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Terms that compare a reconstruction with its photos: landmarks, eye and lip closure;
    after pretraining also the photometric L1 on the lit render (or the unlit one,
    ``cfg.photometric_render``; skin mask x the render's face region) and the identity loss. batch: ``images`` (B, 3, H, W), ``landmarks`` (B, 68, 2),
    ``masks`` (B, 1, H, W); rec rendered unless ``pretrain``."""
    lmk, target = rec.landmarks2d, batch["landmarks"].to(rec.landmarks2d.dtype)
    terms: dict[str, torch.Tensor] = {}
    if cfg.landmarks > 0:
        terms["landmarks"] = cfg.landmarks * weighted_landmark_loss(lmk, target)
    if cfg.eye_closure > 0:
        terms["eye_closure"] = cfg.eye_closure * eye_closure_loss(lmk, target)
    if cfg.lip_closure > 0:
        terms["lip_closure"] = cfg.lip_closure * lip_closure_loss(lmk, target)
    if pretrain:
        return terms
    if rec.images is None:
        raise ValueError("coarse_image_terms: the reconstruction was not rendered")
    images = batch["images"].to(rec.images.dtype)
    if cfg.photometric > 0:
        mask = batch["masks"].to(images.dtype) * rec.face_mask
        rendered = rec.images if cfg.photometric_render == "lit" else rec.coarse_render.albedo_images
        terms["photometric"] = cfg.photometric * photometric_loss(
            rendered, images, mask, cfg.photometric_saturation)
    if cfg.identity > 0 and identity_net is not None:
        from recon.losses.identity import identity_loss

        # As DECA: albedo and light detached, so identity only shapes the geometry.
        albedo = sample_texture(rec.albedo.detach(), rec.uv_grid)
        shaded = albedo * sh_shading(rec.normal_images, rec.codes.light.detach().float())
        terms["identity"] = cfg.identity * identity_loss(identity_net, shaded, images, rec.face_mask)
    return terms


def keypoint_terms(cfg: LossConfig, codes: Codes, batch: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The keypoint head's L1 to the landmarks (``keypoints``); empty without that head.
    batch: ``landmarks`` (B, 68, 2)."""
    if cfg.keypoints == 0 or codes.keypoints is None:
        return {}
    target = batch["landmarks"].to(codes.keypoints.dtype)
    return {"keypoints": cfg.keypoints * keypoint_loss(codes.keypoints, target)}


def coarse_code_terms(cfg: LossConfig, codes: Codes) -> dict[str, torch.Tensor]:
    """Regularisers: sum(x^2)/2 on shape, expression, albedo codes; light towards grey."""
    terms: dict[str, torch.Tensor] = {}
    for name, weight, value in (("reg_shape", cfg.reg_shape, codes.shape),
                                ("reg_exp", cfg.reg_exp, codes.exp),
                                ("reg_tex", cfg.reg_tex, codes.tex)):
        if weight > 0:
            terms[name] = weight * code_l2(value)
    if cfg.reg_light > 0:
        terms["reg_light"] = cfg.reg_light * light_grey_loss(codes.light)
    return terms


def detail_image_terms(
    cfg: LossConfig,
    uv_pred: torch.Tensor,
    uv_target: torch.Tensor,
    uv_visible: torch.Tensor,
    mrf: IDMRFLoss | None = None,
) -> dict[str, torch.Tensor]:
    """UV-space photometric L1 and ID-MRF between the detailed UV texture (albedo x shading
    with detail normals) and the photo's UV texture, on visible face texels.
    uv_pred, uv_target: (B, 3, S, S); uv_visible: (B, 1, S, S) in [0, 1]."""
    terms: dict[str, torch.Tensor] = {}
    if cfg.photometric_detail > 0:
        terms["photometric_detail"] = cfg.photometric_detail * photometric_loss(
            uv_pred, uv_target, uv_visible, cfg.photometric_saturation)
    if cfg.mrf > 0 and mrf is not None:
        terms["mrf"] = cfg.mrf * mrf(uv_pred * uv_visible, uv_target * uv_visible)
    return terms


def detail_map_terms(
    cfg: LossConfig, uv_z: torch.Tensor, uv_shading: torch.Tensor, uv_visible: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Regularisers of the displacement: L1, soft symmetry on invisible texels, shading
    smoothness. uv_z: (B, 1, S, S); uv_shading: (B, 3, S, S); uv_visible: (B, 1, S, S)."""
    terms: dict[str, torch.Tensor] = {}
    if cfg.displacement > 0:
        terms["displacement"] = cfg.displacement * displacement_l1(uv_z)
    if cfg.symmetry > 0:
        terms["symmetry"] = cfg.symmetry * symmetry_loss(uv_z, uv_visible)
    if cfg.shading_smoothness > 0:
        terms["shading_smoothness"] = cfg.shading_smoothness * shading_smoothness(uv_shading)
    return terms
