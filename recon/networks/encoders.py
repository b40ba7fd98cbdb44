"""DECA's encoders: a backbone's pooled features -> MLP (hidden, ReLU) -> a flat code.

The coarse encoder's code splits into shape | tex | exp | pose (global 3 + jaw 3) | cam
(weak-perspective s, tx, ty) | light (9 SH x RGB). The detail encoder has the same design with
a 128-d output.

Two variants (``model.architecture``): wildface's (:class:`Encoder`, :class:`CoarseEncoder`:
ImageNet-normalised input, keys ``backbone.net.*`` / ``head.*``) and DECA's released one
(:class:`DecaEncoder`, :class:`DecaCoarseEncoder`: the [0, 1] image as it is, DECA's keys
``encoder.*`` / ``layers.*``), which computes the same function as DECA's ``ResnetEncoder``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recon.networks.backbones import FEATURE_DIMS, Backbone, classifier_free

N_POSE = 6
N_CAM = 3
N_LIGHT = 27

# The output layer starts with weights scaled down by this factor, so that the first
# predictions sit close to the bias (mean face, sensible camera, grey light) whatever the
# random backbone features are; otherwise random codes can push the head out of the crop.
_OUT_WEIGHT_SCALE = 0.01


@dataclass(frozen=True)
class CodeLayout:
    """Sizes of the coarse code's parts, in order."""

    n_shape: int
    n_tex: int
    n_exp: int
    n_pose: int = N_POSE
    n_cam: int = N_CAM
    n_light: int = N_LIGHT

    def sizes(self) -> dict[str, int]:
        return {
            "shape": self.n_shape, "tex": self.n_tex, "exp": self.n_exp,
            "pose": self.n_pose, "cam": self.n_cam, "light": self.n_light,
        }

    @property
    def total(self) -> int:
        return sum(self.sizes().values())

    def offset(self, name: str) -> int:
        """Index of the first entry of part ``name`` in the flat code."""
        start = 0
        for key, size in self.sizes().items():
            if key == name:
                return start
            start += size
        raise KeyError(name)


def mlp_head(in_dim: int, hidden: int, out_dim: int,
             out_bias: torch.Tensor | None = None) -> nn.Sequential:
    """DECA's head: Linear -> ReLU -> Linear, (B, in_dim) -> (B, out_dim). ``out_bias``
    (out_dim,) is what it predicts for average inputs at init."""
    head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))
    last = head[-1]
    with torch.no_grad():
        last.weight.mul_(_OUT_WEIGHT_SCALE)
        last.bias.zero_()
        if out_bias is not None:
            if out_bias.shape != (out_dim,):
                raise ValueError(f"out_bias must be ({out_dim},), got {tuple(out_bias.shape)}")
            last.bias.copy_(out_bias)
    return head


def coarse_out_bias(layout: CodeLayout, cam_init: tuple[float, float, float],
                    light_init: float) -> torch.Tensor:
    """(layout.total,) the coarse code at init: mean face, ``cam_init``, grey light."""
    bias = torch.zeros(layout.total)
    cam = layout.offset("cam")
    bias[cam:cam + N_CAM] = torch.tensor(cam_init)
    light = layout.offset("light")
    # First SH band (the constant term) of each colour channel: uniform grey light.
    bias[light:light + 3] = light_init
    return bias


def split_code(layout: CodeLayout, flat: torch.Tensor, names: tuple[str, ...]
               ) -> dict[str, torch.Tensor]:
    """flat (B, sum of the parts' sizes), the parts ``names`` in that order -> name -> part;
    light reshaped to (B, 9, 3)."""
    sizes = layout.sizes()
    parts = dict(zip(names, flat.split([sizes[n] for n in names], 1)))
    if "light" in parts:
        parts["light"] = parts["light"].reshape(-1, 9, 3)
    return parts


class Encoder(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> code (B, out_dim).

    ``out_bias`` (out_dim,) is the code predicted for average features at init.
    """

    def __init__(
        self,
        backbone: str,
        out_dim: int,
        hidden: int = 1024,
        weights_path: str | None = None,
        out_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.backbone = Backbone(backbone, weights_path)
        self.head = mlp_head(self.backbone.feature_dim, hidden, out_dim, out_bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class CoarseEncoder(Encoder):
    """images (B, 3, H, W) -> dict of code parts: shape (B, n_shape), tex (B, n_tex),
    exp (B, n_exp), pose (B, 6), cam (B, 3), light (B, 9, 3)."""

    def __init__(
        self,
        backbone: str,
        layout: CodeLayout,
        hidden: int = 1024,
        weights_path: str | None = None,
        cam_init: tuple[float, float, float] = (1.0, 0.0, 0.0),
        light_init: float = 1.0,
    ) -> None:
        super().__init__(backbone, layout.total, hidden, weights_path,
                         coarse_out_bias(layout, cam_init, light_init))
        self.layout = layout

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return split_code(self.layout, super().forward(images), tuple(self.layout.sizes()))


class DecaEncoder(nn.Module):
    """DECA's ``ResnetEncoder``: images (B, 3, 224, 224) in [0, 1] -> code (B, out_dim).

    The image goes in as it is: DECA trained its released weights on [0, 1] crops without
    ImageNet normalisation. ``encoder``: ResNet50 in torchvision's layout without ``fc``
    (DECA's own ResNet has the same modules, names and strides; its ``AvgPool2d(7)`` equals
    torchvision's global pool on the 7 x 7 map of a 224 crop); ``layers``: Linear -> ReLU ->
    Linear. Its state-dict keys are those of DECA's ``E_flame`` / ``E_detail``.
    """

    def __init__(self, out_dim: int, hidden: int = 1024,
                 out_bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.encoder = classifier_free("resnet50")
        self.layers = mlp_head(FEATURE_DIMS["resnet50"], hidden, out_dim, out_bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(images))


class DecaCoarseEncoder(DecaEncoder):
    """DECA's ``E_flame``: images (B, 3, 224, 224) in [0, 1] -> the parts of
    :class:`CoarseEncoder` (DECA's ``decompose_code`` order: shape, tex, exp, pose, cam, light)."""

    def __init__(self, layout: CodeLayout, hidden: int = 1024,
                 cam_init: tuple[float, float, float] = (1.0, 0.0, 0.0),
                 light_init: float = 1.0) -> None:
        super().__init__(layout.total, hidden, coarse_out_bias(layout, cam_init, light_init))
        self.layout = layout

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return split_code(self.layout, super().forward(images), tuple(self.layout.sizes()))
