"""The coarse encoder's keypoint head (model.head: keypoints): soft-argmax, the landmark
features, the encoder's gradient routing, its training phase, config checks, checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from flows.config import ConfigError, load_config
from recon.config import FaceModelConfig, LossConfig, NetworkConfig, TrainConfig
from recon.deca import DECA
from recon.losses.landmarks import keypoint_loss
from recon.networks import CodeLayout, KeypointCoarseEncoder
from recon.networks.keypoints import keypoint_features, soft_argmax
from recon.training.steps import CoarseStep
from tiny_face_model import tiny_face_assets

NET = NetworkConfig(backbone="resnet18", head="keypoints", hidden=16, n_detail=8,
                    image_size=32, uv_size=16)


def test_soft_argmax_finds_a_peak_and_the_midpoint_of_two():
    h, w = 4, 6
    maps = torch.full((1, 2, h, w), -1e4)
    maps[0, 0, 1, 4] = 0.0  # one peak: row 1, column 4
    maps[0, 1, 0, 0] = maps[0, 1, 3, 2] = 0.0  # two equal peaks
    pts = soft_argmax(maps)[0]
    # pixel centres in [-1, 1]: x = (2 col + 1) / W - 1, y = (2 row + 1) / H - 1
    assert pts[0].tolist() == pytest.approx([9 / 6 - 1, 3 / 4 - 1])
    mid = [((1 / 6 - 1) + (5 / 6 - 1)) / 2, ((1 / 4 - 1) + (7 / 4 - 1)) / 2]
    assert pts[1].tolist() == pytest.approx(mid)
    # uniform maps: the centre of the image
    assert soft_argmax(torch.zeros(1, 1, h, w))[0, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_keypoint_features_remove_translation_and_scale_and_keep_them_apart():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(2, 68, 2, generator=g) - 0.5
    moved = pts * 1.7 + torch.tensor([0.2, -0.1])
    f, fm = keypoint_features(pts), keypoint_features(moved)
    assert f.shape == (2, 139)
    assert torch.allclose(f[:, :136], fm[:, :136], atol=1e-5)  # normalised points unchanged
    assert torch.allclose(fm[:, 136:138], f[:, 136:138] * 1.7 + torch.tensor([0.2, -0.1]), atol=1e-6)
    assert torch.allclose(fm[:, 138], f[:, 138] + math.log(1.7), atol=1e-5)
    # unit RMS spread of the normalised points
    assert torch.allclose(f[:, :136].view(2, 68, 2).pow(2).sum(-1).mean(1), torch.ones(2))


def test_keypoint_loss_is_the_mean_absolute_coordinate_error():
    target = torch.zeros(1, 3, 2)
    pred = torch.tensor([[[0.3, 0.0], [0.0, -0.6], [0.3, 0.0]]])
    assert float(keypoint_loss(pred, target)) == pytest.approx(1.2 / 6)
    with pytest.raises(ValueError):
        keypoint_loss(pred, torch.zeros(1, 4, 2))


def _encoder() -> KeypointCoarseEncoder:
    torch.manual_seed(0)
    return KeypointCoarseEncoder("resnet18", CodeLayout(10, 5, 7), hidden=16,
                                 cam_init=(8.0, 0.1, -0.2), light_init=3.5)


def _grad_owners(enc: KeypointCoarseEncoder) -> set[str]:
    return {name.split(".")[0] if not name.startswith("backbone") else name.split(".")[2]
            for name, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_encoder_outputs_and_initial_camera_and_light():
    enc = _encoder().eval()
    out = enc(torch.rand(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "shape": (2, 10), "tex": (2, 5), "exp": (2, 7), "pose": (2, 6), "cam": (2, 3),
        "light": (2, 9, 3), "keypoints": (2, 68, 2)}
    assert torch.allclose(out["cam"], torch.tensor([[8.0, 0.1, -0.2]] * 2), atol=0.05)
    assert torch.allclose(out["light"][:, 0], torch.full((2, 3), 3.5), atol=0.05)
    assert out["keypoints"].abs().max() < 1


def test_codes_losses_never_train_the_landmark_branch_and_keypoints_train_only_it():
    enc = _encoder().train()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = enc(images)
    sum(out[k].float().pow(2).sum() for k in ("shape", "exp", "pose", "cam", "tex", "light")).backward()
    assert _grad_owners(enc) == {"standardise", "geometry", "appearance", "layer4"}
    enc.zero_grad(set_to_none=True)
    keypoint_loss(enc(images)["keypoints"], torch.zeros(4, 68, 2)).backward()
    assert _grad_owners(enc) == {"conv1", "bn1", "layer1", "layer2", "layer3", "keypoint_head"}


def test_keypoint_head_learns_to_locate_points():
    torch.manual_seed(0)
    enc = _encoder().train()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(4, 3, 64, 64, generator=g)
    target = (torch.rand(4, 68, 2, generator=g) - 0.5) * 0.8
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = keypoint_loss(enc(images)["keypoints"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def _batch(B: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(B, 3, 32, 32, generator=g),
            "landmarks": (torch.rand(B, 68, 2, generator=g) - 0.5) * 0.6,
            "masks": torch.ones(B, 1, 32, 32), "identity": torch.arange(B) // 2}


def test_keypoint_phase_trains_the_landmark_branch_alone_then_the_codes_follow():
    torch.manual_seed(0)
    model = DECA(FaceModelConfig(), NET, assets=tiny_face_assets())
    step = CoarseStep(model, LossConfig(), TrainConfig(keypoint_steps=1, pretrain_steps=2))
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    assert step.phase == "keypoints"
    loss, terms = step(_batch())
    assert set(terms) == {"keypoints", "loss"}
    assert step.optim_step(loss, opt)
    enc = model.coarse_encoder
    assert _grad_owners(enc) == {"conv1", "bn1", "layer1", "layer2", "layer3", "keypoint_head"}
    assert step.phase == "pretrain"
    loss, terms = step(_batch())
    assert {"keypoints", "landmarks", "eye_closure", "reg_shape"} <= set(terms)
    assert "photometric" not in terms
    assert step.optim_step(loss, opt)
    assert {"geometry", "keypoint_head"} <= _grad_owners(enc)
    assert step.phase == "full"


def test_keypoint_phase_without_the_head_is_refused():
    model = DECA(FaceModelConfig(), NET.model_copy(update={"head": "pooled"}),
                 assets=tiny_face_assets())
    step = CoarseStep(model, LossConfig(), TrainConfig(keypoint_steps=1))
    with pytest.raises(ValueError, match="keypoint_steps"):
        step(_batch())


def test_config_checks_name_the_fields():
    with pytest.raises(ValidationError, match="head 'keypoints' needs a ResNet"):
        NetworkConfig(backbone="mobilenet_v3_small", head="keypoints")
    with pytest.raises(ValueError, match="need a ResNet backbone"):
        KeypointCoarseEncoder("mobilenet_v3_small", CodeLayout(10, 5, 7))
    with pytest.raises(ConfigError, match="train.keypoint_steps"):
        load_config("demo", ["train.keypoint_steps=10"])
    cfg = load_config("demo", ["model.head=keypoints", "train.keypoint_steps=10"])
    assert cfg.train.keypoint_steps == 10


def test_checkpoints_record_the_head():
    assets = tiny_face_assets()
    pooled = DECA(FaceModelConfig(), NET.model_copy(update={"head": "pooled"}), assets=assets)
    keypoints = DECA(FaceModelConfig(), NET, assets=assets)
    with pytest.raises(ValueError, match="head: checkpoint 'pooled' vs model 'keypoints'"):
        keypoints.load_state_dict(pooled.state_dict())
    # checkpoints written before the head existed describe a pooled model
    old = pooled.state_dict()
    old["_extra_state"] = {k: v for k, v in old["_extra_state"].items() if k != "head"}
    DECA(FaceModelConfig(), NET.model_copy(update={"head": "pooled"}),
         assets=assets).load_state_dict(old)
