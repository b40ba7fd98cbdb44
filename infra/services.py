"""Local services on loopback: a Prefect server + a process work-pool worker, an MLflow
server (sqlite + local artifacts) and optionally a moto S3 server.

Locked down for a machine shared with other local users and with web browsers: the Prefect
API asks for an auth string generated at the first ``up`` (kept, owner-only, in the state
dir; clients get it from ``wildface services env``), answers cross-origin requests only from
its own UI and wants a CSRF token on every state-changing request; the work pool's job
template takes no command, environment or working directory from a caller; the MLflow server
answers only requests addressed to its own host:port and refuses state changes from foreign
web origins.

Each runs in its own session (process group) with the offline environment of
:mod:`infra.offline`; pids, commands, URLs and logs are recorded in
``<state_dir>/services.json``. ``down`` stops exactly the recorded process groups (after
checking the pid still runs the recorded command). Never imports Prefect/MLflow itself.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infra.config import ServicesConfig
from infra.offline import OFFLINE_ENV
from recon.mesh_io import atomic_write_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ORDER = ("prefect", "worker", "mlflow", "s3")
# The Prefect processes: only they get the API auth string in their environment.
PREFECT_SERVICES = ("prefect", "worker")

# The process work pool's base job template. Prefect's default one lets whoever creates a
# flow run set `command` (a shell command the worker runs), `env` (LD_PRELOAD, PYTHONPATH,
# ...) and `working_dir` (where the flow's code is imported from); this one only lets a
# caller turn output streaming off, and `additionalProperties: false` makes the server
# refuse (422) any other job variable. The worker runs `python -m prefect.engine` in its own
# environment (which holds the auth string).
JOB_TEMPLATE: dict = {
    "job_configuration": {"stream_output": "{{ stream_output }}"},
    "variables": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "stream_output": {"type": "boolean", "default": True, "title": "Stream Output",
                              "description": "stream the flow run's output to the worker's log"},
        },
    },
}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def urls(cfg: ServicesConfig) -> dict[str, str]:
    h = cfg.host
    return {"prefect": f"http://{h}:{cfg.prefect_port}/api",
            "mlflow": f"http://{h}:{cfg.mlflow_port}",
            "s3": f"http://{h}:{cfg.s3_port}"}


def auth_file(cfg: ServicesConfig) -> Path:
    """The Prefect API's auth string (``user:password``), readable by its owner only."""
    return cfg.state_path() / "secrets" / "prefect-auth-string"


def _new_auth_string(cfg: ServicesConfig) -> None:
    """A fresh random auth string in :func:`auth_file` (folder 0700, file 0600: the atomic
    writer's temporary file is created 0600 and renamed)."""
    path = auth_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    atomic_write_bytes(path, f"wildface:{secrets.token_urlsafe(32)}".encode())
    path.chmod(0o600)


def auth_string(cfg: ServicesConfig) -> str | None:
    """The Prefect API's auth string, None before the first ``up``."""
    path = auth_file(cfg)
    return path.read_text().strip() if path.exists() else None


