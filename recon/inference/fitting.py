"""Test-time refinement: fit the codes to the photo, from the encoder's codes.

Why (docs/training.md, "Refining on the keypoints" and "... and on the pixels"): the
keypoint head locates the 68 landmarks of unseen faces to ~0.4 px, and a per-image fit to
them reads identity better than the amortised inverse map (the geometry MLP) learns to on a
CPU budget; but the head's errors lean towards the mean face, and the photo's shading says
what the landmarks cannot. So the fit has two phases: landmarks only (the geometry lands on
the face), then landmarks plus DECA's photometric L1 of the lit render, with albedo and
light free too. Its targets are the image and the points the trained network located, no
labels. Each image is fitted on its own (Adam's steps are per parameter, every code belongs
to one image and every loss is a sum over images), so results do not depend on the batch.

A step of reconstruction, not of the model: ``recon.inference.reconstruct.FaceReconstructor`` calls it
when ``model.refine.steps`` > 0; ``DECA.encode`` never does. The model and its codes are
duck-typed (:class:`CodeDecoder`) so that this module needs nothing from ``recon.deca``.
"""
from __future__ import annotations

from typing import Any, Protocol, TypeVar

import torch

from recon.config import RefineConfig, cosine_decay
from recon.losses.landmarks import weighted_landmark_loss
from recon.losses.photometric import photometric_loss
from recon.losses.regularizers import code_l2, light_grey_loss

GEOMETRY = ("shape", "exp", "pose", "cam")
APPEARANCE = ("tex", "light")
_FINAL_LR_RATIO = 0.02
# As training's landmark pretraining: pixels compare only once the face is roughly in place.
_LANDMARK_ONLY_FRACTION = 0.25


class FitCodes(Protocol):
    """What the fit needs of the codes (``recon.deca.Codes``): the tensors it names in
    :data:`GEOMETRY` and :data:`APPEARANCE` (shape (B, n_shape), exp (B, n_exp), pose (B, 6),
    cam (B, 3), tex (B, n_tex), light (B, 9, 3)), ``keypoints`` (B, 68, 2) or None, and
    ``replace(**tensors)``: a copy with those tensors swapped in."""

    keypoints: torch.Tensor | None

    def replace(self, **changes: torch.Tensor | None) -> Any: ...


C = TypeVar("C", bound=FitCodes)


class CodeDecoder(Protocol):
    """What the fit needs of the model (``recon.deca.DECA``): ``decode(codes, with_detail,
    render)`` giving ``landmarks2d`` (B, 68, 2) and, when rendering, ``images``
    (B, 3, S, S) and ``face_mask`` (B, 1, S, S)."""

    def decode(self, codes: Any, with_detail: bool = ..., render: bool = ...) -> Any: ...


def refine_codes(model: CodeDecoder, codes: C, images: torch.Tensor, cfg: RefineConfig) -> C:
    """codes (batch of B, with ``keypoints`` (B, 68, 2)) of ``images`` (B, 3, S, S) in [0, 1]
    -> the same codes after ``cfg.steps`` Adam steps on DECA's weighted 68-landmark L1 to the
    keypoints and the shape / expression priors; after the first quarter, if
    ``cfg.photometric`` > 0, also on the photometric L1 of the lit render over its face region
    and the albedo / light priors (albedo and light then move too). Runs with gradients even
    when called under ``torch.no_grad``; the returned codes carry none."""
    if codes.keypoints is None:
        raise ValueError("refine_codes needs codes with keypoints (model.head 'keypoints')")
    target = codes.keypoints.detach().float()
    images = images.detach().float()
    n = target.shape[0]
    fitted = GEOMETRY + (APPEARANCE if cfg.photometric > 0 else ())
    with torch.enable_grad():
        free = {k: getattr(codes, k).detach().float().clone().requires_grad_(True)
                for k in fitted}
        optimizer = torch.optim.Adam(free.values(), lr=cfg.lr)
        for step in range(cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_decay(cfg.lr, _FINAL_LR_RATIO, step / cfg.steps)
            pixels = cfg.photometric > 0 and step >= _LANDMARK_ONLY_FRACTION * cfg.steps
            rec = model.decode(codes.replace(**free), with_detail=False, render=pixels)
            loss = (weighted_landmark_loss(rec.landmarks2d, target)
                    + cfg.reg_shape * code_l2(free["shape"])
                    + cfg.reg_exp * code_l2(free["exp"]))
            if pixels:
                loss = loss + (cfg.photometric * photometric_loss(rec.images, images, rec.face_mask)
                               + cfg.reg_tex * code_l2(free["tex"])
                               + cfg.reg_light * light_grey_loss(free["light"]))
            optimizer.zero_grad(set_to_none=True)
            # Every term is a mean over images: times n, each image's codes see their own loss.
            (n * loss).backward()
            optimizer.step()
    return codes.replace(**{k: v.detach() for k, v in free.items()})
