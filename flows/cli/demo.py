"""``wildface demo``: the whole chain on this machine, on built-in data (CPU, minutes)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.options import load_config_or_exit


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="output folder (data, runs, "
                             "meshes, figures, MLflow store)"),
    config: str = typer.Option("demo", "--config", "-c", help="YAML config file or name in "
                               "configs/"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="key.sub=value override"),
    services: bool = typer.Option(True, "--services/--no-services", help="start the local "
                                  "services (Prefect server + worker, MLflow server, Ray head) "
                                  "unless they run; if they cannot start, or with --no-services: an "
                                  "ephemeral Prefect API and a sqlite MLflow store in OUT"),
    # Sized for the < 15 min target on 2 cores (see docs/training-at-scale.md, Figures).
    coarse_steps: Optional[int] = typer.Option(150, "--coarse-steps", min=0,
                                               help="coarse stage steps (0 = the config's "
                                               "train.steps)"),
    detail_steps: Optional[int] = typer.Option(60, "--detail-steps", min=0,
                                               help="detail stage steps (0 = the config's "
                                               "train.steps)"),
) -> None:
    """Render a synthetic dataset (+ real photos shipped by scikit-image), preprocess it,
    train the coarse and detail stages on Ray Train (CPU), evaluate on held-out synthetic
    identities, register the model in MLflow (alias challenger) and print where to look."""
    import os

    # A busy 2-core machine can take longer than Prefect's default 20 s to start the
    # ephemeral API server; Prefect reads this when it is imported.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

    sets = list(overrides or [])
    if not any(s.startswith("ray.storage_path=") for s in sets):
        sets.append(f"ray.storage_path={(out / 'ray').resolve()}")
    cfg = load_config_or_exit(config, sets)
    _use_services(cfg, services)
    from flows.pipeline import run_demo  # imports Prefect: after the services are chosen

    run_demo(out, config, sets, coarse_steps=coarse_steps or None,
             detail_steps=detail_steps or None)


def _use_services(cfg, start: bool) -> None:
    """Point this process at ``wildface services`` when they run, else start them if
    ``start``; on failure go on without (ephemeral Prefect, sqlite MLflow). Prefect reads its
    API URL when imported, hence before the flows are."""
    import os

    from infra import services

    if all(s["healthy"] for s in services.status(cfg.services).values()) and \
            services.status(cfg.services):
        typer.echo("[demo] using the running local services (wildface services)")
    elif start:
        typer.echo("[demo] starting the local services (Prefect server + worker, MLflow "
                   "server, Ray head with its dashboard) ...")
        try:
            services.up(cfg.services)
        except (RuntimeError, OSError) as err:
            typer.echo(f"[demo] services did not start ({err}); going on without them")
            return
    else:
        return
    env = services.client_env(cfg.services)
    os.environ.update(env)
    typer.echo(f"[demo] Prefect {env['PREFECT_API_URL']}, MLflow {env['MLFLOW_TRACKING_URI']}")
