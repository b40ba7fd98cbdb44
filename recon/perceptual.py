"""VGG19 features (relu3_2, relu4_2) for DECA's ID-MRF loss, from local weights only.

With a torchvision-format VGG19 state dict (``vgg19-dcbb9e9d.pth``: ``features.N.*`` keys)
the features are the ImageNet ones DECA uses. Without one, the module falls back to
*deterministic random-init* features (torchvision's initialisation under a fixed seed):
the loss stays usable but is a weaker perceptual prior. The fallback is never silent: it is
logged as a warning, and ``VGG19Features.pretrained`` / ``.weights_source`` say which
features are in use.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from recon.config import PerceptualConfig
from recon.formats.weights_file import checked_weights_file

log = logging.getLogger(__name__)

# Indices of the ReLU outputs in torchvision's ``vgg19().features``.
LAYERS = {"relu3_2": 13, "relu4_2": 22}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg19_trunk() -> nn.Sequential:
    """torchvision's ``vgg19().features[:23]`` (conv1_1 .. relu4_2), same layer indices, built
    without the rest of the network."""
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"][:13])


class VGG19Features(nn.Module):
    """Frozen VGG19 trunk up to relu4_2.

    ``forward(x: (B, 3, H, W) RGB in [0, 1]) -> {"relu3_2": (B, 256, H/4, W/4),
    "relu4_2": (B, 512, H/8, W/8)}``; ImageNet normalisation is applied inside."""

    def __init__(self, weights_path: str | Path | None = None, seed: int = 0) -> None:
        super().__init__()
        trunk: nn.Sequential
        if weights_path is not None:
            from recon.identity.state_files import load_state_dict

            trunk = _vgg19_trunk()
            own = trunk.state_dict()
            state = load_state_dict(weights_path)
            # The file's layer indices are torchvision's; keep those of this trunk only.
            wanted = {k[len("features."):]: v for k, v in state.items()
                      if k.startswith("features.") and k[len("features."):] in own}
            trunk.load_state_dict(wanted, strict=True)
            self.pretrained = True
            self.weights_source = str(weights_path)
        else:
            # torchvision's VGG initialisation (Kaiming normal, fan-out; zero bias), made
            # reproducible by a fixed seed that does not disturb the caller's random stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                trunk = _vgg19_trunk()
                for layer in trunk:
                    if isinstance(layer, nn.Conv2d):
                        nn.init.kaiming_normal_(layer.weight, mode="fan_out",
                                                nonlinearity="relu")
                        nn.init.zeros_(layer.bias)
            self.pretrained = False
            self.weights_source = f"random-init (seed {seed})"
            log.warning(
                "VGG19 perceptual features: no pretrained weights given (perceptual.weights) "
                "- using deterministic random-init features (seed %d). ID-MRF still works "
                "but is a weaker perceptual prior than with ImageNet VGG19 weights.", seed)
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:
        return super().train(False)  # frozen: always eval

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB images, got {tuple(x.shape)}")
        out: dict[str, torch.Tensor] = {}
        h = (x - self.mean) / self.std
        wanted = {index: name for name, index in LAYERS.items()}
        for index, layer in enumerate(self.trunk):
            h = layer(h)
            if index in wanted:
                out[wanted[index]] = h
        return out


def build_perceptual_network(cfg: PerceptualConfig, device: torch.device | str = "cpu"
                             ) -> VGG19Features:
    """VGG19 features from the local file ``cfg.weights`` (checked against
    ``weights_sha256`` when given), else the random-init fallback (refused when
    ``cfg.require_pretrained``).

    A config that leaves ``weights`` to the model store's 'vgg19' entry is resolved by the
    caller first (``infra.model_store.resolve_perceptual_weights``; the CLI and flows do it)."""
    path: Path | None = None
    if cfg.weights is not None:
        path = checked_weights_file(cfg.weights, cfg.weights_sha256, "perceptual.weights")
    elif cfg.require_pretrained:
        raise FileNotFoundError(
            "perceptual.require_pretrained is set but no VGG19 weights file is given "
            "(perceptual.weights, or the model store's 'vgg19' entry)")
    return VGG19Features(path, seed=cfg.random_seed).to(device)
