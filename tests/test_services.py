"""Local services: loopback-only config, offline environment of the children, the Ray
head's command and the one way jobs start or attach to Ray, and (slow, one `wildface
services up` for the module) the attacks of a web page or another local user on the Prefect
and MLflow servers refused, the Ray head's dashboard, a job attached to it and its loopback
sockets, `prefect deployment run` of `preprocess/default` and `train/default` on the
services' worker (on the Ray head) with `wildface services env`, `services down`."""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from free_ports import free_port
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


def _session(sid: int) -> set[int]:
    """Live (not zombie) processes of session ``sid``: a service and everything it started."""
    pids = set()
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[3] == str(sid) and fields[0] != "Z":
            pids.add(int(path.parent.name))
    return pids


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by ``pids`` (/proc/net)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: TCP_LISTEN
                continue
            host, port = cols[1].split(":")
            raw = bytes.fromhex(host)  # 32-bit words in the kernel's (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            ip = getattr(ip, "ipv4_mapped", None) or ip
            found.add((str(ip), int(port, 16)))
    return found


def _ray_auth(cfg: ServicesConfig) -> dict[str, str]:
    """The header the Ray head's dashboard wants (Ray's token authentication)."""
    return {"Authorization": f"Bearer {services.ray_token_file(cfg).read_text().strip()}"}


def test_a_port_answered_by_another_program_is_not_healthy(tmp_path):
    """A server that is not the service (another program took its port: here one that
    answers binary, as Ray's daemons do) reads as not healthy, never as a crash."""
    import threading

    listener = socket.create_server(("127.0.0.1", free_port()))
    port = listener.getsockname()[1]

    def answer() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00@\xfe\x00\x00?\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    with listener:
        for name in ("prefect", "mlflow"):
            cfg = ServicesConfig(state_dir=str(tmp_path), prefect_port=port, mlflow_port=port)
            assert services._healthy(name, cfg) is False


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


def test_up_starts_servers_together_and_down_stops_in_waves(tmp_path, monkeypatch):
    """`up` starts the servers at once and the worker only after the Prefect server answers
    and its pool is restricted; `down` signals each wave at once (the Ray head's leader only)
    and the worker's wave is gone before the Ray head and the Prefect server are signalled;
    a service still running after the timeout is killed, and `down` says which. Each service
    is a shell that logs its start and its SIGTERM."""
    events = tmp_path / "events"
    events.touch()
    # `$0` is the service's name; the worker lingers a second after SIGTERM, MLflow does not
    # exit on it.
    script = ('echo "$0 start" >> {log}; trap \'echo "$0 term" >> {log}; {after}\' TERM; '
              'while :; do sleep 0.05; done')
    after = {"worker": f'sleep 1; echo "$0 exit" >> {events}; exit 0', "mlflow": ":"}
    cmds = {name: ["/bin/sh", "-c", script.format(log=events, after=after.get(name, "exit 0")),
                   name]
            for name in ("prefect", "worker", "mlflow", "s3", "ray")}
    started = lambda: {line.split()[0] for line in events.read_text().splitlines()
                       if line.endswith(" start")}
    cfg = ServicesConfig(state_dir=str(tmp_path / "svc"), s3=True, start_timeout_s=60,
                         **{k: free_port() for k in ("prefect_port", "mlflow_port", "s3_port",
                                                      "ray_port", "ray_dashboard_port",
                                                      "ray_client_port")})
    at_restrict: list[set[str]] = []
    monkeypatch.setattr(services, "_commands", lambda _cfg: {k: list(v) for k, v in cmds.items()})
    monkeypatch.setattr(services, "_healthy", lambda name, _cfg: name in started())
    monkeypatch.setattr(services, "_restrict_work_pool",
                        lambda _cfg: at_restrict.append(set(services._read_state(cfg))))
    try:
        st = services.up(cfg)
        assert at_restrict == [{"prefect", "mlflow", "s3", "ray"}]
        assert set(st) == set(cmds) and all(e["running"] and e["healthy"] for e in st.values())
        assert (cfg.state_path() / "ray").is_symlink()
    finally:
        report = services.down(cfg, timeout_s=3)
    assert report == {"worker": "stopped", "mlflow": "killed", "s3": "stopped",
                      "ray": "stopped", "prefect": "stopped"}
    assert services.status(cfg) == {} and not (cfg.state_path() / "ray").is_symlink()
    for entry in st.values():
        assert not services._alive({"pid": entry["pid"], "cmd": ["/bin/sh"]})
    lines = events.read_text().splitlines()
    order = [line for line in lines if not line.endswith(" start")]
    # The worker's wave signalled at once: MLflow and S3 before the worker is done.
    assert order.index("worker exit") > max(order.index("mlflow term"), order.index("s3 term"))
    assert {line.split()[0] for line in order[4:]} == {"ray", "prefect"}, order


