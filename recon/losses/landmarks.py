"""DECA's landmark losses on 2D landmarks in the [-1, 1] image convention.

- :func:`weighted_landmark_loss`: per-point weighted L1 over the 68 iBUG landmarks
  (:func:`recon.landmarks.deca_landmark_weights`), ``sum_i w_i (|dx_i| + |dy_i|) / (2 sum_i w_i)``
  per image, averaged over the batch. An optional per-point confidence multiplies the weights.
- :func:`eye_closure_loss` / :func:`lip_closure_loss`: mean absolute difference between
  predicted and target upper-to-lower lid (inner lip) distances.
- :func:`keypoint_loss`: plain mean L1 of located points (the keypoint head's) to the targets.
"""
from __future__ import annotations

import torch

from recon.landmarks import EYE_LID_PAIRS, LIP_PAIRS, N_LANDMARKS, deca_landmark_weights

# Inside the square root of a distance: keeps the gradient finite where a lid or the lips
# are exactly closed (d sqrt(x)/dx is infinite at 0).
_DIST_EPS = 1e-12


def weighted_landmark_loss(
    pred: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor | None = None
) -> torch.Tensor:
    """pred, target: (B, 68, 2); confidence: (B, 68) in [0, 1] or None. Returns a scalar."""
    if pred.shape[-2:] != (N_LANDMARKS, 2) or target.shape != pred.shape:
        raise ValueError(f"expected (B, 68, 2) landmarks, got {tuple(pred.shape)} / {tuple(target.shape)}")
    w = torch.as_tensor(deca_landmark_weights(), device=pred.device, dtype=pred.dtype).expand(pred.shape[0], -1)
    if confidence is not None:
        w = w * confidence.to(pred.dtype)
    err = (pred - target).abs().sum(-1)  # (B, 68)
    per_image = (w * err).sum(-1) / (2.0 * w.sum(-1)).clamp_min(1e-8)
    return per_image.mean()


def keypoint_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target: (B, K, 2). Mean |dx| and |dy| over points and images: every point counts
    the same, since the geometry is read from all of them."""
    if target.shape != pred.shape:
        raise ValueError(f"keypoints {tuple(pred.shape)} vs targets {tuple(target.shape)}")
    return (pred - target).abs().mean()


def _pair_distances(points: torch.Tensor, pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """points (B, 68, 2) -> (B, len(pairs)) Euclidean distances."""
    a = points[:, [p[0] for p in pairs]]
    b = points[:, [p[1] for p in pairs]]
    return ((a - b).pow(2).sum(-1) + _DIST_EPS).sqrt()


def eye_closure_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target: (B, 68, 2). Mean |d_pred - d_target| over the 4 lid pairs."""
    return (_pair_distances(pred, EYE_LID_PAIRS) - _pair_distances(target, EYE_LID_PAIRS)).abs().mean()


def lip_closure_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target: (B, 68, 2). Mean |d_pred - d_target| over the 3 inner-lip pairs."""
    return (_pair_distances(pred, LIP_PAIRS) - _pair_distances(target, LIP_PAIRS)).abs().mean()
