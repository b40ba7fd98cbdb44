"""Training steps: gradients reach only the stage's networks, pretraining phase, non-finite
steps skipped and counted (batch-norm statistics kept), divergence stopped with an error,
determinism and resumable step state.

Runs on a tiny FLAME-format grid model (tests/tiny_face_model.py); the learning test (marked
slow: it trains) uses the demo head."""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from recon.config import FaceModelConfig, LossConfig, NetworkConfig, TrainConfig
from recon.deca import DECA
from recon.losses.mrf import IDMRFLoss
from recon.training.steps import CoarseStep, DetailStep, NonFiniteTraining
from tiny_face_model import tiny_face_assets

NET = NetworkConfig(backbone="mobilenet_v3_small", hidden=32, n_detail=8, image_size=32, uv_size=16)


class _TinyFeatures(torch.nn.Module):
    """A stand-in for VGG19Features (two conv layers named like VGG's ReLUs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        r3 = torch.relu(self.a(x))
        return {"relu3_2": r3, "relu4_2": torch.relu(self.b(r3))}


class _TinyIdentity(torch.nn.Module):
    """A stand-in identity network: frozen random projection to unit vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 16)
        self.requires_grad_(False)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return torch.nn.functional.normalize(self.proj(x), dim=1)


@pytest.fixture(scope="module")
def assets():
    return tiny_face_assets()


def _model(assets, seed: int = 0) -> DECA:
    torch.manual_seed(seed)
    model = DECA(FaceModelConfig(), NET, assets=assets)
    # Light from the front-left-top as well as the initial grey ambient term, so that
    # shading (and with it the detail losses) depends on the normals.
    light = model.layout.offset("light")
    with torch.no_grad():
        model.coarse_encoder.head[-1].bias[light + 3:light + 12] = torch.tensor(
            [0.5] * 3 + [0.5] * 3 + [1.0] * 3)
    return model


def _batch(B: int = 4, seed: int = 0, k: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(B, 3, 32, 32, generator=g),
            "landmarks": torch.rand(B, 68, 2, generator=g) - 0.5,
            "masks": torch.ones(B, 1, 32, 32),
            "identity": torch.arange(B) // k}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_coarse_step_touches_only_the_coarse_encoder(assets):
    model = _model(assets)
    step = CoarseStep(model, LossConfig(), TrainConfig(pretrain_steps=0), identity_net=_TinyIdentity())
    detail_before = _snapshot(model.detail_encoder) | {f"d.{k}": v for k, v in _snapshot(model.detail_decoder).items()}
    coarse_before = _snapshot(model.coarse_encoder)
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    loss, terms = step(_batch())
    assert step.optim_step(loss, opt)
    assert all(p.grad is None for p in model.detail_parameters())
    assert all(p.grad is not None for p in model.coarse_parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.coarse_parameters()) > 0
    detail_after = _snapshot(model.detail_encoder) | {f"d.{k}": v for k, v in _snapshot(model.detail_decoder).items()}
    assert _same(detail_before, detail_after)  # weights and batch-norm statistics
    assert not _same(coarse_before, _snapshot(model.coarse_encoder))
    assert {"landmarks", "eye_closure", "lip_closure", "photometric", "identity", "reg_shape",
            "reg_exp", "reg_tex", "reg_light", "shape_consistency/landmarks",
            "shape_consistency/photometric", "shape_consistency/identity", "loss"} <= set(terms)
    assert terms["loss"] == pytest.approx(sum(v for k, v in terms.items() if k != "loss"), rel=1e-5)


def test_detail_step_touches_only_the_detail_networks(assets):
    model = _model(assets)
    step = DetailStep(model, LossConfig(), TrainConfig(), mrf=IDMRFLoss(_TinyFeatures()))
    coarse_before = _snapshot(model.coarse_encoder)
    detail_before = _snapshot(model.detail_decoder)
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    loss, terms = step(_batch())
    assert step.optim_step(loss, opt)
    assert all(p.grad is None for p in model.coarse_parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.detail_parameters()) > 0
    assert _same(coarse_before, _snapshot(model.coarse_encoder))
    assert not _same(detail_before, _snapshot(model.detail_decoder))
    assert {"photometric_detail", "mrf", "displacement", "symmetry", "shading_smoothness",
            "detail_consistency/photometric_detail", "detail_consistency/mrf"} <= set(terms)


def test_pretraining_phase_uses_landmarks_and_regularisers_only(assets):
    step = CoarseStep(_model(assets), LossConfig(), TrainConfig(pretrain_steps=2))
    names = []
    for _ in range(3):
        with torch.no_grad():
            names.append(set(step(_batch())[1]))
    expected = {"landmarks", "eye_closure", "lip_closure", "reg_shape", "reg_exp", "reg_tex",
                "reg_light", "loss"}
    assert names[0] == names[1] == expected
    assert "photometric" in names[2] and "shape_consistency/landmarks" in names[2]


def test_non_finite_loss_is_skipped_and_counted(assets):
    model = _model(assets)
    step = CoarseStep(model, LossConfig(), TrainConfig(pretrain_steps=0))
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in step.parameters()]
    batch = _batch()
    batch["landmarks"][0, 0, 0] = float("nan")
    loss, terms = step(batch)
    assert not torch.isfinite(loss)
    synced = []
    assert step.optim_step(loss, opt, sync_grads=lambda ps: synced.append(
        all(torch.isnan(p.grad).all() for p in ps))) is False
    assert synced == [True]  # other workers would see NaN gradients and skip too
    assert step.skipped == 1
    assert all(torch.equal(p, b) for p, b in zip(step.parameters(), before))
    assert all(p.grad is None for p in step.parameters())


