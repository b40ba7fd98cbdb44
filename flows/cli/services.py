"""``wildface services up|down|status|env|deploy``: local Prefect, worker, MLflow, Ray head,
S3."""
from __future__ import annotations

import json
import shlex
from typing import Optional

import typer

from flows.cli.options import load_config_or_exit

app = typer.Typer(help="Local services on 127.0.0.1: Prefect server + process worker, "
                  "MLflow server (sqlite, or PostgreSQL with --database), Ray head with its "
                  "dashboard and token login, optional moto S3.", no_args_is_help=True)


def _cfg(config: Optional[str], set_: list[str]):

    return load_config_or_exit(config, set_).services


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file or configs/ name")
SetOpt = typer.Option([], "--set", help="override, e.g. services.prefect_port=4300")


@app.command()
def up(config: Optional[str] = ConfigOpt, set_: list[str] = SetOpt,
       s3: bool = typer.Option(False, "--s3", help="also start a moto S3 server"),
       ray: Optional[bool] = typer.Option(None, "--ray/--no-ray", help="start a Ray head "
                                          "with its dashboard (default: services.ray, on)"),
       database: Optional[str] = typer.Option(
           None, "--database", help="PostgreSQL server for the Prefect server and MLflow: "
           "postgresql://USER@HOST:PORT (services.database; password from ~/.pgpass or "
           "$PGPASSWORD rather than here)"),
       deploy: bool = typer.Option(True, "--deploy/--no-deploy",
                                   help="register prefect.yaml's deployments")) -> None:
    """Start the services (pids and logs under services.state_dir) and wait until healthy."""
    from infra import services

    cfg = _cfg(config, set_)
    if s3:
        cfg.s3 = True
    if ray is not None:
        cfg.ray = ray
    if database is not None:
        from pydantic import ValidationError

        try:
            cfg.database = database
        except ValidationError as err:  # its message only: the URL may hold a password
            typer.echo(f"error: --database: {err.errors()[0]['msg']}", err=True)
            raise typer.Exit(2) from None
    typer.echo(json.dumps(services.up(cfg), indent=1))
    if deploy:
        services.deploy(cfg)
    # The auth string stays out of this output (often kept in logs); `env` prints it.
    for key, value in services.client_env(cfg).items():
        if key != "PREFECT_API_AUTH_STRING":
            typer.echo(f"export {key}={shlex.quote(value)}")
    typer.echo('# and the Prefect auth string: eval "$(wildface services env)"')


@app.command()
def down(config: Optional[str] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Stop the recorded services; prints {name: "stopped"}, or "killed" for one still
    running after the timeout."""
    from infra import services

    typer.echo(json.dumps(services.down(_cfg(config, set_)), indent=1))


@app.command()
def status(config: Optional[str] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Pid, running, healthy, URL and log of each recorded service."""
    from infra import services

    typer.echo(json.dumps(services.status(_cfg(config, set_)), indent=1))


@app.command()
def env(config: Optional[str] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Shell exports that point clients at the services (jobs attach to the Ray head through
    RAY_ADDRESS), the Prefect API's auth string included: eval "$(wildface services env)"."""
    from infra import services

    for key, value in services.client_env(_cfg(config, set_)).items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@app.command("deploy")
def deploy_(names: list[str] = typer.Argument(None, help="deployment names (default: all)"),
            config: Optional[str] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Register prefect.yaml's deployments with the running Prefect server."""
    from infra import services

    services.deploy(_cfg(config, set_), names or None)
