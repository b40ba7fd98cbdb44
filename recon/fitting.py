"""Test-time refinement: fit the geometry codes to the keypoint head's own landmarks.

Why (docs/training.md, "Refining on the keypoints"): the keypoint head locates the 68
landmarks of unseen faces to ~0.4 px, and a per-image fit to landmarks that precise reads
identity better than the amortised inverse map (the geometry MLP) learns to on a CPU
budget. The fit uses nothing but the image: its targets are the points the trained network
located, its start the encoder's codes. Each image is fitted on its own (Adam's steps are
per parameter, and every code belongs to one image), so results do not depend on the batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from recon.config import RefineConfig, cosine_decay
from recon.losses.landmarks import weighted_landmark_loss
from recon.losses.regularizers import code_l2

if TYPE_CHECKING:
    from recon.deca import DECA, Codes

FITTED = ("shape", "exp", "pose", "cam")
_FINAL_LR_RATIO = 0.02


def fit_to_keypoints(model: DECA, codes: Codes, cfg: RefineConfig) -> Codes:
    """codes (batch of B, with ``keypoints`` (B, 68, 2)) -> the same codes with shape, exp,
    pose and cam replaced by ``cfg.steps`` Adam steps on DECA's weighted 68-landmark L1 to the
    keypoints plus the shape and expression priors. Runs with gradients even when called
    under ``torch.no_grad``; the returned codes carry none."""
    if codes.keypoints is None:
        raise ValueError("fit_to_keypoints needs codes with keypoints (model.head 'keypoints')")
    target = codes.keypoints.detach().float()
    n = target.shape[0]
    with torch.enable_grad():
        free = {k: getattr(codes, k).detach().float().clone().requires_grad_(True)
                for k in FITTED}
        optimizer = torch.optim.Adam(free.values(), lr=cfg.lr)
        for step in range(cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_decay(cfg.lr, _FINAL_LR_RATIO, step / cfg.steps)
            rec = model.decode(codes.replace(**free), with_detail=False, render=False)
            # Summed over images: each image's codes see only their own loss.
            loss = n * (weighted_landmark_loss(rec.landmarks2d, target)
                        + cfg.reg_shape * code_l2(free["shape"])
                        + cfg.reg_exp * code_l2(free["exp"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return codes.replace(**{k: v.detach() for k, v in free.items()})
