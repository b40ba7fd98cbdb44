"""DECA's networks: output layout, init, detail decoder design, local backbone weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from recon.networks import FEATURE_DIMS, Backbone, CodeLayout, CoarseEncoder, DetailDecoder, Encoder


def test_code_layout_matches_deca_236():
    layout = CodeLayout(100, 50, 50)
    assert layout.total == 236
    assert list(layout.sizes().values()) == [100, 50, 50, 6, 3, 27]
    assert layout.offset("cam") == 206 and layout.offset("light") == 209


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_backbone_feature_dims(name):
    net = Backbone(name).eval()
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, FEATURE_DIMS[name])


def test_resnet50_head_is_deca_2048_1024_236():
    enc = CoarseEncoder("resnet50", CodeLayout(100, 50, 50))
    linears = [m for m in enc.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 1024), (1024, 236)]


def test_coarse_encoder_split_and_initial_camera_and_light():
    torch.manual_seed(0)
    enc = CoarseEncoder("resnet18", CodeLayout(10, 5, 7), hidden=32, cam_init=(8.0, 0.1, -0.2),
                        light_init=3.5).eval()
    out = enc(torch.rand(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "shape": (2, 10), "tex": (2, 5), "exp": (2, 7), "pose": (2, 6), "cam": (2, 3),
        "light": (2, 9, 3)}
    # At init the prediction sits near the bias: the head fills the crop, grey light.
    assert torch.allclose(out["cam"], torch.tensor([[8.0, 0.1, -0.2]] * 2), atol=0.05)
    assert torch.allclose(out["light"][:, 0], torch.full((2, 3), 3.5), atol=0.05)
    assert out["light"][:, 1:].abs().max() < 0.05
    assert out["shape"].abs().max() < 0.05


def test_detail_decoder_design_and_range():
    torch.manual_seed(0)
    dec = DetailDecoder(n_exp=50, n_detail=128, uv_size=256, max_z=0.01)
    convs = [m for m in dec.blocks if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 64, 64, 32, 16, 1]
    assert dec.fc.in_features == 181 and dec.fc.out_features == 128 * 8 * 8
    assert sum(isinstance(m, nn.Upsample) for m in dec.blocks) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dec.blocks) == 5
    z = dec(torch.randn(2, 3) * 10, torch.randn(2, 50) * 10, torch.randn(2, 128) * 10)
    assert z.shape == (2, 1, 256, 256)
    assert z.abs().max() <= 0.01


def test_detail_decoder_small_uv_and_bad_size():
    assert DetailDecoder(5, 8, uv_size=32)(torch.zeros(1, 3), torch.zeros(1, 5),
                                          torch.zeros(1, 8)).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="uv_size"):
        DetailDecoder(5, 8, uv_size=100)


def test_backbone_loads_local_state_dict_and_rejects_wrong_one(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    ref = resnet18(weights=None)  # includes fc.*, which must be ignored
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = Backbone("resnet18", str(path))
    assert torch.equal(net.net.conv1.weight, ref.conv1.weight)
    with pytest.raises(ValueError, match="does not fit"):
        Backbone("mobilenet_v3_small", str(path))
    with pytest.raises(FileNotFoundError):
        Backbone("resnet18", str(tmp_path / "missing.pth"))


def test_encoder_generic_output():
    enc = Encoder("mobilenet_v3_small", 128, hidden=64).eval()
    assert enc(torch.rand(1, 3, 64, 64)).shape == (1, 128)


def test_deca_architecture_fixes_decas_choices():
    from pydantic import ValidationError

    from recon.config import NetworkConfig

    assert NetworkConfig(architecture="deca").image_size == 224
    for wrong in ({"backbone": "resnet18"}, {"image_size": 128}, {"uv_size": 128},
                  {"hidden": 512}, {"backbone_weights": "imagenet.pt"}):
        with pytest.raises(ValidationError, match="architecture 'deca' fixes"):
            NetworkConfig(architecture="deca", **wrong)
