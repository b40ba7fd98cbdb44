"""MLflow tracking helpers: params, where runs go, per-step logging, the DECA figure."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flows import tracking
from flows.config import load_config
from infra.config import ServicesConfig, TrackingConfig


def test_flatten_nested_config_to_params():
    cfg = load_config(None, ["train.lr=0.5", "ray.resources_per_worker={accel: 1}"])
    params = tracking.flatten(cfg.model_dump(mode="json"))
    assert params["train.lr"] == "0.5"
    assert params["ray.resources_per_worker.accel"] == "1.0"
    assert params["synth.backgrounds"] == '["noise", "gradient", "texture", "photo"]'
    assert params["face_model.landmarks"] == "None"
    # every leaf of the config is a param
    assert len(params) > 100


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    closed = ServicesConfig(mlflow_port=9)  # nothing answers on the discard port
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", None)  # nothing set in this process
    assert tracking.resolve_tracking_uri(TrackingConfig(), tmp_path, closed) == \
        f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # without an output folder (a model to read) there is nowhere to fall back to
    with pytest.raises(ValueError, match="--tracking-uri"):
        tracking.resolve_tracking_uri(services=closed)
    # a URI this process set serves a model to read, never a new output folder's runs
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", "http://127.0.0.1:2")
    assert tracking.resolve_tracking_uri(services=closed) == "http://127.0.0.1:2"
    assert tracking.resolve_tracking_uri(TrackingConfig(), tmp_path, closed).startswith("sqlite")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_tracking_uri(TrackingConfig(), tmp_path, closed) == "http://127.0.0.1:1"
    assert tracking.resolve_tracking_uri(services=closed) == "http://127.0.0.1:1"
    assert tracking.resolve_tracking_uri(TrackingConfig(uri="file:///x"), tmp_path, closed) == \
        "file:///x"
    # a --tracking-uri comes before tracking.uri
    assert tracking.resolve_tracking_uri(TrackingConfig(uri="file:///x"), tmp_path, closed,
                                         given="http://127.0.0.1:3") == "http://127.0.0.1:3"
    # a relative sqlite database is the caller's, not the folder a Ray worker runs in
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(TrackingConfig(uri="sqlite:///runs/m.db"), "out",
                                         closed) == f"sqlite:///{tmp_path.resolve()}/runs/m.db"
    assert tracking.resolve_tracking_uri(given="sqlite:///m.db") == \
        f"sqlite:///{tmp_path.resolve()}/m.db"
    assert tracking.resolve_tracking_uri(TrackingConfig(uri="sqlite:////abs/m.db"), "out",
                                         closed) == "sqlite:////abs/m.db"
    # run_stage applies the same to a tracking URI given to it directly
    assert tracking.absolute_uri("sqlite:///m.db") == f"sqlite:///{tmp_path.resolve()}/m.db"
    assert tracking.absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert "mlflow ui --backend-store-uri sqlite:///" in tracking.ui_hint("sqlite:////a/b.db")


def test_the_services_mlflow_is_used_when_it_answers(tmp_path, monkeypatch):
    """A server on 127.0.0.1 answering MLflow's ``/health`` stands in for the services'."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        svc = ServicesConfig(host="127.0.0.1", mlflow_port=server.server_port)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        expected = f"http://127.0.0.1:{server.server_port}"
        assert tracking.resolve_tracking_uri(TrackingConfig(), tmp_path, svc) == expected
        # before it: tracking.uri
        assert tracking.resolve_tracking_uri(TrackingConfig(uri="file:///x"), tmp_path,
                                             svc) == "file:///x"
    finally:
        server.shutdown()
        server.server_close()


class _Client:
    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.batches.append((run_id, list(metrics)))


def test_step_logger_means_every_n_steps():
    logger = tracking.StepLogger("unused", "run", TrackingConfig(log_every=2),
                                 batch_size=4, world_size=2, client=_Client())
    logger.on_step(1, {"landmarks": 1.0, "loss": 2.0, "step_time_s": 0.5, "images_per_s": 8.0,
                       "skipped": 0.0, "lr": 1e-3})
    assert logger.client.batches == []
    logger.on_step(2, {"landmarks": 3.0, "loss": 4.0, "step_time_s": 1.5, "images_per_s": 2.7,
                       "skipped": 1.0, "lr": 3e-3})
    (run_id, metrics), = logger.client.batches
    got = {m.key: (m.value, m.step) for m in metrics}
    assert run_id == "run"
    assert got["loss/landmarks"] == (2.0, 2) and got["loss/loss"] == (3.0, 2)
    assert got["time/step_s"] == (1.0, 2)
    assert got["time/samples_per_s"] == (8.0, 2)  # 4 images x 2 ranks per 1 s step
    assert got["train/skipped"] == (1.0, 2)
    assert got["train/lr"] == (2e-3, 2)
    assert "loss/images_per_s" not in got and "loss/lr" not in got
    logger.flush(2)  # nothing new: no empty batch
    assert len(logger.client.batches) == 1


@pytest.mark.slow
def test_deca_figure_layout():
    from recon.deca import DECA
    from recon.inference.reconstruct import to_uint8

    cfg = load_config(None, ["model.backbone=mobilenet_v3_small", "model.hidden=16",
                             "model.image_size=32", "model.uv_size=16", "model.n_detail=4",
                             "face_model.n_shape=5", "face_model.n_exp=5", "face_model.n_tex=5"])
    torch.manual_seed(0)
    model = DECA(cfg.face_model, cfg.model)
    images = torch.rand(3, 3, 32, 32)
    lmk = torch.zeros(3, 68, 2)
    grid = tracking.deca_figure(model, images, lmk)
    assert grid.shape == (6 * 32, 3 * 32, 3) and grid.dtype == np.uint8
    # row 0 is the input itself; row 1 the input with target landmarks (green) drawn
    np.testing.assert_array_equal(grid[:32, 32:64], to_uint8(images)[1])
    assert (grid[32:64, :32] == [0, 255, 0]).all(-1).any() or \
        (grid[32:64, :32] == [255, 0, 0]).all(-1).any()
    assert model.training  # restored after the figure