def test_consecutive_skipped_steps_stop_training(assets):
    step = CoarseStep(_model(assets), LossConfig(), TrainConfig(pretrain_steps=0,
                                                                max_skipped_steps=2))
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    nan_batch = _batch()
    nan_batch["landmarks"][0, 0, 0] = float("nan")
    assert step.optim_step(step(nan_batch)[0], opt) is False
    assert step.optim_step(step(_batch())[0], opt)  # a step taken: the count starts again
    assert step.optim_step(step(nan_batch)[0], opt) is False
    assert step.state_dict()["consecutive_skipped"] == 1
    with pytest.raises(NonFiniteTraining, match=r"at step 4: 2 consecutive steps skipped "
                                                r"\(train\.max_skipped_steps=2\).*the loss"):
        step.optim_step(step(nan_batch)[0], opt)
    assert step.skipped == 3


def test_non_finite_gradient_is_named_when_it_stops_training(assets):
    step = CoarseStep(_model(assets), LossConfig(), TrainConfig(pretrain_steps=0,
                                                                max_skipped_steps=1))
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    loss, _ = step(_batch())
    name, weight = next((n, p) for n, p in step.model.named_parameters()
                        if n.startswith("coarse_encoder") and n.endswith("bias"))
    weight.register_hook(lambda g: g * float("inf"))  # one gradient overflows
    with pytest.raises(NonFiniteTraining, match=rf"the gradient of {name}$"):
        step.optim_step(loss, opt)


def test_non_finite_weights_after_a_step_stop_training(assets):
    step = CoarseStep(_model(assets), LossConfig(), TrainConfig(pretrain_steps=0))
    first = next(n for n, p in step.model.named_parameters() if p is step.parameters()[0])
    opt = torch.optim.SGD(step.parameters(), lr=math.inf)  # every moved weight -> inf/nan
    with pytest.raises(NonFiniteTraining, match=rf"at step 1: parameter {first} is not finite"):
        step.optim_step(step(_batch())[0], opt)


def test_large_finite_weights_whose_norm_overflows_do_not_stop_training(assets):
    # float32 squares of 1e20 overflow: the norm of all the weights is inf, no entry is.
    step = CoarseStep(_model(assets), LossConfig(), TrainConfig(pretrain_steps=0))
    opt = torch.optim.SGD(step.parameters(), lr=1e-3)
    opt.register_step_post_hook(lambda *_: step.parameters()[0].detach().fill_(1e20))
    assert step.optim_step(step(_batch())[0], opt)
    assert not torch.isfinite(torch.nn.utils.get_total_norm(step.parameters()))


