"""The coarse encoder's keypoint head (``model.head: keypoints``): locate the 68 landmarks in
the image first, then read the geometry codes from them.

Why (docs/training.md, "Reading identity"): identity moves the normalised landmarks by about
1 % of their values. A heatmap network locates the landmarks to under half a pixel on a CPU
budget when supervised by them, and an MLP on *standardised* landmark features learns the
inverse map (landmarks -> shape, expression, pose, camera) from DECA's own losses; trained
together through the codes, the same parts did not read identity. So the two are kept apart:

- landmark branch: backbone stem..layer3; the stride-8 and upsampled stride-16 maps fused, one
  heatmap per point, soft-argmax -> keypoints (B, 68, 2) in the [-1, 1] image convention.
  Only its own L1 to the batch's landmarks (``loss.keypoints``) trains it.
- geometry: ``keypoint_features(keypoints)`` (detached) -> BatchNorm1d -> MLP -> shape, exp,
  pose, cam, trained by the coarse losses.
- appearance: layer4 on the (detached) stride-16 map, pooled -> MLP -> tex, light.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recon.landmarks import N_LANDMARKS
from recon.networks.backbones import Backbone
from recon.networks.encoders import CodeLayout, coarse_out_bias, mlp_head, split_code

GEOMETRY = ("shape", "exp", "pose", "cam")
APPEARANCE = ("tex", "light")


def soft_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """heatmaps (B, K, H, W) logits -> (B, K, 2) expected (x, y) under their softmax, in the
    [-1, 1] image convention (pixel centres at (2j + 1) / W - 1)."""
    b, k, h, w = heatmaps.shape
    prob = heatmaps.float().flatten(2).softmax(-1).view(b, k, h, w)
    xs = (2 * torch.arange(w, device=heatmaps.device, dtype=prob.dtype) + 1) / w - 1
    ys = (2 * torch.arange(h, device=heatmaps.device, dtype=prob.dtype) + 1) / h - 1
    return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], -1)


def keypoint_features(points: torch.Tensor) -> torch.Tensor:
    """points (B, K, 2) -> (B, 2K + 3): the points with their centroid subtracted and divided
    by their RMS spread (translation and scale removed; rotation kept, it is head pose), then
    the centroid (2) and the log spread (1), which the camera needs."""
    centre = points.mean(1, keepdim=True)
    offsets = points - centre
    spread = offsets.pow(2).sum(-1).mean(1, keepdim=True).sqrt().clamp_min(1e-6)  # (B, 1)
    return torch.cat([(offsets / spread[..., None]).flatten(1), centre[:, 0], spread.log()], 1)


class KeypointHead(nn.Module):
    """stride-8 (B, C8, H/8, W/8) and stride-16 (B, C16, H/16, W/16) maps -> keypoints
    (B, n_points, 2), soft-argmax of one heatmap per point at stride 8."""

    def __init__(self, channels: tuple[int, int], n_points: int = N_LANDMARKS,
                 width: int = 128) -> None:
        super().__init__()
        self.lateral8 = nn.Conv2d(channels[0], width, 1)
        self.lateral16 = nn.Conv2d(channels[1], width, 1)
        self.heatmaps = nn.Sequential(
            nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.Conv2d(width, n_points, 1))

    def forward(self, stride8: torch.Tensor, stride16: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.lateral16(stride16), size=stride8.shape[-2:], mode="bilinear",
                           align_corners=False)
        return soft_argmax(self.heatmaps(self.lateral8(stride8) + up))


class KeypointCoarseEncoder(nn.Module):
    """images (B, 3, H, W) -> dict of code parts as :class:`CoarseEncoder` gives, plus
    ``keypoints`` (B, 68, 2). ResNet backbones only (the head reads layer2 and layer3)."""

    def __init__(
        self,
        backbone: str,
        layout: CodeLayout,
        hidden: int = 1024,
        weights_path: str | None = None,
        cam_init: tuple[float, float, float] = (1.0, 0.0, 0.0),
        light_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.backbone = Backbone(backbone, weights_path)
        self.keypoint_head = KeypointHead(self.backbone.map_channels)
        bias = coarse_out_bias(layout, cam_init, light_init)
        sizes = layout.sizes()

        def part(names: tuple[str, ...]) -> torch.Tensor:
            return torch.cat([bias[layout.offset(n):layout.offset(n) + sizes[n]] for n in names])

        n_features = 2 * N_LANDMARKS + 3
        # Standardised inputs: without them the inverse map did not train (docs/training.md).
        self.standardise = nn.BatchNorm1d(n_features)
        self.geometry = mlp_head(n_features, hidden, sum(sizes[n] for n in GEOMETRY),
                                 part(GEOMETRY))
        self.appearance = mlp_head(self.backbone.feature_dim, hidden,
                                   sum(sizes[n] for n in APPEARANCE), part(APPEARANCE))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        stride8, stride16 = self.backbone.feature_maps(images)
        keypoints = self.keypoint_head(stride8, stride16)
        # Detached: the coarse losses train the MLPs (and layer4), never the landmark branch.
        geometry = self.geometry(self.standardise(keypoint_features(keypoints.detach())))
        appearance = self.appearance(self.backbone.pool_from_stride16(stride16.detach()))
        return {**split_code(self.layout, geometry, GEOMETRY),
                **split_code(self.layout, appearance, APPEARANCE), "keypoints": keypoints}
