"""Fixtures shared by the end-to-end tests on Ray, Prefect and MLflow (test_pipeline.py,
test_train_ray.py): one tiny run's config, synthetic data and MLflow store, Ray shut down
after the module, a temporary Prefect server, and a moto S3 server (also test_storage.py)."""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from flows.config import WildfaceConfig

# A tiny DECA run: seconds per step on 2 cores. A test module adds or changes sections with a
# module-level ``E2E_CONFIG`` (merged per section: its keys replace these).
E2E_BASE: dict[str, dict] = {
    "face_model": {"n_shape": 20, "n_exp": 10, "n_tex": 10},
    "model": {"backbone": "mobilenet_v3_small", "hidden": 32, "image_size": 64, "uv_size": 32,
              "n_detail": 8},
    "loss": {"identity": 0.0, "mrf": 0.0},
    "train": {"identities_per_batch": 2, "images_per_identity": 2,
              "detail_identities_per_batch": 2, "detail_images_per_identity": 2,
              "checkpoint_every": 2, "amp": False, "lr": 1.0e-3},
    "tracking": {"log_every": 1, "figure_every": 2, "figure_images": 2},
}


@dataclass(frozen=True)
class E2ERun:
    """``root``: the module's folder; ``config``: the YAML file (``root/tiny.yaml``) the flows
    are given; ``cfg``: it loaded; ``data``: its synthetic set (``root/synth``);
    ``tracking_uri``: an sqlite MLflow store under ``root``."""

    root: Path
    config: Path
    cfg: WildfaceConfig
    data: Path
    tracking_uri: str


@pytest.fixture(scope="module")
def e2e(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[E2ERun]:
    """The test module's tiny run (``E2E_BASE`` + its ``E2E_CONFIG``), its synthetic data
    generated; Ray, which the flows start in this process, is shut down afterwards."""
    import ray
    import torch

    from flows.config import load_config
    from recon.synth import generate

    root = tmp_path_factory.mktemp("e2e")
    tree = {k: dict(v) for k, v in E2E_BASE.items()}
    for section, values in getattr(request.module, "E2E_CONFIG", {}).items():
        tree.setdefault(section, {}).update(values)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tree))
    cfg = load_config(config)
    torch.set_num_threads(2)
    generate(root / "synth", cfg.synth, cfg.face_model)
    yield E2ERun(root=root, config=config, cfg=cfg, data=root / "synth",
                 tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    ray.shutdown()


@pytest.fixture
def prefect_server() -> Iterator[None]:
    """A temporary Prefect server and database for the flows run in the test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; test credentials and its endpoint (``AWS_ENDPOINT_URL``)
    in the environment while the module runs. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
