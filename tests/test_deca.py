"""The DECA model: reconstruct API, conventions, camera init, neutral mesh, checkpoints.

Runs on a tiny FLAME-format grid model (tests/tiny_face_model.py) so that it takes seconds."""
from __future__ import annotations

import io

import pytest
import torch

from recon.config import FaceModelConfig, NetworkConfig
from recon.deca import DECA, Codes
from tiny_face_model import tiny_face_assets

NET = NetworkConfig(backbone="mobilenet_v3_small", hidden=32, n_detail=8, image_size=32, uv_size=16)


@pytest.fixture(scope="module")
def assets():
    return tiny_face_assets()


@pytest.fixture(scope="module")
def model(assets):
    torch.manual_seed(0)
    return DECA(FaceModelConfig(), NET, assets=assets).eval()


def _codes(model: DECA, B: int = 2, seed: int = 0) -> Codes:
    g = torch.Generator().manual_seed(seed)
    L = model.layout
    light = torch.zeros(B, 9, 3)
    light[:, 0] = 3.0
    return Codes(shape=torch.randn(B, L.n_shape, generator=g), tex=torch.randn(B, L.n_tex, generator=g),
                 exp=torch.randn(B, L.n_exp, generator=g), pose=0.1 * torch.randn(B, 6, generator=g),
                 cam=torch.tensor([[7.0, 0.01, -0.02]] * B), light=light,
                 detail=torch.randn(B, 8, generator=g))


def test_reconstruct_fields_and_shapes(model):
    with torch.no_grad():
        rec = model.reconstruct(torch.rand(2, 3, 32, 32))
    V = model.flame.n_vertices
    assert rec.vertices.shape == (2, V, 3) and rec.vertices_ndc.shape == (2, V, 3)
    assert rec.landmarks2d.shape == (2, 68, 2) and rec.landmarks3d.shape == (2, 68, 3)
    assert rec.now7.shape == (2, 7, 3)
    for name in ("images", "images_detail", "shape_images", "shape_detail_images", "normal_images"):
        assert getattr(rec, name).shape == (2, 3, 32, 32), name
    assert rec.alpha.shape == rec.face_mask.shape == (2, 1, 32, 32)
    assert rec.uv_displacement.shape == (2, 1, 16, 16)
    assert rec.uv_detail_normals.shape == rec.uv_detail_vertices.shape == (2, 3, 16, 16)
    assert rec.codes.detail.shape == (2, 8) and rec.codes.light.shape == (2, 9, 3)
    assert rec.uv_displacement.abs().max() <= NET.max_z


def test_landmarks2d_follow_weak_perspective_in_image_convention(model):
    codes = _codes(model)
    with torch.no_grad():
        rec = model.decode(codes, with_detail=False, render=False)
        lmk3 = model.flame(codes.shape, codes.exp, codes.pose).landmarks2d
    s, tx, ty = codes.cam[:, 0, None], codes.cam[:, 1, None], codes.cam[:, 2, None]
    expected_x = s * (lmk3[..., 0] + tx)
    expected_y = -s * (lmk3[..., 1] + ty)  # image convention: y down
    assert torch.allclose(rec.landmarks2d[..., 0], expected_x, atol=1e-6)
    assert torch.allclose(rec.landmarks2d[..., 1], expected_y, atol=1e-6)


def test_initial_camera_centres_template_and_fills_crop(model):
    cam = model.coarse_encoder.head[-1].bias[model.layout.offset("cam"):][:3].detach()
    out = model.flame.template_output()
    lmk = model.project(out.landmarks2d, cam[None])[0, :, :2]
    lo, hi = lmk.min(0).values, lmk.max(0).values
    assert torch.allclose((lo + hi) / 2, torch.zeros(2), atol=1e-5)
    assert float((hi - lo).max()) == pytest.approx(2 * NET.init_face_fraction, rel=1e-5)


def test_render_is_lit(model):
    codes = _codes(model)
    with torch.no_grad():
        a = model.decode(codes, with_detail=False).images
        b = model.decode(codes.replace(light=codes.light * 2), with_detail=False).images
    assert a.abs().sum() > 0
    assert torch.allclose(b, 2 * a, atol=1e-5)


def test_neutral_zeroes_expression_and_pose(model):
    codes = _codes(model)
    with torch.no_grad():
        neutral = model.neutral(codes.shape)
        ref = model.flame(codes.shape, torch.zeros_like(codes.exp), torch.zeros_like(codes.pose))
        posed = model.decode(codes, with_detail=False, render=False)
    assert torch.equal(neutral.vertices, ref.vertices) and torch.equal(neutral.now7, ref.now7)
    assert not torch.allclose(posed.vertices, neutral.vertices)


def test_device_follows_the_module(model):
    import copy

    assert model.device == next(model.parameters()).device == torch.device("cpu")
    moved = copy.deepcopy(model).to("meta")  # buffers and parameters move together
    assert moved.device.type == "meta" == next(moved.parameters()).device.type


def test_image_to_uv_samples_the_projected_position(model):
    codes = _codes(model).replace(pose=torch.zeros(2, 6))
    with torch.no_grad():
        rec = model.decode(codes, with_detail=False, render=False)
        S = 32
        xs = (torch.arange(S) + 0.5) / S * 2 - 1  # pixel-centre x in the image convention
        ramp = xs.view(1, 1, 1, S).expand(2, 1, S, S)
        uv = model.image_to_uv(ramp, rec.vertices_ndc)
        expected = model.renderer.world2uv(rec.vertices_ndc)[:, :1]  # x is the same in both
    inside = (model.renderer.uv.covered > 0).expand_as(uv) & (expected.abs() < 1 - 1 / S)
    assert torch.allclose(uv[inside], expected[inside], atol=1e-5)


def test_zero_displacement_keeps_the_coarse_surface(model):
    codes = _codes(model)
    dec = model.detail_decoder
    saved = {k: v.clone() for k, v in dec.state_dict().items()}
    with torch.no_grad():
        last = dec.blocks[-1]
        last.weight.zero_()
        last.bias.zero_()
        rec = model.decode(codes, render=False)
        coarse_pos = model.renderer.world2uv(rec.vertices)
    dec.load_state_dict(saved)
    assert rec.uv_displacement.abs().max() == 0
    assert torch.equal(rec.uv_detail_vertices, coarse_pos)


def test_encode_rejects_wrong_size(model):
    with pytest.raises(ValueError, match="32, 32"):
        model.encode(torch.rand(1, 3, 64, 64))


def test_state_dict_holds_only_networks_and_round_trips(model, assets):
    sd = model.state_dict()
    assert {k.split(".")[0] for k in sd} == {"coarse_encoder", "detail_encoder", "detail_decoder",
                                              "_extra_state"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.manual_seed(123)
    other = DECA(FaceModelConfig(), NET, assets=assets).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model.encode(x).shape, other.encode(x).shape)
        assert torch.equal(model.encode(x).detail, other.encode(x).detail)


def test_checkpoint_of_another_face_model_is_refused(model, assets):
    sd = model.state_dict()
    assets.name = "another-model"
    try:
        other = DECA(FaceModelConfig(), NET, assets=assets)
    finally:
        assets.name = "tiny-test-grid"
    with pytest.raises(ValueError, match="face_model: checkpoint 'tiny-test-grid' vs model 'another-model'"):
        other.load_state_dict(sd)


def test_only_networks_are_trainable(model):
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"coarse_encoder", "detail_encoder", "detail_decoder"}
    assert len(model.coarse_parameters()) + len(model.detail_parameters()) == len(list(model.parameters()))
