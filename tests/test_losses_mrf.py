"""ID-MRF: equals a literal float64 reference of the formula, 0 for identical features,
finite (value and gradient) where DECA's release produced NaNs."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recon.losses.mrf import IDMRFLoss, mrf_features_loss


def _reference(gen: np.ndarray, tar: np.ndarray, h: float = 0.5, eps: float = 1e-5) -> float:
    """Per image: centre on the target mean, cosine distances, relative distances,
    exp((1 - r) / h) normalised over targets, -log(mean over targets of max over gen)."""
    out = []
    for g, t in zip(gen, tar):
        g = g.reshape(g.shape[0], -1)
        t = t.reshape(t.shape[0], -1)
        mu = t.mean(1, keepdims=True)
        g, t = g - mu, t - mu
        g = g / np.maximum(np.linalg.norm(g, axis=0, keepdims=True), eps)
        t = t / np.maximum(np.linalg.norm(t, axis=0, keepdims=True), eps)
        n_g, n_t = g.shape[1], t.shape[1]
        cx = np.zeros((n_g, n_t))
        for i in range(n_g):
            d = np.array([(1.0 - g[:, i] @ t[:, j]) / 2.0 for j in range(n_t)])
            r = d / (d.min() + eps)
            w = np.exp((1.0 - r) / h)
            cx[i] = w / w.sum()
        out.append(-np.log(cx.max(axis=0).mean()))
    return float(np.mean(out))


def test_matches_reference():
    g = torch.Generator().manual_seed(0)
    gen = torch.randn(2, 8, 3, 4, generator=g, dtype=torch.float64)
    tar = torch.randn(2, 8, 3, 4, generator=g, dtype=torch.float64)
    ours = mrf_features_loss(gen, tar).item()
    assert abs(ours - _reference(gen.numpy(), tar.numpy())) < 1e-5
    assert ours > 0.1


def test_identical_features_give_zero():
    tar = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    assert mrf_features_loss(tar.clone(), tar).item() < 1e-4


def test_degenerate_inputs_stay_finite():
    gen = torch.zeros(2, 8, 4, 4, requires_grad=True)  # zero and constant features
    tar = torch.ones(2, 8, 4, 4)
    loss = mrf_features_loss(gen, tar)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(gen.grad).all()


class _ToyFeatures(nn.Module):
    """Stands in for VGG19Features: two conv 'layers' named like VGG's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r3 = torch.relu(self.a(x))
        return {"relu3_2": r3, "relu4_2": torch.relu(self.b(r3))}


def test_idmrf_layer_weights_and_gradients_reach_only_the_generated_image():
    feats = _ToyFeatures()
    loss_fn = IDMRFLoss(feats)
    gen = torch.rand(2, 3, 16, 16, requires_grad=True)
    tar = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss = loss_fn(gen, tar)
    with torch.no_grad():
        f_g, f_t = feats(gen), feats(tar)
        expected = mrf_features_loss(f_g["relu3_2"], f_t["relu3_2"]) + 2 * mrf_features_loss(
            f_g["relu4_2"], f_t["relu4_2"])
    assert abs(loss.item() - expected.item()) < 1e-5
    loss.backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert tar.grad is None
    assert all(p.grad is None for p in feats.parameters())
