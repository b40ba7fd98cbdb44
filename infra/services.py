"""Local services on loopback: a Prefect server + a process work-pool worker, an MLflow
server (sqlite files, or PostgreSQL with ``services.database``; artifacts in the state dir or
on S3), a Ray head with its dashboard (jobs attach to it through
``$RAY_ADDRESS``: :mod:`infra.ray_connect`; Ray's token authentication) and optionally a moto
S3 server.

Locked down for a machine shared with other local users and with web browsers: the Prefect
API asks for an auth string generated at the first ``up`` (kept, owner-only, in the state
dir; clients get it from ``wildface services env``), answers cross-origin requests only from
its own UI and wants a CSRF token on every state-changing request; the Ray head (GCS, client
server, dashboard) refuses drivers and requests without its token (owner-only file in the
state dir, named to clients by ``RAY_AUTH_TOKEN_PATH``); the work pool's job
template takes no command, environment or working directory from a caller; the MLflow server
answers only requests addressed to its own host:port and refuses state changes from foreign
web origins.

Each runs in its own session (process group) with the offline environment of
:mod:`infra.offline`; pids, commands, URLs and logs are recorded in
``<state_dir>/services.json``. ``down`` stops exactly the recorded process groups (after
checking the pid still runs the recorded command). Never imports Prefect/MLflow/Ray itself.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from infra.config import ServicesConfig
from infra.offline import OFFLINE_ENV
from recon.formats.files import atomic_write_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# `down` stops them in two waves, each signalled at once: the worker (and the flows it runs)
# with MLflow and S3, then the Ray head and the Prefect server the worker talked to.
STOP_WAVES = (("worker", "mlflow", "s3"), ("ray", "prefect"))
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
            "s3": f"http://{h}:{cfg.s3_port}",
            "ray": f"http://{h}:{cfg.ray_dashboard_port}"}


def ray_address(cfg: ServicesConfig) -> str:
    """The Ray head's GCS address, what jobs attach to (``$RAY_ADDRESS``)."""
    return f"{cfg.host}:{cfg.ray_port}"


def auth_file(cfg: ServicesConfig) -> Path:
    """The Prefect API's auth string (``user:password``), readable by its owner only."""
    return cfg.state_path() / "secrets" / "prefect-auth-string"


def ray_token_file(cfg: ServicesConfig) -> Path:
    """The Ray head's authentication token, readable by its owner only."""
    return cfg.state_path() / "secrets" / "ray-auth-token"


def _new_secret(path: Path, value: str) -> None:
    """``value`` in ``path`` (folder 0700, file 0600: the atomic writer's temporary file is
    created 0600 and renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    atomic_write_bytes(path, value.encode())
    path.chmod(0o600)


def _new_auth_string(cfg: ServicesConfig) -> None:
    """A fresh random auth string in :func:`auth_file`."""
    _new_secret(auth_file(cfg), f"wildface:{secrets.token_urlsafe(32)}")


def auth_string(cfg: ServicesConfig) -> str | None:
    """The Prefect API's auth string, None before the first ``up``."""
    path = auth_file(cfg)
    return path.read_text().strip() if path.exists() else None


