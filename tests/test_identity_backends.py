"""VGGFace2 ResNet50 and ArcFace IResNet backends: loading from local files in each accepted
format, the common interface, and the safety of the VGGFace2 pickle reader.

Their real weights are not obtainable here (licensed / not on a registry), so these tests
use seeded random weights written in the release formats."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from recon.config import IdentityConfig
from recon.identity.arcface import DEPTHS, ArcFaceIdentity, IResNet, iresnet_from_state
from recon.identity.build import build_identity_network
from recon.identity.vggface2 import MEAN_BGR, VGGFace2Identity, load_vggface2_state, resnet50_caffe


@pytest.fixture(scope="module")
def vggface2_net() -> torchvision.models.ResNet:
    """One seeded ResNet50 for the module (its random init takes a second): read only."""
    torch.manual_seed(0)
    return resnet50_caffe()


@pytest.fixture(scope="module")
def vggface2_state(vggface2_net) -> dict[str, torch.Tensor]:
    return vggface2_net.state_dict()


def test_resnet50_caffe_layout(vggface2_net) -> None:
    net = vggface2_net
    for layer in (net.layer2, net.layer3, net.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert net.maxpool.ceil_mode and net.fc.out_features == 8631


def test_vggface2_pickle_and_pth_give_the_same_network(vggface2_state, tmp_path) -> None:
    # The VGGFace2-pytorch release format: a pickled dict of numpy arrays.
    pkl = tmp_path / "resnet50_ft_weight.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({k: v.numpy() for k, v in vggface2_state.items()}, f, protocol=2)
    pth = tmp_path / "resnet50.pth"
    torch.save({k: v for k, v in vggface2_state.items() if not k.startswith("fc.")}, pth)
    a = VGGFace2Identity.from_file(pkl)
    b = VGGFace2Identity.from_file(pth)
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    ea = a(x)
    with torch.no_grad():
        torch.testing.assert_close(ea, b(x))
    assert ea.shape == (1, 2048) and a.embedding_dim == 2048
    torch.testing.assert_close(ea.norm(dim=1), torch.ones(1))
    ea.sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in a.parameters())


def test_vggface2_normalisation_is_decas(vggface2_net) -> None:
    net = VGGFace2Identity(vggface2_net)
    rgb = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    out = net.normalise(rgb).flatten()
    expected = torch.tensor([0.9 * 255 - MEAN_BGR[0], 0.5 * 255 - MEAN_BGR[1],
                             0.1 * 255 - MEAN_BGR[2]])
    torch.testing.assert_close(out, expected)
    assert net.crop_fraction == pytest.approx(204 / 224)  # DECA's 10-pixel margin


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_vggface2_pickle_reader_refuses_code(tmp_path) -> None:
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"conv1.weight": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle posix.system"):
        load_vggface2_state(bad)
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"w": np.arange(3.0)}))
    assert torch.equal(load_vggface2_state(ok)["w"], torch.arange(3.0, dtype=torch.float64))


def test_vggface2_refuses_a_foreign_state_dict(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a VGGFace2 ResNet50"):
        VGGFace2Identity.from_file(path)


def test_arcface_iresnet_from_file_through_the_factory(tmp_path) -> None:
    torch.manual_seed(0)
    state = IResNet(DEPTHS[18]).state_dict()
    path = tmp_path / "backbone.safetensors"
    save_file(state, str(path))
    net = build_identity_network(IdentityConfig(backend="arcface", weights=str(path)))
    assert isinstance(net, ArcFaceIdentity) and net.embedding_dim == 512
    x = torch.rand(2, 3, 150, 150, requires_grad=True)
    emb = net(x)
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    emb[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0
    # 112x112 input, insightface's (x - 127.5) / 127.5 on [0, 255].
    torch.testing.assert_close(net.normalise(torch.tensor([0.0, 0.5, 1.0])),
                               torch.tensor([-1.0, 0.0, 1.0]))


def test_arcface_depth_is_read_from_the_state_dict() -> None:
    state = IResNet(DEPTHS[34]).state_dict()
    assert len(iresnet_from_state(state).layer3) == 6
    del state["layer3.5.bn1.weight"]
    with pytest.raises(RuntimeError):
        iresnet_from_state(state)
    with pytest.raises(ValueError, match="not an arcface_torch IResNet"):
        iresnet_from_state({k: v for k, v in state.items() if not k.startswith("layer3.5.")})
