"""Local services: loopback-only config, offline environment of the children, and (slow,
one `wildface services up` for the module) the attacks of a web page or another local user
on the Prefect and MLflow servers refused, `prefect deployment run` of `preprocess/default`
and `train/default` on the services' worker with `wildface services env`, `services down`."""
from __future__ import annotations

import base64
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


def _http(method: str, url: str, body: dict | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request, HTTP errors included."""
    req = urllib.request.Request(url, method=method, headers={
        "Content-Type": "application/json", **(headers or {})},
        data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """`wildface services up --s3` on free ports (deployments registered) for the module, the
    client variables from `wildface services env`; `services down` afterwards stops every
    process it started."""
    tmp = tmp_path_factory.mktemp("services")
    state = tmp / "svc"
    ports = {"prefect_port": _free_port(), "mlflow_port": _free_port(), "s3_port": _free_port()}
    sets = [f"--set=services.state_dir={state}"] + [f"--set=services.{k}={v}" for k, v in ports.items()]
    cfg = ServicesConfig(state_dir=str(state), s3=True, **ports)
    st: dict = {}
    try:
        subprocess.run([str(BIN / "wildface"), "services", "up", "--s3", *sets], check=True,
                       timeout=800)
        st = services.status(cfg)
        exports = subprocess.run([str(BIN / "wildface"), "services", "env", *sets],
                                 check=True, capture_output=True, text=True).stdout
        env = dict(os.environ)
        for line in exports.splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = shlex.split(value)[0]
        yield {"cfg": cfg, "env": env, "tmp": tmp, "ports": ports, "status": st}
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


@pytest.mark.slow
def test_prefect_refuses_anonymous_foreign_and_command_overrides(running):
    """A web page or another local user tries to make the worker run a shell command."""
    cfg, tmp = running["cfg"], running["tmp"]
    api = services.urls(cfg)["prefect"]
    auth = running["env"]["PREFECT_API_AUTH_STRING"]
    assert auth == services.auth_string(cfg)
    basic = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    code, _, body = _http("GET", f"{api}/deployments/name/preprocess/default", headers=basic)
    assert code == 200, body
    deployment = json.loads(body)["id"]
    pwned = tmp / "PWNED"
    evil = {"Origin": "http://evil.example"}
    create = f"{api}/deployments/{deployment}/create_flow_run"
    params = {"input": str(tmp / "none"), "output": str(tmp / "none-out")}
    attacks = [{"parameters": params, "job_variables": jv} for jv in (
        {"command": f"touch {pwned}"}, {"env": {"LD_PRELOAD": str(tmp / "evil.so")}},
        {"working_dir": str(tmp)})]

    # The browser's preflight from a foreign page is not allowed, and without the auth
    # string nothing is served (a simple POST needs no preflight).
    code, headers, _ = _http("OPTIONS", create, headers={
        **evil, "Access-Control-Request-Method": "POST"})
    assert headers.get("access-control-allow-origin") != "http://evil.example"
    assert _http("GET", f"{api}/deployments/{deployment}", headers=evil)[0] == 401
    assert _http("GET", f"{api}/csrf-token?client=evil", headers=evil)[0] == 401
    for attack in attacks:
        # Refused by the CSRF check (403) or the auth check (401), whichever comes first.
        assert _http("POST", create, attack, evil)[0] in (401, 403)
        assert _http("POST", create, attack, {
            **evil, "Authorization": "Basic d3Jvbmc=", "Prefect-Csrf-Token": "x",
            "Prefect-Csrf-Client": "evil"})[0] in (401, 403)
        # With the auth string but no CSRF token (a page that learnt the string).
        assert _http("POST", create, attack, {**evil, **basic})[0] == 403

    # A client with the auth string and a CSRF token: the job variables are refused.
    code, _, body = _http("GET", f"{api}/csrf-token?client=test", headers=basic)
    assert code == 200, body
    csrf = {**basic, "Prefect-Csrf-Token": json.loads(body)["token"],
            "Prefect-Csrf-Client": "test"}
    patch = f"{api}/deployments/{deployment}"
    for attack in attacks:
        code, _, body = _http("POST", create, attack, csrf)
        assert code == 422 and b"Additional properties" in body, body
        # Prefect stores a deployment's job variables unchecked, but checks them again
        # for every run (and the worker's template has no place for them).
        assert _http("PATCH", patch, {"job_variables": attack["job_variables"]}, csrf)[0] == 204
        code, _, body = _http("POST", create, {"parameters": params}, csrf)
        assert code == 422 and b"Additional properties" in body, body
    assert _http("PATCH", patch, {"job_variables": {}}, csrf)[0] == 204
    time.sleep(3 * cfg.worker_query_seconds)  # the worker would have picked a run up
    code, _, body = _http("POST", f"{api}/flow_runs/filter",
                          {"deployments": {"id": {"any_": [deployment]}}}, csrf)
    assert code == 200 and json.loads(body) == []
    assert not pwned.exists()


@pytest.mark.slow
def test_mlflow_refuses_foreign_host_and_origin(running):
    mlflow_url = services.urls(running["cfg"])["mlflow"]
    create = f"{mlflow_url}/api/2.0/mlflow/experiments/create"
    search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=10"
    assert _http("GET", search)[0] == 200
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1.
    rebound = {"Host": f"evil.example:{running['ports']['mlflow_port']}"}
    assert _http("GET", search, headers=rebound)[0] == 403
    assert _http("POST", create, {"name": "x"}, {"Origin": "http://evil.example"})[0] == 403
    code, _, body = _http("GET", search)
    assert [e["name"] for e in json.loads(body).get("experiments", [])] in ([], ["Default"])


@pytest.mark.slow
def test_services_run_deployments(running):
    """`prefect deployment run` of preprocess/default and train/default on the services'
    worker, with the variables `wildface services env` hands out."""
    import skimage.data

    tmp_path, cfg, env = running["tmp"], running["cfg"], running["env"]
    ports = running["ports"]
    st = running["status"]
    assert set(st) == {"prefect", "worker", "mlflow", "s3"}
    assert all(s["running"] and s["healthy"] for s in st.values())
    photos = tmp_path / "in"
    for ident, img in (("alice", skimage.data.astronaut()),
                       ("bob", np.ascontiguousarray(skimage.data.astronaut()[:, ::-1]))):
        (photos / ident).mkdir(parents=True)
        Image.fromarray(img).save(photos / ident / "x.jpg")
    out = tmp_path / "out"
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
