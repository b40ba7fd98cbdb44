"""Local services: loopback-only config, offline environment of the children, and (slow)
`wildface services up` -> `prefect deployment run` of `preprocess/default` and
`train/default` on the services' worker -> `services down`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from infra import services
from infra.config import ServicesConfig
from infra.offline import OFFLINE_ENV

BIN = Path(sys.executable).parent


def _proc_state(pid: int) -> str | None:
    """'R', 'S', 'Z', ... from /proc, or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loopback_only_and_offline_children(tmp_path):
    with pytest.raises(ValidationError):
        ServicesConfig(host="0.0.0.0")
    cfg = ServicesConfig(state_dir=str(tmp_path), prefect_port=4999)
    env = services.child_env(cfg)
    for key in ("RAY_USAGE_STATS_ENABLED", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
                "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
        assert env[key] == os.environ.get(key, OFFLINE_ENV[key])
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4999/api"
    assert env["PREFECT_HOME"].startswith(str(tmp_path))
    assert services.status(cfg) == {}
    # A recorded pid that runs another program is not "ours": never signalled.
    assert not services._alive({"pid": os.getpid(), "cmd": ["/no/such/prefect"]})


@pytest.mark.slow
def test_services_up_run_deployments_down(tmp_path):
    import skimage.data

    state = tmp_path / "svc"
    ports = {"prefect_port": _free_port(), "mlflow_port": _free_port(), "s3_port": _free_port()}
    sets = [f"--set=services.state_dir={state}"] + [f"--set=services.{k}={v}" for k, v in ports.items()]
    cfg = ServicesConfig(state_dir=str(state), s3=True, **ports)
    photos = tmp_path / "in"
    for ident, img in (("alice", skimage.data.astronaut()),
                       ("bob", np.ascontiguousarray(skimage.data.astronaut()[:, ::-1]))):
        (photos / ident).mkdir(parents=True)
        Image.fromarray(img).save(photos / ident / "x.jpg")
    out = tmp_path / "out"
    st: dict = {}
    try:
        subprocess.run([str(BIN / "wildface"), "services", "up", "--s3", *sets], check=True,
                       timeout=800)
        st = services.status(cfg)
        assert set(st) == {"prefect", "worker", "mlflow", "s3"}
        assert all(s["running"] and s["healthy"] for s in st.values())
        env = dict(os.environ) | services.client_env(cfg)
        subprocess.run([str(BIN / "prefect"), "deployment", "run", "preprocess/default",
                        "-p", f"input={photos}", "-p", f"output={out}",
                        "--watch", "--watch-timeout", "400"], check=True, env=env, timeout=500)
        from preprocessing.manifest import read_manifest

        m = read_manifest(str(out))
        assert sorted(m.path) == ["alice/x.jpg", "bob/x.jpg"] and set(m.status) == {"ok"}

        # train/default on the worker: both stages on Ray, tracked and registered in the
        # services' MLflow (a synth folder: two photos are too few identities to train on).
        from mlflow.tracking import MlflowClient

        from conftest import E2E_BASE
        from reconstruct_fixtures import make_synth

        data = make_synth(tmp_path / "synth", identities=4, images=2, size=64)
        tiny = {k: dict(v) for k, v in E2E_BASE.items()}
        tiny["train"].update(steps=2, pretrain_steps=1)
        tiny["ray"] = {"num_cpus": 2, "num_workers": 1, "cpus_per_worker": 1}
        config = tmp_path / "tiny.yaml"
        config.write_text(yaml.safe_dump(tiny))
        mlflow_uri = f"http://127.0.0.1:{ports['mlflow_port']}"
        subprocess.run([str(BIN / "prefect"), "deployment", "run", "train/default",
                        "-p", f"data={data}", "-p", f"out={tmp_path / 'train'}",
                        "-p", f"config={config}", "-p", f"tracking_uri={mlflow_uri}",
                        "--watch", "--watch-timeout", "600"], check=True, env=env, timeout=700)
        client = MlflowClient(mlflow_uri, mlflow_uri)
        version = client.get_model_version_by_alias("wildface-deca", "challenger")
        assert version.tags["data_root"] == str(data)
        detail = client.get_run(version.run_id)
        assert detail.info.status == "FINISHED" and detail.data.tags["wildface.stage"] == "detail"
        history = client.get_metric_history(version.run_id, "loss/photometric_detail")
        assert {m.step for m in history} == {1, 2}
    finally:
        subprocess.run([str(BIN / "wildface"), "services", "down", *sets], check=True,
                       timeout=120)
    assert services.status(cfg) == {}
    for entry in st.values():
        assert not services._alive({"pid": entry["pid"], "cmd": [sys.executable]})
        deadline = time.monotonic() + 10  # an exited process may linger briefly
        while _proc_state(entry["pid"]) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _proc_state(entry["pid"]) in (None, "Z")
