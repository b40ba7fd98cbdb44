"""VGG19 features for ID-MRF: torchvision-format weights from a local file, or a
deterministic random-init fallback that is logged, never silent."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from flows.config import load_config, with_stage_weights
from infra.model_store import ModelStore, ModelStoreError, resolve_perceptual_weights
from recon.config import PerceptualConfig
from recon.perceptual import LAYERS, VGG19Features, build_perceptual_network
from recon.formats.weights_file import ChecksumMismatchError


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision-format VGG19 state dict file (features up to relu4_2 from a seeded
    torchvision VGG19, plus a classifier entry that the loader must ignore)."""
    torch.manual_seed(123)
    # The full torchvision layout (features 0..36); only 0..22 are needed.
    trunk = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"])
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    state["classifier.0.bias"] = torch.zeros(4096)
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(state, path)
    return path, trunk


def test_random_init_fallback_is_logged_and_deterministic(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="recon.perceptual"):
        a = VGG19Features(None, seed=0)
    assert not a.pretrained and a.weights_source == "random-init (seed 0)"
    assert any("random-init" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    state = torch.random.get_rng_state()
    b = VGG19Features(None, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's stream untouched
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    c = VGG19Features(None, seed=1)
    assert not torch.equal(a.trunk[0].weight, c.trunk[0].weight)


def test_features_shapes_and_gradients() -> None:
    net = VGG19Features(None)
    x = torch.rand(2, 3, 64, 48, requires_grad=True)
    out = net(x)
    assert set(out) == {"relu3_2", "relu4_2"}
    assert out["relu3_2"].shape == (2, 256, 16, 12)
    assert out["relu4_2"].shape == (2, 512, 8, 6)
    assert (out["relu4_2"] >= 0).all()
    out["relu4_2"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training


def test_loads_torchvision_weights_and_matches_torchvision(vgg_file) -> None:
    path, trunk = vgg_file
    net = VGG19Features(path)
    assert net.pretrained and net.weights_source == str(path)
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = trunk.eval()[: LAYERS["relu4_2"] + 1]((x - mean) / std)
        torch.testing.assert_close(net(x)["relu4_2"], reference)


def test_build_from_config_store_and_checksum(vgg_file, tmp_path, caplog) -> None:
    path, _ = vgg_file
    assert build_perceptual_network(PerceptualConfig(weights=str(path))).pretrained
    with pytest.raises(ChecksumMismatchError):
        build_perceptual_network(PerceptualConfig(weights=str(path), weights_sha256="a" * 64))
    with pytest.raises(FileNotFoundError, match="perceptual.weights: file not found"):
        build_perceptual_network(PerceptualConfig(weights=str(tmp_path / "missing.pth")))
    with pytest.raises(FileNotFoundError, match="require_pretrained"):
        build_perceptual_network(PerceptualConfig(require_pretrained=True))

    # A store without 'vgg19' leaves the config alone: random-init features, logged.
    empty = PerceptualConfig(store=str(tmp_path / "empty-store"))
    assert resolve_perceptual_weights(empty) == empty
    with caplog.at_level(logging.WARNING, logger="recon.perceptual"):
        assert not build_perceptual_network(resolve_perceptual_weights(empty)).pretrained
    assert "random-init" in caplog.text

    store = ModelStore(tmp_path / "store")
    store.add("vgg19", path, source="test")
    cfg = resolve_perceptual_weights(PerceptualConfig(store=store.root, require_pretrained=True))
    assert cfg.weights == str(store.path("vgg19"))
    net = build_perceptual_network(cfg)
    assert net.pretrained and net.weights_source == str(store.path("vgg19"))
    given = PerceptualConfig(weights=str(path), store=store.root)
    assert resolve_perceptual_weights(given) == given  # a file in config wins

    # The flows resolve the store for the stage that builds the network, and only then.
    run = load_config(None, {"perceptual.store": store.root, "identity.store": str(tmp_path)})
    assert with_stage_weights(run, "detail").perceptual.weights == str(store.path("vgg19"))
    assert with_stage_weights(run, "detail").identity == run.identity
    with pytest.raises(ModelStoreError, match="facenet-casia-webface"):
        with_stage_weights(run, "coarse")  # the coarse stage needs the identity network's
    off = run.model_copy(update={"loss": run.loss.model_copy(update={"mrf": 0.0})})
    assert with_stage_weights(off, "detail").perceptual.weights is None