def test_ray_head_command_and_env_export(tmp_path):
    """The head `services up` starts: loopback GCS, dashboard and client server on the
    configured ports, this process's cores (its temp dir: test_ray_head); jobs attach
    through RAY_ADDRESS from `services env`; services.ray=false leaves it out."""
    from typer.testing import CliRunner

    from flows.cli.services import app

    cfg = ServicesConfig(state_dir=str(tmp_path), ray=True, ray_port=6390,
                         ray_dashboard_port=8300, ray_client_port=10050)
    assert ServicesConfig().ray  # on by default: it has a login (Ray's token auth)
    cmd = services._commands(cfg)["ray"]
    assert cmd[0] == str(BIN / "ray") and cmd[1:3] == ["start", "--head"]
    opts = {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--")}
    assert opts["--node-ip-address"] == opts["--dashboard-host"] == "127.0.0.1"
    assert (opts["--port"], opts["--dashboard-port"], opts["--ray-client-server-port"]) == \
        ("6390", "8300", "10050")
    assert opts["--num-cpus"] == str(len(os.sched_getaffinity(0)))
    assert {"--disable-usage-stats", "--block"} <= set(cmd)
    assert services._health_url("ray", cfg) == "http://127.0.0.1:8300/api/version"
    assert services.client_env(cfg)["RAY_ADDRESS"] == "127.0.0.1:6390"
    # Clients and the head read the token from the owner-only file, never from a variable.
    for env in (services.client_env(cfg), services.child_env(cfg, "ray")):
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env
        assert env["RAY_AUTH_TOKEN_PATH"] == str(services.ray_token_file(cfg))
    assert services.child_env(cfg, "worker")["RAY_ADDRESS"] == "127.0.0.1:6390"
    assert "RAY_ADDRESS" not in services.child_env(cfg, "ray")  # a head joins nothing
    sets = [f"--set=services.state_dir={tmp_path}", "--set=services.ray_port=6390",
            "--set=services.ray=true"]
    out = CliRunner().invoke(app, ["env", *sets])
    assert out.exit_code == 0 and "export RAY_ADDRESS=127.0.0.1:6390" in out.stdout.splitlines()
    off = cfg.model_copy(update={"ray": False})
    assert "ray" not in services._commands(off) and "RAY_ADDRESS" not in services.client_env(off)
    out = CliRunner().invoke(app, ["env", *sets, "--set=services.ray=false"])
    assert out.exit_code == 0 and "RAY_ADDRESS" not in out.stdout


def test_services_commands_start_without_torch(tmp_path):
    """`wildface services up|down|env` load the config, never torch (seconds of start-up
    each, on a loaded machine tens)."""
    probe = ("import sys\n"
             "from typer.testing import CliRunner\n"
             "from flows.cli.main import app\n"
             f"out = CliRunner().invoke(app, ['services', 'env', '--set=services.state_dir={tmp_path}'])\n"
             "assert out.exit_code == 0 and 'PREFECT_API_URL' in out.stdout, out.output\n"
             "print(sorted(m for m in ('torch', 'ray', 'prefect', 'mlflow') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=services.PROJECT_ROOT, check=True,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[-2] == "[]", done.stdout


def test_one_way_to_start_or_attach_to_ray(monkeypatch):
    """The configured address, else $RAY_ADDRESS, else a private Ray on loopback; every Ray
    section speaks the same type. Decided and checked without starting Ray."""
    import ray
    from ray._private import ray_constants

    from flows.jobs_config import ReconstructRayConfig
    from infra.config import RayConfig, RayStartConfig
    from infra.ray_connect import init_kwargs, start_or_attach
    from preprocessing.config import PreprocessRayConfig

    local = {"address": "local", "num_cpus": 3, "include_dashboard": False,
             "dashboard_host": "127.0.0.1", "dashboard_port": 8265}
    assert init_kwargs(RayStartConfig(num_cpus=3), {}) == local
    assert init_kwargs(RayStartConfig(num_cpus=3), {"RAY_ADDRESS": ""}) == local
    assert init_kwargs(RayStartConfig(num_cpus=3), {"RAY_ADDRESS": "127.0.0.1:6390"}) == {
        "address": "127.0.0.1:6390"}
    assert init_kwargs(RayStartConfig(address="ray://head:10001"),
                       {"RAY_ADDRESS": "127.0.0.1:6390"}) == {"address": "ray://head:10001"}
    for section in (RayConfig(address="auto"), PreprocessRayConfig(address="auto"),
                    ReconstructRayConfig(address="auto")):
        assert isinstance(section, RayStartConfig)
        assert init_kwargs(section, {}) == {"address": "auto"}

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for environ, address, loopback in (({}, "local", True),
                                       ({"RAY_ADDRESS": "127.0.0.1:6390"}, "127.0.0.1:6390", True),
                                       ({"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.5:6379", False)):
        calls.clear()
        # As when Ray was imported before the offline settings (node IP = machine's IP).
        monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        assert start_or_attach(RayStartConfig(), log_to_driver=False) is True
        assert calls[0]["address"] == address and calls[0]["log_to_driver"] is False
        # Loopback targets are dialled and bound on 127.0.0.1; a cluster keeps Ray's own.
        assert ray_constants.ENABLE_RAY_CLUSTER is (not loopback)
        assert start_or_attach(RayStartConfig()) is False and len(calls) == 1


def _http(method: str, url: str, body: dict | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request, HTTP errors included. A 503 is asked again,
    as Prefect's own client does: the Prefect server's answer to an error a client may retry
    (e.g. its sqlite database locked on a loaded machine)."""
    req = urllib.request.Request(url, method=method, headers={
        "Content-Type": "application/json", **(headers or {})},
        data=None if body is None else json.dumps(body).encode())
    for attempt in range(6):
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            if err.code != 503 or attempt == 5:
                return err.code, dict(err.headers), err.read()
        time.sleep(2)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """`wildface services up --s3 --ray` on free ports (deployments registered) for the module, the
    client variables from `wildface services env`; `services down` afterwards stops every
    process it started (the Ray head's daemons and workers included) and removes the head's
    temp dir."""
    tmp = tmp_path_factory.mktemp("services")
    state = tmp / "svc"
    ports = {name: free_port() for name in ("prefect_port", "mlflow_port", "s3_port",
                                             "ray_port", "ray_dashboard_port", "ray_client_port")}
    # The worker polls every second: each flow run waits less for it.
    sets = [f"--set=services.state_dir={state}", "--set=services.worker_query_seconds=1"] + [
        f"--set=services.{k}={v}" for k, v in ports.items()]
    cfg = ServicesConfig(state_dir=str(state), s3=True, ray=True, worker_query_seconds=1, **ports)
    st: dict = {}
    ray_pids: set[int] = set()
    ray_tmp = state / "ray"
    try:
        subprocess.run([str(BIN / "wildface"), "services", "up", "--s3", "--ray", *sets],
                       check=True,
                       timeout=800)
        st = services.status(cfg)
        ray_pids = _session(st["ray"]["pid"])
        ray_tmp = (state / "ray").resolve()
        from typer.testing import CliRunner

        from flows.cli.services import app

        out = CliRunner().invoke(app, ["env", *sets])  # in this process: no interpreter start
        assert out.exit_code == 0, out.output
        exports = out.stdout
        env = dict(os.environ)
        for line in exports.splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = shlex.split(value)[0]
        yield {"cfg": cfg, "env": env, "tmp": tmp, "ports": ports, "status": st}
    finally:
        down = subprocess.run([str(BIN / "wildface"), "services", "down", *sets], check=True,
                              timeout=120, capture_output=True, text=True)
    # Each exited on SIGTERM (the Ray head too, after jobs left detached actors on it).
    assert json.loads(down.stdout) == dict.fromkeys(st, "stopped"), down
    assert services.status(cfg) == {}
    for entry in st.values():
        assert not services._alive({"pid": entry["pid"], "cmd": [sys.executable]})
        deadline = time.monotonic() + 10  # an exited process may linger briefly
        while _proc_state(entry["pid"]) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _proc_state(entry["pid"]) in (None, "Z")
    # Every process of the Ray head (GCS, raylet, dashboard, workers), and its temp dir.
    deadline = time.monotonic() + 20
    while any(_proc_state(p) not in (None, "Z") for p in ray_pids) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_pids and not [p for p in ray_pids if _proc_state(p) not in (None, "Z")]
    assert not (state / "ray").exists() and not (state / "ray").is_symlink()
    assert ray_tmp.parent.parent == Path(tempfile.gettempdir())
    assert not ray_tmp.parent.exists()


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
def test_ray_head_dashboard_attach_loopback(running):
    """The services' Ray head: its dashboard answers with the token only, a job run with
    RAY_ADDRESS and the token file from `services env` attaches to it (no private Ray) and its
    task is listed by the dashboard's state API, a driver without the token is refused, and
    every socket the head's processes listen on is on 127.0.0.1."""
    cfg, env = running["cfg"], running["env"]
    dashboard = services.urls(cfg)["ray"]
    assert dashboard == f"http://127.0.0.1:{running['ports']['ray_dashboard_port']}"
    token = services.ray_token_file(cfg)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert _http("GET", f"{dashboard}/api/version")[0] == 401
    assert _http("GET", f"{dashboard}/api/jobs/")[0] == 401
    assert _http("POST", f"{dashboard}/api/jobs/", {"entrypoint": "true"})[0] == 401
    code, _, body = _http("GET", f"{dashboard}/api/version", headers=_ray_auth(cfg))
    assert code == 200 and json.loads(body)["ray_version"]
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{running['ports']['ray_port']}"
    job = ("import json, ray\n"
           "from infra.config import RayStartConfig\n"
           "from infra.ray_connect import start_or_attach\n"
           "assert start_or_attach(RayStartConfig(), log_to_driver=False)\n"
           "@ray.remote\n"
           "def wildface_probe():\n"
           "    return 42\n"
           "ctx = ray.get_runtime_context()\n"
           "print(json.dumps({'job': ctx.get_job_id(), 'gcs': ctx.gcs_address,\n"
           "                  'value': ray.get(wildface_probe.remote())}))\n")
    # Another local user's driver: the address, but not the token (Ray's own default mode).
    stranger_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    stranger_env["RAY_NUM_REDIS_GET_RETRIES"] = "3"  # refused 3 times, not Ray's 20 (~1 s each)
    stranger = subprocess.Popen([sys.executable, "-c", job], env=stranger_env,
                                cwd=services.PROJECT_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    done = subprocess.run([sys.executable, "-c", job], env=env, cwd=services.PROJECT_ROOT,
                          check=True, capture_output=True, text=True, timeout=120)
    out, err = stranger.communicate(timeout=120)
    assert stranger.returncode != 0 and '"value": 42' not in out, out
    assert "Failed to connect to Ray cluster" in err, err[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["gcs"] == env["RAY_ADDRESS"] and result["value"] == 42
    tasks: list = []
    deadline = time.monotonic() + 30  # task events reach the GCS about once a second
    while not tasks and time.monotonic() < deadline:
        code, _, body = _http("GET", f"{dashboard}/api/v0/tasks?filter_keys=name&"
                              "filter_predicates=%3D&filter_values=wildface_probe",
                              headers=_ray_auth(cfg))
        assert code == 200, body
        tasks = [t for t in json.loads(body)["data"]["result"]["result"]
                 if t["job_id"] == result["job"] and t["state"] == "FINISHED"]
        time.sleep(0.5)
    assert tasks
    code, _, body = _http("GET", f"{dashboard}/api/jobs/", headers=_ray_auth(cfg))
    assert code == 200 and result["job"] in [j["job_id"] for j in json.loads(body)]

    head = running["status"]["ray"]
    assert head["running"] and head["healthy"] and head["url"] == dashboard
    # Ray makes its temp dir world-writable; the folder around it is this user's alone.
    temp = Path(services._read_state(cfg)["ray"]["cmd"][-1])
    assert temp.is_dir() and temp == (cfg.state_path() / "ray").resolve()
    assert stat.S_IMODE(temp.parent.stat().st_mode) == 0o700
    assert temp.parent.stat().st_uid == os.getuid()
    sockets = _listening(_session(head["pid"]))
    assert (("127.0.0.1", running["ports"]["ray_port"]) in sockets
            and ("127.0.0.1", running["ports"]["ray_dashboard_port"]) in sockets)
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets


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
    """`prefect deployment run` of preprocess/default and train/default (its detail stage,
    from a coarse checkpoint given as a parameter) on the services' worker, with the
    variables `wildface services env` hands out."""
    import skimage.data

    tmp_path, cfg, env = running["tmp"], running["cfg"], running["env"]
    ports = running["ports"]
    st = running["status"]
    assert set(st) == {"prefect", "worker", "mlflow", "s3", "ray"}
    assert all(s["running"] and s["healthy"] for s in st.values())
    photos = tmp_path / "in"
    for ident, img in (("alice", skimage.data.astronaut()),
                       ("bob", np.ascontiguousarray(skimage.data.astronaut()[:, ::-1]))):
        (photos / ident).mkdir(parents=True)
        Image.fromarray(img).save(photos / ident / "x.jpg")
    out = tmp_path / "out"
    # train/default: the detail stage on Ray from a given coarse checkpoint (the coarse stage
    # on Ray is test_train_ray's and test_pipeline's), tracked and registered in the services'
    # MLflow (a synth folder: two photos are too few identities to train on).
    from reconstruct_fixtures import e2e_tree, make_synth, untrained_checkpoint

    data = make_synth(tmp_path / "synth", identities=4, images=2, size=64)
    coarse = untrained_checkpoint(tmp_path / "coarse-000000000.pt", stage="coarse")
    tiny = e2e_tree({})
    tiny["train"].update(steps=2, pretrain_steps=1)
    tiny["ray"] = {"num_cpus": 2, "num_workers": 1, "cpus_per_worker": 1}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny))
    mlflow_uri = f"http://127.0.0.1:{ports['mlflow_port']}"
    jobs_api = services.urls(cfg)["ray"] + "/api/jobs/"
    before = {j["job_id"] for j in json.loads(_http("GET", jobs_api, headers=_ray_auth(cfg))[2])}
    # Both runs at once on the worker (the two flow runs' start-ups overlap; Ray queues
    # their tasks on the head's CPUs).
    runs = [subprocess.Popen([str(BIN / "prefect"), "deployment", "run", name, *params,
                              "--watch", "--watch-timeout", "600"], env=env)
            for name, params in (
                ("preprocess/default", ["-p", f"input={photos}", "-p", f"output={out}"]),
                ("train/default", ["-p", f"data={data}", "-p", f"out={tmp_path / 'train'}",
                                   "-p", f"config={config}", "-p", f"coarse={coarse}",
                                   "-p", f"tracking_uri={mlflow_uri}"]))]
    try:
        assert [run.wait(timeout=700) for run in runs] == [0, 0]
    finally:
        for run in runs:
            run.kill()
    from mlflow.tracking import MlflowClient

    from preprocessing.manifest import read_manifest

    m = read_manifest(str(out))
    assert sorted(m.path) == ["alice/x.jpg", "bob/x.jpg"] and set(m.status) == {"ok"}
    client = MlflowClient(mlflow_uri, mlflow_uri)
    version = client.get_model_version_by_alias("wildface-deca", "challenger")
    assert version.tags["data_root"] == str(data)
    # the given coarse checkpoint is the one the model records
    assert version.tags["sha256.coarse_checkpoint"] == hashlib.sha256(
        coarse.read_bytes()).hexdigest()
    detail = client.get_run(version.run_id)
    assert detail.info.status == "FINISHED" and detail.data.tags["wildface.stage"] == "detail"
    history = client.get_metric_history(version.run_id, "loss/photometric_detail")
    assert {m.step for m in history} == {1, 2}
    # Both flow runs attached to the services' Ray head (RAY_ADDRESS in the worker's
    # environment): its dashboard lists their driver jobs.
    deadline = time.monotonic() + 30  # a flow run's process may still be exiting
    while True:
        jobs = [j for j in json.loads(_http("GET", jobs_api, headers=_ray_auth(cfg))[2])
                if j["job_id"] not in before]
        if {j["status"] for j in jobs} == {"SUCCEEDED"} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(jobs) >= 2 and {j["status"] for j in jobs} == {"SUCCEEDED"}, jobs
    # Each flow run's page in the Prefect UI links to its Ray job on the dashboard.
    api = services.urls(cfg)["prefect"]
    basic = {"Authorization": "Basic " + base64.b64encode(
        env["PREFECT_API_AUTH_STRING"].encode()).decode()}
    code, _, body = _http("GET", f"{api}/csrf-token?client=test", headers=basic)
    assert code == 200, body
    csrf = {**basic, "Prefect-Csrf-Token": json.loads(body)["token"],
            "Prefect-Csrf-Client": "test"}
    code, _, body = _http("POST", f"{api}/artifacts/filter",
                          {"artifacts": {"key": {"any_": ["ray-job"]}}}, csrf)
    assert code == 200, body
    links = {a["data"] for a in json.loads(body)}
    dashboard = services.urls(cfg)["ray"]
    assert {f"[Ray job {j['job_id']}]({dashboard}/#/jobs/{j['job_id']})" for j in jobs} <= links, \
        (links, jobs)