def _without_password(url: str, mask: str | None = None) -> str:
    """``url`` with its password left out, or replaced by ``mask``."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if colon and mask is not None:
        user = f"{user}:{mask}"
    return urlunsplit(parts._replace(netloc=f"{user}{at}{hostport}"))


def mask_password(url: str) -> str:
    """``url`` fit to print or log: its password (if any) as ``***``."""
    return _without_password(url, "***")


def database_password(cfg: ServicesConfig) -> str | None:
    """The password written in ``services.database``, None without one (then libpq's and
    asyncpg's own sources apply: ``$PGPASSWORD``, ``~/.pgpass``)."""
    password = urlsplit(cfg.database).password if cfg.database else None
    return None if password is None else unquote(password)


def database_urls(cfg: ServicesConfig) -> dict[str, str]:
    """The Prefect server's and MLflow's backend store URLs, never with a password (it
    reaches the two servers as ``$PGPASSWORD``, not on their command lines, which every local
    user can read): sqlite files in the state dir, or their databases on
    ``services.database``, each naming its driver: asyncpg for Prefect, psycopg2 for MLflow
    (SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, which is not installed)."""
    state = cfg.state_path()
    if cfg.database is None:
        return {"prefect": f"sqlite+aiosqlite:///{state / 'prefect' / 'prefect.db'}",
                "mlflow": f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"}
    server = urlsplit(_without_password(cfg.database))
    out = {}
    for name, scheme, db in (("prefect", "postgresql+asyncpg", cfg.prefect_database),
                             ("mlflow", "postgresql+psycopg2", cfg.mlflow_database)):
        out[name] = urlunsplit(server._replace(scheme=scheme, path=f"/{db}"))
    return out


def _create_databases(cfg: ServicesConfig) -> None:
    """Create the Prefect and MLflow databases on ``services.database`` when missing (owned
    by the URL's user; connecting through the server's ``postgres`` database)."""
    try:
        import psycopg2
        from psycopg2 import sql
    except ImportError as err:
        raise RuntimeError("services.database needs psycopg2 (MLflow's PostgreSQL driver): "
                           "pip install 'wildface[postgres]'") from err
    server = urlsplit(_without_password(cfg.database))
    maintenance = urlunsplit(server._replace(scheme="postgresql", path="/postgres"))
    try:
        conn = psycopg2.connect(maintenance, password=database_password(cfg),
                                connect_timeout=10)
    except psycopg2.Error as err:
        raise RuntimeError(f"PostgreSQL at {mask_password(cfg.database)}: {err}".strip()) from err
    try:
        conn.autocommit = True  # CREATE DATABASE runs outside a transaction
        with conn.cursor() as cur:
            for db in (cfg.prefect_database, cfg.mlflow_database):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    try:
                        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
                    except psycopg2.Error as err:
                        raise RuntimeError(
                            f"database {db} is missing on {mask_password(cfg.database)} and "
                            f"could not be created ({str(err).strip()}): create it, owned by "
                            "the URL's user") from err
    finally:
        conn.close()


def client_env(cfg: ServicesConfig) -> dict[str, str]:
    """Variables that point clients (prefect CLI, flows, mlflow, boto3) at the services,
    with the Prefect API's auth string once ``up`` has made one."""
    u = urls(cfg)
    env = {"PREFECT_API_URL": u["prefect"], "MLFLOW_TRACKING_URI": u["mlflow"]}
    if cfg.ray or "ray" in _read_state(cfg):  # configured, or started with `up --ray`
        # Ray reads the token from the file: its value stays out of every environment.
        env.update(RAY_ADDRESS=ray_address(cfg), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(ray_token_file(cfg)))
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
    if name == "ray":
        # The head itself: `ray start --head` must not take this for a cluster to join.
        env.pop("RAY_ADDRESS", None)
        # On SIGTERM Ray first drains the node until no worker holds a lease (for Ray Serve
        # behind a load balancer), up to 30 s; the detached actors a Ray Data job leaves
        # behind hold theirs for good, so `down` would wait that out and then SIGKILL.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    if name in ("prefect", "mlflow") and (password := database_password(cfg)) is not None:
        env["PGPASSWORD"] = password
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
        "PREFECT_API_DATABASE_CONNECTION_URL": database_urls(cfg)["prefect"],
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
                   "--backend-store-uri", database_urls(cfg)["mlflow"],
                   "--artifacts-destination",
                   cfg.artifacts or str(state / "mlflow" / "artifacts"),
                   "--workers", "1",
                   # Only requests addressed to this server (DNS rebinding gets a 403); MLflow
                   # itself refuses state changes from non-localhost web origins.
                   "--allowed-hosts", ",".join(f"{h}:{cfg.mlflow_port}"
                                               for h in dict.fromkeys((cfg.host, "localhost")))],
    }
    if cfg.s3:
        cmds["s3"] = [_bin("moto_server"), "-H", cfg.host, "-p", str(cfg.s3_port)]
    if cfg.ray:
        cmds["ray"] = [
            _bin("ray"), "start", "--head", "--node-ip-address", cfg.host,
            "--port", str(cfg.ray_port), "--dashboard-host", cfg.host,
            "--dashboard-port", str(cfg.ray_dashboard_port),
            "--ray-client-server-port", str(cfg.ray_client_port),
            # The cores this process may use (its affinity mask), not the machine's count.
            "--num-cpus", str(len(os.sched_getaffinity(0))),
            "--disable-usage-stats", "--block"]  # and --temp-dir: see up()
    return cmds