def test_skipped_step_keeps_the_batch_norm_statistics(assets):
    model = _model(assets)
    step = CoarseStep(model, LossConfig(), TrainConfig(pretrain_steps=0))
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    before = _snapshot(model.coarse_encoder)
    batch = _batch()
    batch["images"][0, :, 4, 4] = float("nan")  # reaches every running mean and variance
    loss, _ = step(batch)
    running = [b for n, b in model.coarse_encoder.named_buffers() if n.endswith("running_mean")]
    assert running and not all(torch.isfinite(b).all() for b in running)  # the forward's mark
    assert step.optim_step(loss, opt) is False
    assert _same(before, _snapshot(model.coarse_encoder))


def test_gradient_clipping_bounds_the_update_norm(assets):
    model = _model(assets)
    step = CoarseStep(model, LossConfig(), TrainConfig(pretrain_steps=0, grad_clip=1e-3))
    opt = torch.optim.SGD(step.parameters(), lr=1.0)
    before = [p.detach().clone() for p in step.parameters()]
    loss, _ = step(_batch())
    assert step.optim_step(loss, opt)
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(step.parameters(), before)])
    assert float(delta.norm()) == pytest.approx(1e-3, rel=1e-3)


def test_steps_are_deterministic_and_resume_their_state(assets):
    def run(start: int, n: int, state: dict | None = None):
        step = DetailStep(_model(assets), LossConfig(mrf=0.0), TrainConfig(seed=7))
        if state is not None:
            step.load_state_dict(state)
        # one identity of 4 images: the partner cycle is a random draw
        losses = [step(_batch(seed=i, k=4))[1]["loss"] for i in range(start, start + n)]
        return losses, copy.deepcopy(step.state_dict())

    a, _ = run(0, 2)
    _, state = run(0, 1)
    assert state["iteration"] == 1
    resumed, _ = run(1, 1, state)  # no optimiser steps: same weights, same partner draw
    assert resumed[0] == a[1]
    not_resumed, _ = run(1, 1)  # first draw instead of the second: another partner cycle
    assert not_resumed[0] != a[1]
    other_seed = DetailStep(_model(assets), LossConfig(mrf=0.0), TrainConfig(seed=8))
    assert not torch.equal(other_seed.generator.get_state(), state["generator"])


# -- learning on the demo head ------------------------------------------------------------

DEMO_NET = NetworkConfig(backbone="mobilenet_v3_small", hidden=64, n_detail=16, image_size=64,
                         uv_size=32)


@pytest.fixture(scope="module")
def demo_model():
    torch.manual_seed(0)
    model = DECA(FaceModelConfig(n_shape=10, n_exp=10, n_tex=5), DEMO_NET)
    light = model.layout.offset("light")
    with torch.no_grad():  # a directional light on top of the grey init (see _model)
        model.coarse_encoder.head[-1].bias[light + 3:light + 12] = torch.tensor(
            [0.4] * 3 + [0.4] * 3 + [0.8] * 3)
    return model


