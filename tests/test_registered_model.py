"""The registered model (the MLflow pyfunc of flows/reconstructor.py) loads through the same
loader as ``wildface reconstruct``, on the device it is asked for."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reconstruct_fixtures import tiny_config


@pytest.fixture(scope="module")
def logged(checkpoint, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from flows import registry, tracking

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_config(**{"tracking.uri": uri})
    exp_id = tracking.setup(uri, cfg.tracking.experiment)
    run_id = MlflowClient(uri, uri).create_run(exp_id, run_name="detail").info.run_id
    return registry.log_reconstructor(uri, cfg, run_id=run_id,
                                      detail_checkpoint=str(checkpoint),
                                      coarse_checkpoint=str(checkpoint))


def _crops(n=2, size=64):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_pyfunc_predicts_what_the_reconstruct_loader_does(logged, checkpoint):
    import mlflow

    from recon.inference.reconstruct import load_model

    default = mlflow.pyfunc.load_model(logged)  # device auto: the CPU here
    on_cpu = mlflow.pyfunc.load_model(logged, model_config={"device": "cpu"})
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert default.unwrap_python_model().model.device.type == expected_device
    assert on_cpu.unwrap_python_model().model.device.type == "cpu"

    crops = _crops()
    pred = on_cpu.predict(crops)
    direct = load_model(checkpoint, device="cpu")
    with torch.no_grad():
        rec = direct.model.reconstruct(torch.from_numpy(crops).permute(0, 3, 1, 2) / 255.0,
                                       with_detail=True, render=False)
    for name in ("shape", "exp", "pose", "cam", "detail"):
        np.testing.assert_allclose(pred[name], getattr(rec.codes, name).numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose(pred["vertices"], rec.vertices.numpy(), rtol=1e-5, atol=1e-6)
    assert pred["neutral_vertices"].shape == pred["vertices"].shape


def test_pyfunc_refuses_a_device_it_cannot_see(logged, monkeypatch):
    import mlflow

    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=r"CUDA device\(s\)"):
        mlflow.pyfunc.load_model(logged, model_config={"device": missing})
    # `mlflow models serve` passes the same setting through the environment.
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", f'{{"device": "{missing}"}}')
    with pytest.raises(ValueError, match=r"CUDA device\(s\)"):
        mlflow.pyfunc.load_model(logged)
