"""The GPU path against the CPU path: rasterizer (torch backend on CUDA, numba on the CPU),
DECA's coarse and detail steps in float32, the mixed-precision step, and reconstruct.

These need a CUDA device: they skip without one, and ``benchmarks/gpu_check.sh`` runs them on a
GPU machine; the same code's CPU behaviour is tested by the rest of the suite.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recon.config import FaceModelConfig, LossConfig, NetworkConfig, TrainConfig
from recon.deca import DECA
from recon.inference.reconstruct import load_model
from recon.render import rasterize
from recon.training.steps import CoarseStep, DetailStep
from reconstruct_fixtures import untrained_checkpoint
from render_reference import rotation_y, uv_sphere
from tiny_face_model import tiny_face_assets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU = torch.device("cuda")
NET = NetworkConfig(backbone="mobilenet_v3_small", hidden=32, n_detail=8, image_size=64,
                    uv_size=32)


def _batch(device: torch.device, B: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(B, 3, 64, 64, generator=g),
             "landmarks": (torch.rand(B, 68, 2, generator=g) - 0.5) * 0.6,
             "masks": torch.ones(B, 1, 64, 64),
             "identity": torch.arange(B) // 2}
    return {k: v.to(device) for k, v in batch.items()}


def _models() -> tuple[DECA, DECA]:
    torch.manual_seed(0)
    cpu = DECA(FaceModelConfig(), NET, assets=tiny_face_assets())
    return cpu, copy.deepcopy(cpu).to(GPU)


def _step(stage: str, model: DECA, amp: bool = False) -> CoarseStep | DetailStep:
    train = TrainConfig(pretrain_steps=0, amp=amp)
    loss = LossConfig(identity=0.0, mrf=0.0)
    return CoarseStep(model, loss, train) if stage == "coarse" else DetailStep(model, loss, train)


def test_rasterize_on_cuda_matches_cpu():
    v, f = uv_sphere(24, 48)
    verts = np.stack([0.8 * v, 0.9 * v @ rotation_y(0.8).T + [0.1, -0.1, 0]]).astype(np.float32)
    out = []
    for device in (torch.device("cpu"), GPU):
        vd = torch.as_tensor(verts, device=device).requires_grad_()
        frags = rasterize(vd, torch.as_tensor(f, device=device), 96)
        frags.zbuf[frags.pix_to_face >= 0].sum().backward()
        out.append((frags.pix_to_face.cpu(), frags.bary.detach().cpu(), vd.grad.cpu()))
    (p2f, bary, grad), (p2f_gpu, bary_gpu, grad_gpu) = out
    differ = p2f_gpu != p2f
    assert differ.float().mean() < 0.003  # float ties on shared edges only
    same = ~differ & (p2f >= 0)
    torch.testing.assert_close(bary_gpu[same], bary[same], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_gpu, grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("stage", ["coarse", "detail"])
def test_float32_step_on_cuda_matches_cpu(stage):
    cpu, gpu = _models()
    results = []
    for model, device in ((cpu, torch.device("cpu")), (gpu, GPU)):
        step = _step(stage, model)
        loss, terms = step(_batch(device))
        loss.backward()
        grads = torch.cat([p.grad.flatten().cpu() for p in step.parameters() if p.grad is not None])
        results.append((terms, grads))
    (terms, grads), (terms_gpu, grads_gpu) = results
    assert terms_gpu.keys() == terms.keys()
    for name in terms:  # TF32 convolutions and a few edge pixels apart
        assert terms_gpu[name] == pytest.approx(terms[name], rel=5e-3, abs=1e-6), name
    assert torch.nn.functional.cosine_similarity(grads_gpu, grads, dim=0) > 0.99


@pytest.mark.parametrize("stage", ["coarse", "detail"])
def test_mixed_precision_steps_on_cuda(stage):
    _, gpu = _models()
    step = _step(stage, gpu, amp=True)
    batch = _batch(GPU)
    with torch.no_grad():
        reference = float(_step(stage, copy.deepcopy(gpu))(batch)[0])
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    before = [p.detach().clone() for p in step.parameters()]
    losses, stepped = [], []
    for _ in range(5):
        loss, _ = step(batch)
        losses.append(float(loss.detach()))
        # GradScaler starts at 2^16 and skips steps whose float16 gradients overflow
        stepped.append(step.optim_step(loss, opt, scaler))
    assert all(np.isfinite(losses)) and any(stepped)
    assert step.skipped == stepped.count(False)
    assert losses[0] == pytest.approx(reference, rel=0.05)  # float16 encoders, float32 rest
    assert any(not torch.equal(a, p) for a, p in zip(before, step.parameters()))


def test_reconstruct_on_cuda_matches_cpu(tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "detail.pt")
    crops = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    cpu = load_model(ckpt).reconstruct(crops)
    gpu = load_model(ckpt, device=GPU).reconstruct(crops)
    assert gpu.vertices.device.type == GPU.type
    for name in ("vertices", "landmarks2d", "uv_detail_normals"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name),
                                   rtol=1e-3, atol=1e-4, msg=name)
    assert (gpu.images.cpu() - cpu.images).abs().mean() < 1e-3
