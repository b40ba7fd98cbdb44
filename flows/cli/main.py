"""The ``wildface`` command line. Each command group lives in its own module here and
imports heavy libraries (torch, Ray, Prefect, MLflow) inside its commands, so ``--help``
stays fast."""
from __future__ import annotations

import typer

from flows.cli import preprocess, services

from flows.cli import model
from flows.cli import weights
from flows.cli import evaluate
from flows.cli import synth, train
from flows.cli import demo
from flows.cli import render
from flows.cli import reconstruct

app = typer.Typer(
    name="wildface",
    help="wildface: learn an animatable, detailed 3D face model (DECA) from photos.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(model.app, name="model")
app.add_typer(weights.app, name="weights")
app.add_typer(evaluate.app, name="evaluate")
app.command("preprocess")(preprocess.preprocess)
app.command("detect")(preprocess.detect)
app.add_typer(services.app, name="services")
app.command("synth")(synth.synth)
app.command("train")(train.train)
app.command("render")(render.render)
app.command("demo")(demo.demo)
app.command("reconstruct")(reconstruct.reconstruct)
app.command("animate")(reconstruct.animate)
