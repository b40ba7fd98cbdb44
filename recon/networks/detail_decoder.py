"""DECA's detail decoder: [jaw pose 3 | expression | detail code] -> UV displacement map.

Linear -> 128 x 8 x 8, then k blocks of (bilinear x2, conv 3x3, batch norm, LeakyReLU 0.2)
with channels 128, 128, 64, 64, 32, 16 (k = 5 for the paper's 256 x 256 map), a final 3x3 conv
to one channel, tanh x max_z. Smaller UV sizes use the first k blocks.

:class:`DecaDetailDecoder` is DECA's released ``Generator`` as its code builds it: a batch norm
on the 8 x 8 input map before the first block, the blocks' batch norms with eps 0.8 (its
``nn.BatchNorm2d(c, 0.8)`` passes 0.8 as eps, not as momentum), always 256 x 256, DECA's key
names (``l1.0.*``, ``conv_blocks.<i>.*``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

_CHANNELS = (128, 128, 64, 64, 32, 16)
_START = 8


class DetailDecoder(nn.Module):
    """(jaw (B, 3), exp (B, n_exp), detail (B, n_detail)) -> uv_z (B, 1, uv_size, uv_size)
    in [-max_z, max_z]."""

    def __init__(self, n_exp: int, n_detail: int, uv_size: int = 256, max_z: float = 0.01) -> None:
        super().__init__()
        n_blocks = int(round(math.log2(uv_size / _START)))
        if n_blocks < 1 or _START * 2**n_blocks != uv_size or n_blocks > len(_CHANNELS) - 1:
            raise ValueError(f"uv_size must be 8 x 2^k with 1 <= k <= 5, got {uv_size}")
        self.in_dim = 3 + n_exp + n_detail
        self.uv_size = uv_size
        self.max_z = max_z
        self.fc = nn.Linear(self.in_dim, _CHANNELS[0] * _START * _START)
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(_CHANNELS[:n_blocks], _CHANNELS[1:n_blocks + 1]):
            blocks += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        blocks.append(nn.Conv2d(_CHANNELS[n_blocks], 1, 3, padding=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, jaw: torch.Tensor, exp: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat([jaw, exp, detail], dim=1))
        x = x.view(-1, _CHANNELS[0], _START, _START)
        return torch.tanh(self.blocks(x)) * self.max_z


# DECA's generator passes 0.8 positionally to BatchNorm2d: eps, which its weights were trained
# with (a large eps damps the normalisation of low-variance channels).
DECA_BN_EPS = 0.8


class DecaDetailDecoder(nn.Module):
    """DECA's ``D_detail``: (jaw (B, 3), exp (B, n_exp), detail (B, n_detail)) -> uv_z
    (B, 1, 256, 256) in [-max_z, max_z]."""

    def __init__(self, n_exp: int, n_detail: int, max_z: float = 0.01) -> None:
        super().__init__()
        n_blocks = len(_CHANNELS) - 1
        self.in_dim = 3 + n_exp + n_detail
        self.uv_size = _START * 2**n_blocks
        self.max_z = max_z
        self.l1 = nn.Sequential(nn.Linear(self.in_dim, _CHANNELS[0] * _START * _START))
        blocks: list[nn.Module] = [nn.BatchNorm2d(_CHANNELS[0])]
        for c_in, c_out in zip(_CHANNELS[:-1], _CHANNELS[1:]):
            blocks += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out, eps=DECA_BN_EPS),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        blocks += [nn.Conv2d(_CHANNELS[-1], 1, 3, padding=1), nn.Tanh()]
        self.conv_blocks = nn.Sequential(*blocks)

    def forward(self, jaw: torch.Tensor, exp: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        x = self.l1(torch.cat([jaw, exp, detail], dim=1))
        return self.conv_blocks(x.view(-1, _CHANNELS[0], _START, _START)) * self.max_z