def _teacher_codes(model: DECA, B: int, g: torch.Generator):
    """Codes of B images (B/2 identities x 2): the initial prediction perturbed."""
    from recon.deca import Codes

    L = model.layout
    bias = model.coarse_encoder.head[-1].bias.detach()
    base = dict(zip(L.sizes(), bias.split(list(L.sizes().values()))))
    shape = torch.randn(B // 2, L.n_shape, generator=g).repeat_interleave(2, 0)
    pose = torch.cat([0.2 * torch.randn(B, 3, generator=g), 0.1 * torch.rand(B, 1, generator=g),
                      torch.zeros(B, 2)], 1)
    cam = base["cam"] + torch.cat([0.1 * torch.randn(B, 1, generator=g),
                                   0.02 * torch.randn(B, 2, generator=g)], 1)
    return Codes(shape=shape, tex=torch.randn(B, L.n_tex, generator=g),
                 exp=torch.randn(B, L.n_exp, generator=g), pose=pose, cam=cam,
                 light=base["light"].view(1, 9, 3).expand(B, -1, -1).clone())


@contextlib.contextmanager
def _restored(*modules: torch.nn.Module):
    """Puts the modules' weights back on exit: the demo model is shared by the tests."""
    saved = [copy.deepcopy(m.state_dict()) for m in modules]
    try:
        yield
    finally:
        for module, state in zip(modules, saved):
            module.load_state_dict(state)


def _train(step, batch: dict[str, torch.Tensor], n: int) -> list[dict[str, float]]:
    """n Adam steps (lr 1e-3) of a stage on one batch: the logged terms of each."""
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    logged = []
    for _ in range(n):
        loss, terms = step(batch)
        assert step.optim_step(loss, opt)
        logged.append(terms)
    return logged


@pytest.mark.slow
def test_coarse_stage_learns_on_a_tiny_demo_head_batch(demo_model):
    """25 steps on 4 rendered images (ground truth codes known) halve the coarse loss."""
    model = demo_model
    g = torch.Generator().manual_seed(1)
    codes = _teacher_codes(model, 4, g)
    with torch.no_grad():
        rec = model.decode(codes, with_detail=False)
    background = 0.3 * torch.rand(4, 3, 64, 64, generator=g)
    batch = {"images": rec.images + background * (1 - rec.alpha), "landmarks": rec.landmarks2d,
             "masks": rec.face_mask, "identity": torch.arange(4) // 2}
    with _restored(model.coarse_encoder):
        losses = _train(CoarseStep(model, LossConfig(), TrainConfig(pretrain_steps=0)), batch, 25)
    first, last = losses[0], losses[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["landmarks"] < 0.5 * first["landmarks"]
    assert last["photometric"] < first["photometric"]


@pytest.mark.slow
def test_detail_stage_recovers_a_known_displacement_map(demo_model):
    """Photos rendered with known wrinkles (horizontal ridges in UV): 30 detail steps make
    the predicted displacement map reproduce them (correlation ~0 -> > 0.9 over the face
    texels) and cut the detail photometric loss to less than half."""
    model = demo_model
    B, S = 4, model.uv_size
    g = torch.Generator().manual_seed(1)
    background = 0.3 * torch.rand(B, 3, 64, 64, generator=g)
    ridges = torch.sin(2 * math.pi * 5 * torch.linspace(0, 1, S))[:, None].expand(S, S)
    wrinkles = (0.5 * model.detail_decoder.max_z * ridges).expand(B, 1, S, S)
    with torch.no_grad():
        # Rendered with the frozen coarse encoder's own prediction, which it makes again
        # (nearly) on the photos, so the UV texture the stage unwraps lines up.
        codes = model.encode(background, with_detail=False)
        rec = model.decode(codes, with_detail=False)
        normals = model.renderer.displacement_to_normals(wrinkles, rec.vertices, model.uv_face_mask)
        out = model.renderer.render(rec.vertices, rec.vertices_ndc, rec.albedo, codes.light,
                                    detail_normals_uv=normals)
    images = out.images + background * (1 - out.alpha)
    batch = {"images": images, "landmarks": rec.landmarks2d, "masks": rec.face_mask,
             "identity": torch.arange(B) // 2}
    face = (model.uv_face_mask * model.renderer.uv.interior).bool().expand(B, 1, S, S)

    def correlation() -> float:
        with torch.no_grad():
            z = model.decode(model.encode(images), render=False).uv_displacement
        return float(torch.corrcoef(torch.stack([z[face], wrinkles[face]]))[0, 1])

    with _restored(model.detail_encoder, model.detail_decoder):
        before = correlation()
        losses = _train(DetailStep(model, LossConfig(mrf=0.0), TrainConfig()), batch, 30)
        after = correlation()
    assert abs(before) < 0.3
    assert after > 0.9
    assert losses[-1]["photometric_detail"] < 0.5 * losses[0]["photometric_detail"]
