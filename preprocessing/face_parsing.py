"""Skin mask from a face-parsing network (``mask: segmentation``), a TorchScript archive from
a local path (``segmentation_weights``; never downloaded).

The crop is resized to ``segmentation_size`` (bilinear), scaled to [0, 1] RGB and
normalised with ``segmentation_mean`` / ``segmentation_std``; the network returns
(1, K, H, W) class logits (or a tuple whose first item they are, as BiSeNet's three heads);
skin is every pixel whose argmax class is in ``segmentation_skin_classes``, resized back
to the crop by area (a crop pixel is skin when most of it is).

Defaults follow BiSeNet trained on CelebAMask-HQ (zllrunning/face-parsing.PyTorch): 512x512
input, ImageNet mean/std, 19 classes 0 background, 1 skin, 2/3 left/right brow, 4/5
left/right eye, 6 eyeglasses, 7/8 left/right ear, 9 earring, 10 nose, 11 mouth, 12/13
upper/lower lip, 14 neck, 15 necklace, 16 cloth, 17 hair, 18 hat. Skin = {1, 10}: face
skin and nose, without eyes, brows and mouth, like the landmark mask.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from preprocessing.config import PreprocessConfig
from preprocessing.torchscript import load_torchscript, network_device


class SegmentationSkinMask:
    """The face-parsing network behind the mask interface (see
    :func:`preprocessing.skin_mask.make_masker`)."""

    source = "segmentation network"

    def __init__(self, cfg: PreprocessConfig):
        self._device = network_device(cfg.network_device)
        self._net = load_torchscript(cfg.segmentation_weights, "preprocess.segmentation_weights",
                                     self._device)
        self._size = cfg.segmentation_size
        self._mean = torch.tensor(cfg.segmentation_mean, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.segmentation_std, device=self._device).view(1, 3, 1, 1)
        self._skin = torch.tensor(cfg.segmentation_skin_classes, device=self._device)

    def __call__(self, crop: np.ndarray, lmk: np.ndarray) -> np.ndarray:
        """crop: (S, S, 3) uint8 RGB (``lmk`` unused) -> (S, S) uint8 {0, 255}."""
        size = crop.shape[0]
        if size != self._size:
            crop = cv2.resize(crop, (self._size, self._size), interpolation=cv2.INTER_LINEAR)
        rgb = torch.from_numpy(crop).to(self._device).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            out = self._net((rgb - self._mean) / self._std)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        if not (isinstance(logits, torch.Tensor) and logits.ndim == 4 and logits.shape[0] == 1):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"preprocess.segmentation_weights: the network returned {got}, "
                             "not (1, K, H, W) logits")
        skin = torch.isin(logits[0].argmax(dim=0), self._skin).float().cpu().numpy()
        if skin.shape != (size, size):
            skin = cv2.resize(skin, (size, size), interpolation=cv2.INTER_AREA)
        return np.where(skin > 0.5, 255, 0).astype(np.uint8)
