"""insightface ArcFace (Deng et al. 2019) from a local file.

Two sources are accepted:
- an ONNX model of an insightface model pack (e.g. ``w600k_r50.onnx``), converted to
  PyTorch with onnx2torch (optional extra ``wildface[insightface]``; import-guarded);
- PyTorch weights of insightface's ``arcface_torch`` IResNet (``backbone.pth``,
  ``.safetensors``): the depth (18/34/50/100) is read from the state dict.

Input as insightface feeds it: 112x112 RGB, ``(x * 255 - 127.5) / 127.5``; 512-d output.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from recon.identity.network import IdentityNetwork
from recon.identity.state_files import load_state_dict

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    """Pre-activation-style basic block of arcface_torch's IResNet (BN-conv-BN-PReLU-conv-BN)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """arcface_torch IResNet: (B, 3, 112, 112) normalised -> (B, 512) (not normalised)."""

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        widths = (64, 128, 256, 512)
        cin = 64
        for i, (width, blocks) in enumerate(zip(widths, layers), start=1):
            stage = [IBasicBlock(cin, width, stride=2)]
            stage += [IBasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


def iresnet_from_state(state: dict[str, torch.Tensor]) -> IResNet:
    """An IResNet of the depth the state dict describes, with its weights loaded."""
    counts = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state
                  if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(blocks))
    layers = tuple(counts)
    if layers not in DEPTHS.values():
        raise ValueError(f"not an arcface_torch IResNet state dict (blocks per stage {layers}; "
                         f"known: {DEPTHS})")
    net = IResNet(layers, num_features=state["fc.weight"].shape[0])
    net.load_state_dict(state, strict=True)
    return net


def onnx_to_torch(path: str | Path) -> nn.Module:
    """Convert an insightface ONNX recogniser with onnx2torch (optional dependency)."""
    try:
        from onnx2torch import convert
    except ImportError:
        raise ImportError("loading an ArcFace .onnx needs onnx2torch: pip install "
                          "'wildface[insightface]' (or give arcface_torch .pth weights)") from None
    return convert(str(path))


class ArcFaceIdentity(IdentityNetwork):
    """ArcFace recogniser (IResNet or converted ONNX); 512-d."""

    embedding_dim = 512
    input_size = 112

    def __init__(self, backbone: nn.Module, crop_fraction: float = 1.0) -> None:
        super().__init__(crop_fraction)
        self.backbone = backbone

    @classmethod
    def from_file(cls, path: str | Path, crop_fraction: float = 1.0) -> ArcFaceIdentity:
        path = Path(path)
        if path.suffix == ".onnx":
            backbone = onnx_to_torch(path)
        else:
            backbone = iresnet_from_state(load_state_dict(path))
        return cls(backbone, crop_fraction).freeze()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images * 255.0 - 127.5) / 127.5

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
