"""The held-out neutral-shape error (recon.evaluation.heldout) against a direct computation:
neutral meshes from the face model's arrays (template + identity blend shapes, no pose),
aligned with scipy's orthogonal Procrustes plus the least-squares scale, on the tiny grid
model (tests/tiny_face_model.py) so that it takes well under a second."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from recon.config import FaceModelConfig, NetworkConfig
from recon.deca import DECA, Codes
from recon.evaluation.heldout import heldout_shape_errors
from tiny_face_model import tiny_face_assets

NET = NetworkConfig(backbone="mobilenet_v3_small", hidden=16, n_detail=8, image_size=32,
                    uv_size=16)
REGION = np.arange(40, 120)  # a part of the grid: the compared vertices only


def _neutral(assets, code: np.ndarray) -> np.ndarray:
    """(V, 3) neutral mesh of an identity code: FLAME's v_template + shapedirs . code."""
    return assets.v_template + assets.shapedirs[:, :, :len(code)] @ code


def _aligned_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean vertex distance after the best similarity of pred onto truth."""
    a, b = pred - pred.mean(0), truth - truth.mean(0)
    rot, sv_sum = orthogonal_procrustes(a, b)  # a @ rot ~ b; sv_sum: trace of the fit
    scale = sv_sum / (a ** 2).sum()
    return float(np.linalg.norm(scale * a @ rot - b, axis=1).mean())


@pytest.fixture(scope="module")
def setup():
    assets = tiny_face_assets()
    torch.manual_seed(0)
    model = DECA(FaceModelConfig(), NET, assets=assets).eval()
    rng = np.random.default_rng(3)
    # "c" has fewer components than the model (the rest are the mean's); "a", "b" more (cut)
    identities = {"a": rng.standard_normal(10), "b": rng.standard_normal(10),
                  "c": rng.standard_normal(5)}
    keys = ["a/0", "b/0", "c/0", "a/1"]
    params = {"identities": {k: {"shape": v.tolist()} for k, v in identities.items()},
              "images": {k: {"identity": k[0]} for k in keys}}
    return model, assets, identities, keys, params


def _codes(model: DECA, shape: np.ndarray) -> Codes:
    n = len(shape)
    return Codes(shape=torch.tensor(shape, dtype=torch.float32),
                 tex=torch.zeros(n, model.albedo.n_tex), exp=torch.zeros(n, model.flame.n_exp),
                 pose=torch.zeros(n, 6), cam=torch.tensor([[7.0, 0.0, 0.0]] * n),
                 light=torch.zeros(n, 9, 3))


def test_errors_of_known_predictions_match_a_direct_computation(setup, tmp_path):
    model, assets, identities, keys, params = setup
    n_shape = model.flame.n_shape
    assert n_shape == 8
    rng = np.random.default_rng(4)
    # predicted codes: "a/0" exactly its identity's, the others a random guess
    predicted = rng.standard_normal((4, n_shape))
    predicted[0] = identities["a"][:n_shape]
    batches = [(keys[:2], {"images": torch.zeros(2, 3, 32, 32)}),
               (keys[2:], {"images": torch.zeros(2, 3, 32, 32)})]
    given = iter([predicted[:2], predicted[2:]])
    seen = []
    result = heldout_shape_errors(
        model, batches, params, REGION, encode=lambda images: _codes(model, next(given)),
        on_batch=lambda k, batch, codes: seen.append((k, batch["images"].shape[0])),
        mesh_dir=tmp_path, n_meshes=3)

    truth = [_neutral(assets, identities[k[0]][:n_shape]) for k in keys]
    expected = [_aligned_error(_neutral(assets, p)[REGION], t[REGION])
                for p, t in zip(predicted, truth)]
    mean_face = [_aligned_error(assets.v_template[REGION], t[REGION]) for t in truth]
    assert result.keys == keys and seen == [(keys[:2], 2), (keys[2:], 2)]
    assert result.errors[0] < 1e-6  # the right identity: nothing left after the alignment
    np.testing.assert_allclose(result.errors[1:], expected[1:], rtol=1e-4)
    np.testing.assert_allclose(result.mean_shape_errors, mean_face, rtol=1e-4)
    assert min(mean_face) > 1e-3  # the identities differ from the mean face
    metrics = result.metrics()
    assert metrics["heldout_images"] == 4.0
    assert metrics["heldout_shape_error_median_mm"] == pytest.approx(
        1000 * np.median(expected), rel=1e-4, abs=1e-6)
    assert metrics["heldout_shape_error_mean_mm"] == pytest.approx(
        1000 * np.mean(expected), rel=1e-4, abs=1e-6)
    assert metrics["heldout_mean_shape_error_mm"] == pytest.approx(
        1000 * np.mean(mean_face), rel=1e-4)

    # the first three predictions, across both batches, as OBJ "v x y z" lines
    assert sorted(p.name for p in tmp_path.glob("*_neutral.obj")) == \
        ["a_0_neutral.obj", "b_0_neutral.obj", "c_0_neutral.obj"]
    assert len(list(tmp_path.glob("*_posed.obj"))) == 3
    lines = (tmp_path / "c_0_neutral.obj").read_text().splitlines()
    verts = np.array([[float(x) for x in ln.split()[1:4]] for ln in lines if ln.startswith("v ")])
    np.testing.assert_allclose(verts, _neutral(assets, predicted[2]), atol=1e-5)


def test_the_mean_face_scores_as_the_baseline(setup):
    """A model that predicts the mean face (all shape codes 0) gets the mean shape's error."""
    model, _, _, keys, params = setup
    batches = [(keys, {"images": torch.zeros(4, 3, 32, 32)})]
    result = heldout_shape_errors(model, batches, params, REGION,
                                  encode=lambda images: _codes(model, np.zeros((4, 8))))
    np.testing.assert_allclose(result.errors, result.mean_shape_errors, rtol=1e-6)
    metrics = result.metrics()
    assert metrics["heldout_shape_error_mean_mm"] == pytest.approx(
        metrics["heldout_mean_shape_error_mm"], rel=1e-6)
