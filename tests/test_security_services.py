"""Local services against other local users and web pages (fast checks; the attacks on
running services are in test_services.py): the Prefect auth string is private and reaches
only the Prefect processes, the work pool's job template refuses (server side) and ignores
(worker side) a caller's command, environment and working directory, the MLflow server
answers only its own host:port, and Ray workers get credentials from an owner-only file,
not from the runtime environment that Ray logs."""
from __future__ import annotations

import asyncio
import copy
import os
import stat

import pytest

from infra import services
from infra.config import ServicesConfig

ATTACKS = ({"command": "touch PWNED"}, {"env": {"LD_PRELOAD": "/tmp/evil.so"}},
           {"working_dir": "/tmp/evil"})


def test_auth_string_private_and_only_in_prefect_processes(tmp_path, monkeypatch):
    cfg = ServicesConfig(state_dir=str(tmp_path / "svc"), prefect_port=4999)
    assert services.auth_string(cfg) is None
    assert "PREFECT_API_AUTH_STRING" not in services.client_env(cfg)
    services._new_auth_string(cfg)
    path = services.auth_file(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = services.auth_string(cfg)
    user, password = first.split(":", 1)
    assert user == "wildface" and len(password) >= 40
    services._new_auth_string(cfg)
    assert services.auth_string(cfg) != first

    # A caller's own strings never reach MLflow or moto; the Prefect ones get ours.
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "caller:secret")
    assert services.client_env(cfg)["PREFECT_API_AUTH_STRING"] == services.auth_string(cfg)
    for name in services.PREFECT_SERVICES:
        env = services.child_env(cfg, name)
        assert env["PREFECT_API_AUTH_STRING"] == env["PREFECT_SERVER_API_AUTH_STRING"] == \
            services.auth_string(cfg)
        assert env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4999"
        assert env["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    for name in ("mlflow", "s3", "ray"):  # Ray also hands its env to every job's workers
        env = services.child_env(cfg, name)
        assert "PREFECT_API_AUTH_STRING" not in env
        assert "PREFECT_SERVER_API_AUTH_STRING" not in env
        assert "caller:secret" not in env.values()


def _server_validates(template: dict, job_variables: dict) -> None:
    """The Prefect server's own check of a flow run's job variables against a pool's
    template (what POST /deployments/{id}/create_flow_run calls; no block references here,
    so no database session is needed)."""
    from prefect.server.api.validation import _validate_work_pool_job_variables

    asyncio.run(_validate_work_pool_job_variables(
        None, "wildface", template, {}, job_variables, ignore_required=False,
        ignore_invalid_defaults=True))


class _NoServer:
    """A stand-in Prefect client: the templates hold no block or variable references, so a
    worker building a job from them asks the server nothing (any call would fail here)."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def _worker_job(template: dict, job_variables: dict):
    """The job configuration a process worker builds from a template and a flow run's job
    variables."""
    from prefect.workers.process import ProcessJobConfiguration

    return asyncio.run(ProcessJobConfiguration.from_template_and_values(
        copy.deepcopy(template), job_variables, client=_NoServer()))


@pytest.mark.parametrize("job_variables", ATTACKS)
def test_job_template_refuses_and_ignores_callers_command(job_variables):
    from prefect.utilities.schema_tools import ValidationError
    from prefect.workers.process import ProcessWorker

    # Prefect's default template takes the attack as given...
    default = ProcessWorker.get_default_base_job_template()
    _server_validates(default, job_variables)
    config = _worker_job(default, job_variables)
    key = next(iter(job_variables))
    assert getattr(config, key) not in (None, {})
    # ...ours refuses it at the server (HTTP 422 there)...
    with pytest.raises(ValidationError, match="Additional properties"):
        _server_validates(services.JOB_TEMPLATE, job_variables)
    _server_validates(services.JOB_TEMPLATE, {"stream_output": False})
    # ...and a worker given it anyway (e.g. a flow run stored before the pool was
    # restricted) leaves the command, environment and folder its own.
    config = _worker_job(services.JOB_TEMPLATE, job_variables)
    assert config.command is None and config.env == {} and config.working_dir is None


def test_mlflow_answers_only_its_own_host():
    cfg = ServicesConfig(mlflow_port=5123)
    cmd = services._commands(cfg)["mlflow"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--allowed-hosts") + 1] == "127.0.0.1:5123,localhost:5123"
    assert "--cors-allowed-origins" not in cmd  # MLflow's default: localhost origins only


def test_ray_workers_get_credentials_from_a_private_file_not_env_vars(monkeypatch):
    """What a Ray worker's runtime environment carries (Ray logs it) holds no secret; the
    secret reaches the worker through the owner-only file (Ray itself: test_train_ray.py)."""
    from flows.config import WildfaceConfig
    from flows.ray_cluster import CREDENTIALS_ENV, credentials_file, load_credentials
    from flows.train import _worker_env

    secret = "canary-not-in-runtime-env"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env_vars = _worker_env(WildfaceConfig())
    assert env_vars["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert secret not in env_vars.values() and "AWS_ACCESS_KEY_ID" not in env_vars
    with credentials_file() as credentials:
        path = credentials[CREDENTIALS_ENV]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        # A worker started without the credentials loads them from the file.
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv(CREDENTIALS_ENV, path)
        load_credentials()
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    # On a node without the file (a cluster's other node): its own credentials stay.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-node's-own")
    load_credentials()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "the-node's-own"
