"""The services on PostgreSQL (``services.database``): each server's URL in its driver's form
and never a password on a command line or in the output (fast), and (slow) `wildface
services up --database` against a throwaway PostgreSQL cluster made here with initdb/pg_ctl:
a Prefect flow and an MLflow metric land in their databases, MLflow's artifacts on S3."""
from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import ValidationError

from free_ports import free_port
from infra import services
from infra.config import ServicesConfig

BIN = Path(sys.executable).parent
PASSWORD = "pg-canary:p@ss/word"  # characters that URLs escape
URL_PASSWORD = "pg-canary:p%40ss%2Fword"


def test_database_urls_drivers_and_no_password_on_command_lines(tmp_path):
    """Prefect gets the asyncpg URL, MLflow the psycopg2 one, each with its own database;
    the password reaches only the two servers, as $PGPASSWORD (a process's environment is
    its owner's to read; its command line is everyone's)."""
    default = ServicesConfig(state_dir=str(tmp_path))
    assert services.database_urls(default) == {
        "prefect": f"sqlite+aiosqlite:///{tmp_path / 'prefect' / 'prefect.db'}",
        "mlflow": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}
    cfg = ServicesConfig(state_dir=str(tmp_path), mlflow_database="mlflow_team",
                         database=f"postgresql://wildface:{URL_PASSWORD}@127.0.0.1:5433",
                         artifacts="s3://bucket/mlflow")
    assert services.database_urls(cfg) == {
        "prefect": "postgresql+asyncpg://wildface@127.0.0.1:5433/prefect",
        "mlflow": "postgresql+psycopg2://wildface@127.0.0.1:5433/mlflow_team"}
    assert services.database_password(cfg) == PASSWORD
    assert services.mask_password(cfg.database) == "postgresql://wildface:***@127.0.0.1:5433"
    mlflow = services._commands(cfg)["mlflow"]
    assert mlflow[mlflow.index("--backend-store-uri") + 1] == services.database_urls(cfg)["mlflow"]
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert "canary" not in " ".join(a for cmd in services._commands(cfg).values() for a in cmd)
    prefect = services.child_env(cfg, "prefect")
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"] == services.database_urls(cfg)["prefect"]
    assert prefect["PGPASSWORD"] == services.child_env(cfg, "mlflow")["PGPASSWORD"] == PASSWORD
    for name in ("worker", "ray", "s3"):  # the worker's flows and Ray's jobs inherit these
        assert PASSWORD not in services.child_env(cfg, name).values()
    # Without a password in the URL, libpq's and asyncpg's own sources apply.
    assert services.database_password(cfg.model_copy(
        update={"database": "postgresql://wildface@db:5432"})) is None
    for bad in ("mysql://u@h", "postgresql://u@h:5432/prefect"):
        with pytest.raises(ValidationError):
            ServicesConfig(database=bad)
    with pytest.raises(ValidationError):
        ServicesConfig(prefect_database='x"; DROP DATABASE mlflow; --')


def test_cli_database_error_does_not_print_the_password(tmp_path):
    from typer.testing import CliRunner

    from flows.cli.services import app

    out = CliRunner().invoke(app, ["up", f"--set=services.state_dir={tmp_path}", "--database",
                                   f"postgresql://u:{URL_PASSWORD}@127.0.0.1:1/prefect"])
    assert out.exit_code == 2 and "name the PostgreSQL server only" in out.output
    assert "canary" not in out.output
    assert not (tmp_path / "services.json").exists()