def _ray_private_dir(cfg: ServicesConfig) -> str:
    """A fresh folder holding the Ray head's temp dir (``<it>/ray``: sessions, logs,
    sockets). Private: ``mkdtemp`` makes it mode 0700 under a name no one can take first,
    and Ray makes its temp dir and session folders world-writable (0777), so this parent is
    what keeps other local users out. In the system temp dir, because Ray's socket paths
    (``<temp dir>/session_<date>_<time>_<us>_<pid>/sockets/dash_MetricsHead``) must fit the
    107 bytes of an AF_UNIX address, which a project's state dir rarely leaves.
    ``<state_dir>/ray`` links to the temp dir; ``down`` removes both."""
    path = tempfile.mkdtemp(prefix="wildface-ray-")
    link = cfg.state_path() / "ray"
    tmp_link = link.with_name("ray.tmp")
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(Path(path) / "ray")
    os.replace(tmp_link, link)
    return path


def _ports(cfg: ServicesConfig) -> dict[str, tuple[int, ...]]:
    """The fixed ports each service listens on (checked free before it starts)."""
    return {"prefect": (cfg.prefect_port,), "mlflow": (cfg.mlflow_port,),
            "s3": (cfg.s3_port,),
            "ray": (cfg.ray_port, cfg.ray_dashboard_port, cfg.ray_client_port)}


def _health_url(name: str, cfg: ServicesConfig) -> str | None:
    u = urls(cfg)
    return {"prefect": u["prefect"] + "/health", "mlflow": u["mlflow"] + "/health",
            "s3": u["s3"] + "/moto-api/", "ray": u["ray"] + "/api/version"}.get(name)


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
    headers = {}
    if name == "ray" and ray_token_file(cfg).exists():  # the dashboard wants the token too
        headers["Authorization"] = f"Bearer {ray_token_file(cfg).read_text().strip()}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=2) as resp:
            return resp.status == 200
    except (OSError, http.client.HTTPException):  # nothing there, or another program's port
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def _prefect_api(cfg: ServicesConfig, method: str, path: str, body: dict | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of one request to the Prefect server's API. A 503 (the server's answer
    to an error a client may retry, e.g. its sqlite database locked) is asked again, as
    Prefect's own client does."""
    req = urllib.request.Request(urls(cfg)["prefect"] + path, method=method, headers={
        "Content-Type": "application/json", **(headers or {})},
        data=None if body is None else json.dumps(body).encode())
    tries = 6
    while True:
        tries -= 1
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            if err.code != 503 or not tries:
                return err.code, err.read()
        time.sleep(1)


