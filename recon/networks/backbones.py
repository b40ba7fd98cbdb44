"""Image backbones for DECA's encoders: torchvision architectures without their classifier.

Weights are never downloaded: a backbone starts from random init or from a local state-dict
file in torchvision's key layout (``.pt``/``.pth`` loaded with ``weights_only=True``, or
``.safetensors``). Keys of the dropped classifier (``fc.*``, ``classifier.*``) are ignored.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

# Pooled feature width of each supported architecture.
FEATURE_DIMS = {"resnet50": 2048, "resnet18": 512, "mobilenet_v3_small": 576}
# Channels of the stride-8 and stride-16 maps (layer2, layer3) of the ResNets.
MAP_CHANNELS = {"resnet50": (512, 1024), "resnet18": (128, 256)}

# torchvision's ImageNet statistics: inputs are normalised with them so a local ImageNet
# state dict works as is; for random init they are a harmless affine map.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def classifier_free(name: str) -> nn.Module:
    """torchvision's ``name`` (random init) with its classifier replaced by the identity:
    images (B, 3, H, W) -> pooled features (B, FEATURE_DIMS[name]). Its state-dict keys are
    torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) minus the classifier's."""
    if name not in FEATURE_DIMS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(FEATURE_DIMS)}")
    if name.startswith("resnet"):
        net = getattr(models, name)(weights=None)
        net.fc = nn.Identity()
    else:
        net = models.mobilenet_v3_small(weights=None)
        net.classifier = nn.Identity()
    return net


class Backbone(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> pooled features (B, feature_dim)."""

    def __init__(self, name: str, weights_path: str | None = None) -> None:
        super().__init__()
        self.net = classifier_free(name)
        self.name = name
        self.feature_dim = FEATURE_DIMS[name]
        if weights_path is not None:
            self._load(weights_path)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _load(self, weights_path: str) -> None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit a {self.name}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)

    @property
    def map_channels(self) -> tuple[int, int]:
        """ResNets only: channels (C8, C16) of the maps ``feature_maps`` returns."""
        if self.name not in MAP_CHANNELS:
            raise ValueError(f"feature maps need a ResNet backbone ({sorted(MAP_CHANNELS)}), "
                             f"not {self.name!r}")
        return MAP_CHANNELS[self.name]

    def feature_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ResNets only (``map_channels`` refuses the others): images (B, 3, H, W) -> the
        stride-8 map (B, C8, H/8, W/8) and the stride-16 map (B, C16, H/16, W/16)."""
        net = self.net
        x = (images - self.mean) / self.std
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        stride8 = net.layer2(net.layer1(x))
        return stride8, net.layer3(stride8)

    def pool_from_stride16(self, stride16: torch.Tensor) -> torch.Tensor:
        """ResNets only: the stride-16 map of ``feature_maps`` -> pooled features
        (B, feature_dim), as ``forward`` would give."""
        return torch.flatten(self.net.avgpool(self.net.layer4(stride16)), 1)