def _pg_bin(name: str) -> str | None:
    """A PostgreSQL program: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


@contextmanager
def _cluster():
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port, its superuser `wildface`
    with :data:`PASSWORD` (scram); its socket in its own folder. As root it runs as
    `nobody` (initdb refuses root), in a private temp folder of its own, not under pytest's
    0700 one. Stopped (pg_ctl stop) and removed afterwards. Yields the port."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (initdb/pg_ctl not found): `make postgres`")
    as_user: dict = {}
    root = tempfile.mkdtemp(prefix="wildface-pg-")
    if os.getuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)

        def drop() -> None:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
        as_user = {"preexec_fn": drop, "cwd": root}
    data, port = Path(root) / "data", free_port()
    pwfile = Path(root) / "pw"
    started = False
    try:
        subprocess.run(["sh", "-c", f'umask 077 && printf %s "$1" > {pwfile}', "-", PASSWORD],
                       check=True, **as_user)
        subprocess.run([initdb, "-D", str(data), "-U", "wildface", "--auth=scram-sha-256",
                        f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"], check=True,
                       stdout=subprocess.DEVNULL, timeout=120, **as_user)
        started = True
        subprocess.run([pg_ctl, "-D", str(data), "-l", f"{root}/log", "-w", "-t", "60", "-o",
                        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root}"
                        " -c fsync=off", "start"], check=True, stdout=subprocess.DEVNULL,
                       timeout=90, **as_user)
        yield port
    finally:
        if started:
            subprocess.run([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                           stdout=subprocess.DEVNULL, timeout=60, **as_user)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_services_up_on_postgresql(tmp_path):
    import boto3
    import psycopg2
    from mlflow.tracking import MlflowClient

    with _cluster() as pg_port:
        state = tmp_path / "svc"
        ports = {k: free_port() for k in ("prefect_port", "mlflow_port", "s3_port")}
        cfg = ServicesConfig(state_dir=str(state), s3=True, ray=False,
                             artifacts="s3://wildface-artifacts/mlflow", **ports)
        sets = [f"--set=services.state_dir={state}", f"--set=services.artifacts={cfg.artifacts}",
                *(f"--set=services.{k}={v}" for k, v in ports.items())]
        database = f"postgresql://wildface:{URL_PASSWORD}@127.0.0.1:{pg_port}"
        try:
            up = subprocess.run([str(BIN / "wildface"), "services", "up", "--s3", "--no-ray", "--no-deploy",
                                 "--database", database, *sets], capture_output=True,
                                text=True, timeout=600)
            assert up.returncode == 0, up.stdout + up.stderr
            st = services.status(cfg)
            assert st["prefect"]["healthy"] and st["mlflow"]["healthy"], st
            assert st["prefect"]["database"] == \
                f"postgresql+asyncpg://wildface@127.0.0.1:{pg_port}/prefect"
            # The password is on no command line, in no output, state file or log.
            printed = up.stdout + up.stderr + (state / "services.json").read_text()
            printed += "".join(p.read_text(errors="replace") for p in (state / "logs").iterdir())
            for entry in st.values():
                printed += Path(f"/proc/{entry['pid']}/cmdline").read_bytes().decode()
            assert "canary" not in printed

            # A flow through the Prefect API (auth string + CSRF token, as every client).
            api, auth = services.urls(cfg)["prefect"], services.auth_string(cfg)
            basic = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode(),
                     "Content-Type": "application/json"}
            with urllib.request.urlopen(urllib.request.Request(
                    f"{api}/csrf-token?client=pgtest", headers=basic), timeout=30) as resp:
                token = json.load(resp)["token"]
            req = urllib.request.Request(f"{api}/flows/", method="POST",
                                         data=json.dumps({"name": "pg-probe"}).encode(),
                                         headers={**basic, "Prefect-Csrf-Token": token,
                                                  "Prefect-Csrf-Client": "pgtest"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                flow_id = json.load(resp)["id"]

            # An MLflow run with a metric and an artifact (through the server, onto S3).
            s3 = boto3.client("s3", endpoint_url=services.urls(cfg)["s3"],
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              region_name="us-east-1")
            s3.create_bucket(Bucket="wildface-artifacts")
            client = MlflowClient(services.urls(cfg)["mlflow"])
            run = client.create_run(client.create_experiment("pg"))
            client.log_metric(run.info.run_id, "loss", 0.25, step=3)
            client.log_text(run.info.run_id, "on S3", "note.txt")
            keys = [o["Key"] for o in s3.list_objects_v2(
                Bucket="wildface-artifacts", Prefix="mlflow/").get("Contents", [])]
            assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys

            def rows(db: str, query: str) -> list[tuple]:
                with psycopg2.connect(host="127.0.0.1", port=pg_port, user="wildface",
                                      password=PASSWORD, dbname=db) as conn:
                    with conn.cursor() as cur:
                        cur.execute(query)
                        return cur.fetchall()

            assert rows("prefect", "SELECT id::text, name FROM flow WHERE name = 'pg-probe'") \
                == [(flow_id, "pg-probe")]
            assert rows("mlflow", "SELECT run_uuid, key, value, step FROM metrics") == [
                (run.info.run_id, "loss", 0.25, 3)]
        finally:
            subprocess.run([str(BIN / "wildface"), "services", "down", *sets], check=True,
                           timeout=120)
        assert services.status(cfg) == {}
