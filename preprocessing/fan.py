"""68 iBUG landmarks from face-alignment's FAN (``landmarker: fan``), a TorchScript archive
from a local path (``landmarker_weights``, e.g. 2DFAN4-*.zip; never downloaded).

face-alignment's procedure, in continuous coordinates (it truncates to integers twice):
the detector box gives a centre moved up by 0.12 x box height and a scale
``(w + h) / 195`` (195: the S3FD box size of a unit-scale face); the square window of side
``200 x scale`` around that centre is resampled to a 256x256 RGB crop in [0, 1]; FAN returns
(1, 68, 64, 64) heatmaps; each landmark is its heatmap's argmax moved a quarter pixel
towards the higher neighbour on each axis (not on the heatmap's border); heatmap, crop and
window share their outer edges, so a heatmap pixel covers 4x4 crop pixels.

Box coordinates are pixel edges (``x1`` exclusive, as the detectors give them); landmarks
come back in the photo's pixel coordinates (0-based, pixel centres at integers, x right,
y down).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from preprocessing.crop import apply_affine, scale_shift_affine
from preprocessing.torchscript import load_torchscript, network_device

INPUT_SIZE = 256  # FAN's input crop side
REFERENCE_SCALE = 195.0
CENTRE_SHIFT = 0.12  # of the box height, upwards: FAN's crops sit higher than S3FD boxes
N_LANDMARKS = 68


def fan_transform(box: tuple[float, float, float, float]) -> np.ndarray:
    """(2, 3) affine from photo pixels to FAN's 256x256 input crop for a detector box."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    side = 200.0 * (w + h) / REFERENCE_SCALE
    centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0 - CENTRE_SHIFT * h])
    return scale_shift_affine(INPUT_SIZE / side, centre - side / 2.0)


def heatmap_peaks(heatmaps: np.ndarray) -> np.ndarray:
    """heatmaps: (N, H, W) -> (N, 2) peaks (x, y) in heatmap pixels: the argmax moved
    0.25 px towards the higher neighbour on each axis, except on the border."""
    n, h, w = heatmaps.shape
    y, x = np.divmod(heatmaps.reshape(n, -1).argmax(axis=1), w)
    peaks = np.stack([x, y], axis=1).astype(np.float64)
    inner = np.nonzero((x > 0) & (x < w - 1) & (y > 0) & (y < h - 1))[0]
    xi, yi = x[inner], y[inner]
    slope = np.stack([heatmaps[inner, yi, xi + 1] - heatmaps[inner, yi, xi - 1],
                      heatmaps[inner, yi + 1, xi] - heatmaps[inner, yi - 1, xi]], axis=1)
    peaks[inner] += 0.25 * np.sign(slope)
    return peaks


class FanLandmarker:
    """FAN behind the landmarker interface (see :func:`preprocessing.landmarks.make_landmarker`)."""

    name = "fan-68"

    def __init__(self, weights: str, device: str = "cpu"):
        self._device = network_device(device)
        self._net = load_torchscript(weights, "preprocess.landmarker_weights", self._device)

    def __call__(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """rgb: (H, W, 3) uint8 -> (68, 2) float32 photo pixels."""
        transform = fan_transform(box)
        crop = cv2.warpAffine(rgb, transform, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inp = torch.from_numpy(crop).to(self._device).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            out = self._net(inp)
        if not (isinstance(out, torch.Tensor) and out.ndim == 4
                and tuple(out.shape[:2]) == (1, N_LANDMARKS)):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"preprocess.landmarker_weights: the network returned {got}, "
                             f"not (1, {N_LANDMARKS}, H, W) heatmaps")
        heatmaps = out[0].float().cpu().numpy()
        # Heatmap and crop share their outer edges: scale in edge coordinates (+-0.5).
        stride = np.array([INPUT_SIZE / heatmaps.shape[2], INPUT_SIZE / heatmaps.shape[1]])
        crop_px = (heatmap_peaks(heatmaps) + 0.5) * stride - 0.5
        return apply_affine(cv2.invertAffineTransform(transform), crop_px).astype(np.float32)