def _restrict_work_pool(cfg: ServicesConfig) -> None:
    """Create the work pool, or overwrite an existing one's template (a pool made by an
    older version or by the worker itself) and unpause it, with :data:`JOB_TEMPLATE` (also
    written to ``prefect/job-template.json``). Through the API with the auth string and a
    CSRF token, as Prefect's client does: a ``prefect work-pool create`` process spends
    seconds importing Prefect while the worker waits on it."""
    path = cfg.state_path() / "prefect" / "job-template.json"
    atomic_write_bytes(path, json.dumps(JOB_TEMPLATE, indent=1).encode())
    auth = {"Authorization": "Basic " + base64.b64encode(auth_string(cfg).encode()).decode()}
    client = "wildface-services"
    code, body = _prefect_api(cfg, "GET", f"/csrf-token?client={client}", headers=auth)
    if code == 200:
        csrf = {**auth, "Prefect-Csrf-Token": json.loads(body)["token"],
                "Prefect-Csrf-Client": client}
        code, body = _prefect_api(cfg, "POST", "/work_pools/", {
            "name": cfg.work_pool, "type": "process", "base_job_template": JOB_TEMPLATE}, csrf)
        if code == 409:  # it exists
            code, body = _prefect_api(cfg, "PATCH", f"/work_pools/{quote(cfg.work_pool, safe='')}",
                                      {"base_job_template": JOB_TEMPLATE, "is_paused": False}, csrf)
    if code not in (200, 201, 204):
        raise RuntimeError(f"work pool {cfg.work_pool}: the Prefect server answered {code}: "
                           f"{body[:500].decode(errors='replace')}")


def _launch(name: str, cfg: ServicesConfig, cmd: list[str], state: dict) -> subprocess.Popen:
    """Start service ``name`` in its own session after checking its ports are free, and
    record it in the state file."""
    for port in _ports(cfg).get(name, ()):
        if not _port_free(cfg.host, port):
            raise RuntimeError(f"{name}: port {port} on {cfg.host} is taken")
    log = cfg.state_path() / "logs" / f"{name}.log"
    extra: dict = {}
    if name == "ray":
        extra["private_dir"] = _ray_private_dir(cfg)
        cmd = [*cmd, "--temp-dir", f"{extra['private_dir']}/ray"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=child_env(cfg, name), cwd=PROJECT_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    if name in ("prefect", "mlflow"):
        extra["database"] = database_urls(cfg)[name]
    state[name] = {"pid": proc.pid, "cmd": cmd, "log": str(log), "url": urls(cfg).get(name),
                   **extra}
    _write_state(cfg, state)
    return proc


def _wait_healthy(cfg: ServicesConfig, state: dict, started: dict[str, subprocess.Popen],
                  deadline: float) -> None:
    """Poll the ``started`` services until each is healthy; one that exits, or is not
    healthy by ``deadline`` (then stopped), is an error."""
    waiting = dict(started)
    while waiting:
        for name, proc in list(waiting.items()):
            if _healthy(name, cfg):
                del waiting[name]
            elif proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}); see {state[name]['log']}")
            elif time.monotonic() > deadline:
                _stop(state[name])
                raise RuntimeError(f"{name} not healthy after {cfg.start_timeout_s}s "
                                   f"(stopped it); see {state[name]['log']}")
        if waiting:
            time.sleep(0.5)


