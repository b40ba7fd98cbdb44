"""VGGFace2 ResNet50 (Cao et al. 2018), DECA's identity network, from a local weights file.

The network is the Caffe-style ResNet50 of the VGGFace2 release (as ported to PyTorch by
``VGGFace2-pytorch``: ``resnet50_ft_weight.pkl``, the file DECA uses): stride in each
stage's first 1x1 conv and a ceil-mode max pool. Parameter names are torchvision's, so the
weights load from that pickle (numpy arrays; read with :mod:`recon.formats.safe_pickle`, which
rebuilds only arrays and plain containers, within a memory budget), from a ``.pth`` state
dict (``weights_only``) or ``.safetensors``.

As in DECA: crop a 10-pixel margin of the 224 crop (``crop_fraction`` 204/224), resize to
224, BGR, ``x * 255 - mean_bgr``; the embedding is the 2048-d pooled feature.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from recon.identity.network import IdentityNetwork
from recon.identity.state_files import load_state_dict
from recon.formats.safe_pickle import safe_loads

MEAN_BGR = (91.4953, 103.8827, 131.0912)
DECA_CROP_FRACTION = 204 / 224


def resnet50_caffe(num_classes: int = 8631) -> torchvision.models.ResNet:
    """torchvision's ResNet50 rearranged as the Caffe original: the stride of each
    downsampling block sits in its first 1x1 conv, and the stem's max pool rounds up."""
    net = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    for layer in (net.layer2, net.layer3, net.layer4):
        block = layer[0]
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return net


def load_vggface2_state(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict from ``resnet50_ft_weight.pkl`` (dict of numpy arrays), ``.pth`` or
    ``.safetensors``."""
    path = Path(path)
    if path.suffix != ".pkl":
        return load_state_dict(path)
    raw = safe_loads(path.read_bytes())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
    return {k: torch.from_numpy(np.array(v)) for k, v in raw.items()}


class VGGFace2Identity(IdentityNetwork):
    """ResNet50 trained on VGGFace2; 2048-d pooled features, L2-normalised."""

    embedding_dim = 2048
    input_size = 224

    def __init__(self, backbone: torchvision.models.ResNet,
                 crop_fraction: float = DECA_CROP_FRACTION) -> None:
        super().__init__(crop_fraction)
        self.backbone = backbone
        self.register_buffer("mean_bgr", torch.tensor(MEAN_BGR).view(1, 3, 1, 1),
                             persistent=False)

    @classmethod
    def from_file(cls, path: str | Path,
                  crop_fraction: float = DECA_CROP_FRACTION) -> VGGFace2Identity:
        net = resnet50_caffe()
        state = load_vggface2_state(path)
        # The classifier (fc) is not used for embeddings; accept files without it.
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{path}: not a VGGFace2 ResNet50 state dict: {err}") from None
        bad_missing = [k for k in missing if not k.startswith("fc.")]
        if bad_missing or unexpected:
            raise ValueError(f"{path}: not a VGGFace2 ResNet50 state dict; missing "
                             f"{bad_missing[:5]}, unexpected {list(unexpected)[:5]}")
        return cls(net, crop_fraction).freeze()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(1) * 255.0 - self.mean_bgr

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return b.avgpool(x).flatten(1)