def client_env(cfg: ServicesConfig) -> dict[str, str]:
    """Variables that point clients (prefect CLI, flows, mlflow, boto3) at the services,
    with the Prefect API's auth string once ``up`` has made one."""
    u = urls(cfg)
    env = {"PREFECT_API_URL": u["prefect"], "MLFLOW_TRACKING_URI": u["mlflow"]}
    if (auth := auth_string(cfg)) is not None:
        env["PREFECT_API_AUTH_STRING"] = auth
    if cfg.s3:
        env.update(AWS_ENDPOINT_URL=u["s3"], AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    return env


def child_env(cfg: ServicesConfig, name: str = "prefect") -> dict[str, str]:
    """This process's environment + the offline settings + the services' addresses, for
    service ``name`` (or a Prefect client: ``prefect``). The Prefect processes also get the
    auth string (server and client side) and the CORS / CSRF settings; the others get no
    auth string, one from this process's environment included."""
    env = dict(os.environ)
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    state = cfg.state_path()
    env.update(client_env(cfg))
    if name not in PREFECT_SERVICES:
        for key in ("PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"):
            env.pop(key, None)
        return env
    if "PREFECT_API_AUTH_STRING" in env:
        env["PREFECT_SERVER_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"]
    env.update({
        # Browsers: only the server's own UI may read responses cross-origin, and every
        # POST/PUT/PATCH/DELETE needs a token from /csrf-token (Prefect's clients fetch it).
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": f"http://{cfg.host}:{cfg.prefect_port}",
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL":
            f"sqlite+aiosqlite:///{state / 'prefect' / 'prefect.db'}",
        "PREFECT_SERVER_API_HOST": cfg.host,
        "PREFECT_WORKER_QUERY_SECONDS": str(cfg.worker_query_seconds),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })
    return env


def _commands(cfg: ServicesConfig) -> dict[str, list[str]]:
    state = cfg.state_path()
    cmds = {
        "prefect": [_bin("prefect"), "server", "start", "--host", cfg.host,
                    "--port", str(cfg.prefect_port)],
        "worker": [_bin("prefect"), "worker", "start", "--pool", cfg.work_pool,
                   "--type", "process"],
        "mlflow": [_bin("mlflow"), "server", "--host", cfg.host, "--port", str(cfg.mlflow_port),
                   "--backend-store-uri", f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
                   "--artifacts-destination", str(state / "mlflow" / "artifacts"),
                   "--workers", "1",
                   # Only requests addressed to this server (DNS rebinding gets a 403); MLflow
                   # itself refuses state changes from non-localhost web origins.
                   "--allowed-hosts", ",".join(f"{h}:{cfg.mlflow_port}"
                                               for h in dict.fromkeys((cfg.host, "localhost")))],
    }
    if cfg.s3:
        cmds["s3"] = [_bin("moto_server"), "-H", cfg.host, "-p", str(cfg.s3_port)]
    return cmds


def _health_url(name: str, cfg: ServicesConfig) -> str | None:
    u = urls(cfg)
    return {"prefect": u["prefect"] + "/health", "mlflow": u["mlflow"] + "/health",
            "s3": u["s3"] + "/moto-api/"}.get(name)


def _state_file(cfg: ServicesConfig) -> Path:
    return cfg.state_path() / "services.json"


def _read_state(cfg: ServicesConfig) -> dict:
    path = _state_file(cfg)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(cfg: ServicesConfig, state: dict) -> None:
    path = _state_file(cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _alive(entry: dict) -> bool:
    """The recorded pid runs and still runs the recorded program (no pid reuse)."""
    pid = entry.get("pid")
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, TypeError):
        return False
    return any(entry["cmd"][0].encode() in part or Path(entry["cmd"][0]).name.encode() in part
               for part in cmdline[:2])


def _healthy(name: str, cfg: ServicesConfig) -> bool:
    url = _health_url(name, cfg)
    if url is None:
        return True
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def _restrict_work_pool(cfg: ServicesConfig, env: dict[str, str]) -> None:
    """Create the work pool, or overwrite an existing one's template (a pool made by an
    older version or by the worker itself), with :data:`JOB_TEMPLATE`."""
    path = cfg.state_path() / "prefect" / "job-template.json"
    atomic_write_bytes(path, json.dumps(JOB_TEMPLATE, indent=1).encode())
    subprocess.run([_bin("prefect"), "--no-prompt", "work-pool", "create", cfg.work_pool,
                    "--type", "process", "--base-job-template", str(path), "--overwrite"],
                   env=env, cwd=PROJECT_ROOT, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, timeout=cfg.start_timeout_s)


def up(cfg: ServicesConfig) -> dict:
    """Start every service that is not running and wait until each is healthy: the Prefect
    server first, then its work pool is given the restricted job template, then the others
    together (the worker needs both). A new Prefect auth string is made when neither Prefect
    process runs (a running one keeps the string it started with)."""
    state_dir = cfg.state_path()
    for sub in ("prefect", "mlflow/artifacts", "logs"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    # Databases, logs and the auth string: for this user only.
    state_dir.chmod(0o700)
    state = _read_state(cfg)
    if auth_string(cfg) is None or not any(
            name in state and _alive(state[name]) for name in PREFECT_SERVICES):
        _new_auth_string(cfg)
    ports = {"prefect": cfg.prefect_port, "mlflow": cfg.mlflow_port, "s3": cfg.s3_port}
    cmds = _commands(cfg)
    for wave in (["prefect"], [n for n in cmds if n != "prefect"]):
        if wave[0] != "prefect":
            _restrict_work_pool(cfg, child_env(cfg))
        started: dict[str, subprocess.Popen] = {}
        for name in wave:
            if name in state and _alive(state[name]):
                continue
            if name in ports and not _port_free(cfg.host, ports[name]):
                raise RuntimeError(f"{name}: port {ports[name]} on {cfg.host} is taken")
            log = state_dir / "logs" / f"{name}.log"
            with open(log, "ab") as out:
                started[name] = subprocess.Popen(
                    cmds[name], env=child_env(cfg, name), cwd=PROJECT_ROOT, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            state[name] = {"pid": started[name].pid, "cmd": cmds[name], "log": str(log),
                           "url": urls(cfg).get(name)}
            _write_state(cfg, state)
        deadline = time.monotonic() + cfg.start_timeout_s
        for name, proc in started.items():
            while not _healthy(name, cfg):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}); see {state[name]['log']}")
                if time.monotonic() > deadline:
                    _stop(state[name])
                    raise RuntimeError(f"{name} not healthy after {cfg.start_timeout_s}s "
                                       f"(stopped it); see {state[name]['log']}")
                time.sleep(0.5)
    return status(cfg)


def _stop(entry: dict, timeout_s: float = 20.0) -> None:
    """SIGTERM the entry's process group (its own session), SIGKILL after ``timeout_s``."""
    if not _alive(entry):
        return
    pid = entry["pid"]
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(entry) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(entry):
        os.killpg(pid, signal.SIGKILL)


def down(cfg: ServicesConfig, timeout_s: float = 20.0) -> dict:
    """Stop the recorded services (SIGTERM to each process group, SIGKILL after a timeout)."""
    state = _read_state(cfg)
    for name in reversed(ORDER):
        entry = state.get(name)
        if entry is None:
            continue
        _stop(entry, timeout_s)
        state.pop(name)
        _write_state(cfg, state)
    return status(cfg)


def status(cfg: ServicesConfig) -> dict:
    """{name: {pid, running, healthy, url, log}} of the recorded services."""
    out = {}
    for name, entry in _read_state(cfg).items():
        running = _alive(entry)
        out[name] = {"pid": entry["pid"], "running": running,
                     "healthy": running and _healthy(name, cfg), "url": entry.get("url"),
                     "log": entry["log"]}
    return out


def deploy(cfg: ServicesConfig, names: list[str] | None = None) -> None:
    """Register the deployments of ``prefect.yaml`` with the running Prefect server."""
    cmd = [_bin("prefect"), "--no-prompt", "deploy"]
    cmd += [a for n in names for a in ("--name", n)] if names else ["--all"]
    subprocess.run(cmd, env=child_env(cfg), cwd=PROJECT_ROOT, check=True,
                   stdin=subprocess.DEVNULL)