def up(cfg: ServicesConfig) -> dict:
    """Start every service that is not running and wait until each is healthy: all but the
    worker together; once the Prefect server answers, its work pool is given the restricted
    job template and the worker starts (it needs both). A new Prefect auth string is made
    when neither Prefect process runs (a running one keeps the string it started with). With
    ``services.database``, its two databases are created first when missing."""
    cmds = _commands(cfg)
    state_dir = cfg.state_path()
    for sub in ("prefect", "mlflow/artifacts", "logs"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    # Databases, logs and the auth string: for this user only.
    state_dir.chmod(0o700)
    state = _read_state(cfg)
    if auth_string(cfg) is None or not any(
            name in state and _alive(state[name]) for name in PREFECT_SERVICES):
        _new_auth_string(cfg)
    if "ray" in cmds and not ("ray" in state and _alive(state["ray"])):
        _new_secret(ray_token_file(cfg), secrets.token_hex(32))
    if cfg.database is not None:
        _create_databases(cfg)
    # Each service's start-up is mostly its own imports: started together, the slowest
    # (Prefect's or the Ray head's) sets the wait instead of their sum.
    deadline = time.monotonic() + cfg.start_timeout_s
    started = {name: _launch(name, cfg, cmd, state) for name, cmd in cmds.items()
               if name != "worker" and not (name in state and _alive(state[name]))}
    _wait_healthy(cfg, state, {n: p for n, p in started.items() if n == "prefect"}, deadline)
    _restrict_work_pool(cfg)
    if not ("worker" in state and _alive(state["worker"])):
        started["worker"] = _launch("worker", cfg, cmds["worker"], state)
    _wait_healthy(cfg, state, {n: p for n, p in started.items() if n != "prefect"}, deadline)
    return status(cfg)


def _stop_all(entries: list[tuple[dict, bool]], timeout_s: float = 20.0) -> list[dict]:
    """SIGTERM each entry's process group (its own session), or only its first process
    when its flag (leader only) is set, all at once; SIGKILL the groups still running after
    ``timeout_s``. Returns the entries that had to be killed."""
    running = [(entry, leader_only) for entry, leader_only in entries if _alive(entry)]
    for entry, leader_only in running:
        if leader_only:
            os.kill(entry["pid"], signal.SIGTERM)
        else:
            os.killpg(entry["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(_alive(entry) for entry, _ in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = [entry for entry, _ in running if _alive(entry)]
    for entry in killed:
        os.killpg(entry["pid"], signal.SIGKILL)
    return killed


def _stop(entry: dict, timeout_s: float = 20.0) -> None:
    """SIGTERM the entry's process group, SIGKILL it after ``timeout_s``."""
    _stop_all([(entry, False)], timeout_s)


def down(cfg: ServicesConfig, timeout_s: float = 20.0) -> dict[str, str]:
    """Stop the recorded services (SIGTERM to each process group, SIGKILL after
    ``timeout_s``), in the waves of :data:`STOP_WAVES`. Returns ``{name: "stopped"}`` for
    each service that exited on SIGTERM, ``"killed"`` for one that had to be killed (or
    ``"not running"``)."""
    state = _read_state(cfg)
    report: dict[str, str] = {}
    for wave in STOP_WAVES:
        names = [name for name in wave if name in state]
        report.update({name: "stopped" if _alive(state[name]) else "not running"
                       for name in names})
        # `ray start --block` stops its daemons in order in a few seconds; signalled all at
        # once, they wait on each other for half a minute.
        killed = _stop_all([(state[name], name == "ray") for name in names], timeout_s)
        report.update({name: "killed" for name in names
                       if any(state[name] is entry for entry in killed)})
        for name in names:
            entry = state.pop(name)
            if entry.get("private_dir"):
                shutil.rmtree(entry["private_dir"], ignore_errors=True)
                (cfg.state_path() / "ray").unlink(missing_ok=True)
        _write_state(cfg, state)
    return report


def status(cfg: ServicesConfig) -> dict:
    """{name: {pid, running, healthy, url, log}} of the recorded services, and the
    database (no password) of the Prefect server and MLflow."""
    out = {}
    for name, entry in _read_state(cfg).items():
        running = _alive(entry)
        out[name] = {"pid": entry["pid"], "running": running,
                     "healthy": running and _healthy(name, cfg), "url": entry.get("url"),
                     "log": entry["log"]}
        if "database" in entry:
            out[name]["database"] = entry["database"]
    return out


def deploy(cfg: ServicesConfig, names: list[str] | None = None) -> None:
    """Register the deployments of ``prefect.yaml`` with the running Prefect server."""
    cmd = [_bin("prefect"), "--no-prompt", "deploy"]
    cmd += [a for n in names for a in ("--name", n)] if names else ["--all"]
    subprocess.run(cmd, env=child_env(cfg), cwd=PROJECT_ROOT, check=True,
                   stdin=subprocess.DEVNULL)
