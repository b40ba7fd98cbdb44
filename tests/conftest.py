"""Fixtures shared by the test modules (never imported by name: pytest hands them to the tests
that name them). The tiny run they start from is ``reconstruct_fixtures.TINY``.

- session: torch's CPU threads, set once from the cores this process may use;
- ``synth``, ``checkpoint`` (session): a tiny synthetic set and an untrained detail checkpoint,
  made once and read-only to the tests (a test that writes copies them into ``tmp_path``);
- ``e2e`` (module): a tiny run's config file with the module's ``E2E_CONFIG`` sections merged
  in, its synthetic data and an sqlite MLflow store; Ray Train's controller polling its
  workers every 0.5 s; Ray shut down after the module;
- ``prefect_server``: a temporary Prefect server; ``moto_s3`` (module): a moto S3 server.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from free_ports import free_port
from reconstruct_fixtures import RAY_TRAIN_TEST_ENV, e2e_tree, make_synth, untrained_checkpoint

if TYPE_CHECKING:
    from flows.config import WildfaceConfig


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with slow (end-to-end) tests first, each module's tests kept together and in
    order: ``make test`` hands whole modules to two pytest-xdist workers in this order
    (``--dist loadscope --no-loadscope-reorder``), so the long modules start at once and the
    many short ones fill the time around them."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadscope`` with the modules that run flows on the Prefect test server (those
    naming ``prefect_server``) as one work unit: one worker starts that server (~23 CPU s)
    for all of them, instead of each worker one."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    flows = {p.name for p in Path(__file__).parent.glob("test_*.py")
             if "prefect_server" in p.read_text()}

    class OnePrefectServer(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in flows:
                return "modules using prefect_server"
            return super()._split_scope(nodeid)

    return OnePrefectServer(config, log)


@pytest.fixture(scope="session", autouse=True)
def cpu_threads() -> None:
    """One intra-op thread count for the whole session, whatever the test order: the cores
    this process may run on, shared among pytest-xdist's workers (a test that needs another
    count sets and restores it itself). It is also this worker's ``OMP_NUM_THREADS``, which
    the flows run in-process, the commands and the Ray workers the tests start all take as
    their default: no process of one worker takes the other worker's core too."""
    from recon.devices import set_cpu_threads

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    set_cpu_threads(threads)


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``wildface synth`` folder: 2 identities of 2 images of 96 pixels."""
    return make_synth(tmp_path_factory.mktemp("synth"), identities=2, images=2, size=96)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detail-stage checkpoint of a freshly initialised ``TINY`` model."""
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "detail-000000000.pt")


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
    """The test module's tiny run (``e2e_tree`` of its ``E2E_CONFIG``), its synthetic data
    generated, Ray Train's controller settings ``RAY_TRAIN_TEST_ENV`` in the environment while
    the module runs; Ray, which the flows start in this process, is shut down afterwards."""
    import ray

    from flows.config import load_config
    from recon.synth import generate

    root = tmp_path_factory.mktemp("e2e")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(e2e_tree(getattr(request.module, "E2E_CONFIG", {}))))
    cfg = load_config(config)
    generate(root / "synth", cfg.synth, cfg.face_model)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_TRAIN_TEST_ENV.items():
            mp.setenv(key, value)
        yield E2ERun(root=root, config=config, cfg=cfg, data=root / "synth",
                     tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A temporary Prefect server and database for the flows run in the tests, started once
    per session (its start-up costs tens of seconds on 2 cores): tests that name it find
    their flow runs by what they return, never by counting the server's runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # slow on a busy 2-core box
        yield


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; test credentials and its endpoint (``AWS_ENDPOINT_URL``)
    in the environment while the module runs. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
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
