"""The ``wildface`` command line. Each command group lives in its own module here and
imports heavy libraries (torch, Ray, Prefect, MLflow) inside its commands, so ``--help``
stays fast."""
from __future__ import annotations

import typer

from flows.cli import model

app = typer.Typer(
    name="wildface",
    help="wildface: learn an animatable, detailed 3D face model (DECA) from photos.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(model.app, name="model")
