"""Local services: loopback-only config, offline environment of the children, and (slow)
`wildface services up` -> `prefect deployment run 'preprocess/default'` -> `services down`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
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
def test_services_up_run_deployment_down(tmp_path):
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
                        "-p", f"input={photos}", "-p", f"output={out}", "-p", "use_ray=false",
                        "--watch", "--watch-timeout", "400"], check=True, env=env, timeout=500)
        from preprocessing.manifest import read_manifest

        m = read_manifest(str(out))
        assert sorted(m.path) == ["alice/x.jpg", "bob/x.jpg"] and set(m.status) == {"ok"}
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
