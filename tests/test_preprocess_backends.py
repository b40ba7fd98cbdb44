"""Optional preprocessing backends from local TorchScript files: FAN landmarks
(``landmarker: fan``) and a face-parsing skin mask (``mask: segmentation``).

The real FAN / BiSeNet weights are not available offline, so each test builds a tiny
TorchScript network with a known answer and checks what the pipeline makes of it against
expectations computed here from the documented geometry.
"""
from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from flows.config import ConfigError, load_config
from preprocess_assets import astronaut
from preprocessing.config import PreprocessConfig
from preprocessing.crop import apply_affine, to_normalised
from preprocessing.landmarks import make_landmarker
from preprocessing.sample import SampleMaker
from preprocessing.skin_mask import make_masker
from preprocessing.torchscript import network_device
from recon.devices import cpu_threads_within
from recon.landmarks import LEFT_EYE, OUTER_LIPS, RIGHT_EYE

# Building the test networks uses torch.jit.script, which recent torch marks deprecated;
# the published FAN / face-parsing weights are TorchScript, so that is the format to test.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with cpu_threads_within(1):
        yield


def _save(module: nn.Module, path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


def _check_fan_input(x: torch.Tensor) -> None:
    """FAN's input contract: (1, 3, 256, 256) float32 RGB in [0, 1]."""
    if x.dtype != torch.float32 or list(x.shape) != [1, 3, 256, 256]:
        raise ValueError("FAN input must be (1, 3, 256, 256) float32")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError("FAN input must be in [0, 1]")


class PeakHeatmaps(nn.Module):
    """(1, 68, 64, 64) Gaussian heatmaps centred at fixed heatmap positions."""

    def __init__(self, centres: np.ndarray):
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_fan_input(x)
        grid = torch.arange(64, dtype=torch.float32)
        dx = grid.view(1, 1, 64) - self.centres[:, 0].view(68, 1, 1)
        dy = grid.view(1, 64, 1) - self.centres[:, 1].view(68, 1, 1)
        return torch.exp(-(dx * dx + dy * dy) / (2 * 1.5**2)).unsqueeze(0)


class RedChannelHeatmaps(nn.Module):
    """Every landmark's heatmap is the input's red channel, 4x4 average-pooled: all 68
    landmarks land on the brightest red spot of the crop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_fan_input(x)
        return F.avg_pool2d(x[:, 0:1], 4).expand(-1, 68, -1, -1)


class ColourParser(nn.Module):
    """19-class logits from colour: class 1 (skin) where red, 10 (nose) where blue, 17
    (hair) where green, 0 elsewhere; un-normalises with ImageNet mean/std first. Returns
    BiSeNet's (main, auxiliary) tuple at its input's resolution."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = x * self.std + self.mean
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        other = torch.full_like(r, -1.0)
        channels = [torch.full_like(r, 0.5)] + [other] * 18
        channels[1] = r - g - b
        channels[10] = b - r - g
        channels[17] = g - r - b
        logits = torch.stack(channels, dim=1)
        return logits, torch.zeros_like(logits)


class LeftHalfSkin(nn.Module):
    """2-class logits: skin (1) on the left half of the input, background (0) elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[3]
        left = (torch.arange(w) < w // 2).float().view(1, 1, w).expand(x.shape[0], x.shape[2], w)
        return torch.stack([torch.full_like(left, 0.5), left], dim=1)


def expected_photo(hm_xy: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Heatmap pixels -> photo pixels by the documented FAN geometry: a window of side
    200 (w + h) / 195 centred 0.12 h above the box centre, split into 64 heatmap pixels;
    box and window in pixel edges, results in pixel centres (edge - 0.5)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    side = 200.0 * (w + h) / 195.0
    left = (x0 + x1) / 2 - side / 2
    top = (y0 + y1) / 2 - 0.12 * h - side / 2
    return np.stack([left + (hm_xy[:, 0] + 0.5) * side / 64 - 0.5,
                     top + (hm_xy[:, 1] + 0.5) * side / 64 - 0.5], axis=1)


def _fan_config(weights: str, **kw) -> PreprocessConfig:
    return PreprocessConfig(landmarker="fan", landmarker_weights=weights, **kw)


def test_fan_decodes_heatmap_peaks_to_photo_coordinates(tmp_path):
    j = np.arange(68)
    # Peaks a quarter pixel off the grid, in every direction: the decoder's argmax plus
    # quarter-pixel step recovers them exactly...
    centres = np.stack([2 + (5 + 13 * j) % 60 + np.where(j % 2, 0.25, -0.25),
                        2 + (3 + 7 * j) % 60 + np.where(j % 3, 0.25, -0.25)], axis=1)
    # ...except on the heatmap's border, where the argmax is kept as it is.
    centres[0], centres[1] = (0.25, 62.75), (62.75, 0.25)
    decoded_hm = centres.copy()
    decoded_hm[0], decoded_hm[1] = (0, 63), (63, 0)

    landmarker = make_landmarker(_fan_config(_save(PeakHeatmaps(centres), tmp_path / "fan.pt")))
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for box in [(150.0, 90.0, 250.0, 210.0), (20.0, 200.5, 61.0, 251.0)]:
        lmk = landmarker(rgb, box)
        assert lmk.shape == (68, 2) and lmk.dtype == np.float32
        np.testing.assert_allclose(lmk, expected_photo(decoded_hm, box), atol=1e-3)
    assert landmarker.name == "fan-68"


def _blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("red, box_side", [((150.3, 121.7), 31.2), ((90.8, 140.2), 23.4)])
def test_fan_crop_shows_the_photo_as_rgb_in_unit_range(tmp_path, red, box_side):
    """A red spot in the photo is where the network sees it: the crop is the documented
    window, RGB (a brighter blue spot inside it would win if channels were swapped), and
    scaled to [0, 1] (the network refuses anything else)."""
    landmarker = make_landmarker(_fan_config(_save(RedChannelHeatmaps(), tmp_path / "fan.pt")))
    blue = (red[0] - 0.4 * box_side, red[1] + 0.3 * box_side)
    rgb = np.zeros((240, 320, 3), np.uint8)
    rgb[..., 0] = np.round(200 * _blob(rgb.shape[:2], red, 4.0))
    rgb[..., 2] = np.round(250 * _blob(rgb.shape[:2], blue, 4.0))
    # Box placed so the window (side ~2x the box) holds both spots, off its centre.
    x0 = red[0] - 0.3 * box_side
    y0 = red[1] - 0.6 * box_side
    lmk = landmarker(rgb, (x0, y0, x0 + box_side, y0 + box_side))
    # One heatmap pixel is side / 64 <= 1 photo pixel; argmax + quarter step is within a
    # quarter of it.
    np.testing.assert_allclose(lmk, np.broadcast_to(red, (68, 2)), atol=0.5)


def _squares_crop() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    crop = np.zeros((64, 64, 3), np.uint8)
    regions = {name: np.zeros((64, 64), bool) for name in ("red", "blue", "green")}
    regions["red"][8:24, 8:24] = True
    regions["blue"][30:46, 36:52] = True
    regions["green"][40:56, 4:20] = True
    crop[regions["red"]] = (255, 0, 0)
    crop[regions["blue"]] = (0, 0, 255)
    crop[regions["green"]] = (0, 255, 0)
    return crop, regions


@pytest.mark.parametrize("classes, skin", [([1, 10], ("red", "blue")), ([1], ("red",))])
def test_segmentation_mask_is_the_skin_classes(tmp_path, classes, skin):
    weights = _save(ColourParser(), tmp_path / "parser.pt")
    # The crop (64) is resized to the network's 128 and its logits back to 64.
    cfg = PreprocessConfig(mask="segmentation", segmentation_weights=weights,
                           segmentation_size=128, segmentation_skin_classes=classes)
    masker = make_masker(cfg)
    crop, regions = _squares_crop()
    mask = masker(crop, np.zeros((68, 2), np.float32))
    expected = np.zeros((64, 64), np.uint8)
    for name in skin:
        expected[regions[name]] = 255
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)
    assert masker.source == "segmentation network"


def test_segmentation_uses_the_configured_normalisation(tmp_path):
    """The parser un-normalises with ImageNet statistics; other statistics in the config
    reach the network and change its answer (red no longer reads as red)."""
    weights = _save(ColourParser(), tmp_path / "parser.pt")
    cfg = PreprocessConfig(mask="segmentation", segmentation_weights=weights,
                           segmentation_size=64, segmentation_mean=(0.0, 0.0, 0.0),
                           segmentation_std=(1.0, 1.0, 1.0))
    crop, _ = _squares_crop()
    assert not make_masker(cfg)(crop, np.zeros((68, 2), np.float32)).any()


def test_backends_without_weights_fail_at_config_load():
    with pytest.raises(ConfigError, match=r"preprocess: .*landmarker_weights"):
        load_config(None, ["preprocess.landmarker=fan"])
    with pytest.raises(ConfigError, match=r"preprocess: .*segmentation_weights"):
        load_config(None, ["preprocess.mask=segmentation"])
    with pytest.raises(ConfigError, match=r"preprocess\.segmentation_skin_classes"):
        load_config(None, ["preprocess.segmentation_skin_classes=[]"])
    with pytest.raises(ConfigError, match=r"preprocess\.segmentation_std"):
        load_config(None, ["preprocess.segmentation_std=[0.2, 0.0, 0.2]"])
    cfg = load_config(None, ["preprocess.landmarker=fan", "preprocess.landmarker_weights=f.zip"])
    assert cfg.preprocess.landmarker_weights == "f.zip"


def test_fingerprint_defaults_unchanged_and_backend_weights_count():
    # The defaults' fingerprint from before the optional backends existed: existing outputs
    # are not reprocessed.
    assert PreprocessConfig().fingerprint() == "4f62063b767c"
    assert PreprocessConfig(segmentation_size=256).fingerprint() == "4f62063b767c"
    fans = {_fan_config(w).fingerprint() for w in ("a.zip", "b.zip")}
    segs = {PreprocessConfig(mask="segmentation", segmentation_weights="s.pt",
                             segmentation_skin_classes=c).fingerprint() for c in ([1], [1, 10])}
    assert len(fans | segs | {"4f62063b767c"}) == 5


def test_bad_weights_files_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"preprocess\.landmarker_weights"):
        make_landmarker(_fan_config(str(tmp_path / "missing.zip")))
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a network")
    with pytest.raises(ValueError, match=r"preprocess\.landmarker_weights: .*not a TorchScript"):
        make_landmarker(_fan_config(str(junk)))
    # A plain state dict is a zip too, but not TorchScript.
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(3)}, state)
    with pytest.raises(ValueError, match=r"preprocess\.segmentation_weights: .*not a TorchScript"):
        make_masker(PreprocessConfig(mask="segmentation", segmentation_weights=str(state)))
    # A TorchScript network with the wrong output for its role.
    wrong = make_landmarker(_fan_config(_save(LeftHalfSkin(), tmp_path / "seg.pt")))
    with pytest.raises(ValueError, match=r"not \(1, 68, H, W\) heatmaps"):
        wrong(np.zeros((100, 100, 3), np.uint8), (30.0, 30.0, 70.0, 70.0))


def test_network_device_falls_back_to_cpu():
    assert network_device("cpu") == torch.device("cpu")
    assert network_device("cuda").type == ("cuda" if torch.cuda.is_available() else "cpu")


def _face_template() -> np.ndarray:
    """(68, 2) iBUG-ordered face in FAN heatmap pixels, a quarter pixel off the grid."""
    t = np.linspace(np.pi, 0, 17)
    jaw = np.stack([32 + 15 * np.cos(t), 30 + 17 * np.sin(t)], 1)
    brows = np.stack([np.r_[np.linspace(19, 29, 5), np.linspace(35, 45, 5)], np.full(10, 24)], 1)
    nose = np.r_[np.stack([np.full(4, 32), np.linspace(27, 36, 4)], 1),
                 np.stack([np.linspace(28, 36, 5), np.full(5, 38)], 1)]
    a = np.linspace(np.pi, -np.pi, 6, endpoint=False)
    eyes = np.r_[np.stack([24.5 + 3 * np.cos(a), 29 + 1.5 * np.sin(a)], 1),
                 np.stack([39.5 + 3 * np.cos(a), 29 + 1.5 * np.sin(a)], 1)]
    o = np.linspace(np.pi, -np.pi, 12, endpoint=False)
    i = np.linspace(np.pi, -np.pi, 8, endpoint=False)
    mouth = np.r_[np.stack([32 + 6 * np.cos(o), 42 + 2.5 * np.sin(o)], 1),
                  np.stack([32 + 4 * np.cos(i), 42 + 1 * np.sin(i)], 1)]
    pts = np.concatenate([jaw, brows, nose, eyes, mouth])
    return np.round(pts) + 0.25


def test_sample_maker_uses_the_configured_backends(tmp_path):
    template = _face_template()
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    cfg = _fan_config(_save(PeakHeatmaps(template), tmp_path / "fan.pt"), mask="segmentation",
                      segmentation_weights=_save(LeftHalfSkin(), tmp_path / "seg.pt"),
                      embedding="none")
    record = SampleMaker(cfg).make({"uri": str(photo), "rid": "r", "sha256": "0" * 64,
                                    "pts": None, "mask": None})
    assert record["status"] == "ok", record["reason"]
    meta = json.loads(record["meta"])
    assert meta["landmark_source"] == "fan-68 on dlib-hog"
    assert meta["mask_source"] == "segmentation network"
    # The landmarks are the FAN template mapped through the detector box of the main face.
    lmk = np.array(meta["landmarks_photo"])
    np.testing.assert_allclose(lmk, expected_photo(template, tuple(meta["faces"][0]["box"])),
                               atol=0.01)
    assert lmk[RIGHT_EYE + LEFT_EYE, 1].mean() < lmk[OUTER_LIPS, 1].mean()
    # The stored crop landmarks are these, and the mask is the network's left half.
    stored = np.load(io.BytesIO(record["lmk"]))
    np.testing.assert_allclose(stored, to_normalised(apply_affine(np.array(meta["transform"]),
                                                                  lmk), cfg.crop_size), atol=1e-3)
    mask = cv2.imdecode(np.frombuffer(record["mask"], np.uint8), cv2.IMREAD_UNCHANGED)
    expected = np.zeros((cfg.crop_size, cfg.crop_size), np.uint8)
    expected[:, : cfg.crop_size // 2] = 255
    np.testing.assert_array_equal(mask, expected)
