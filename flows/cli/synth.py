"""``wildface synth``: render a synthetic dataset of random people with ground truth."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.options import load_config_or_exit


def synth(
    out: Path = typer.Option(..., "--out", help="output folder (images/, labels.csv, "
                             "params.json, now/)"),
    identities: Optional[int] = typer.Option(None, "--identities", min=1,
                                             help="people (default: synth.identities)"),
    images_per_identity: Optional[int] = typer.Option(
        None, "--images-per-identity", min=1, help="images per person "
        "(default: synth.images_per_identity)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="default: synth.seed"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML config file or name "
                                         "in configs/ (synth and face_model sections)"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="key.sub=value override"),
) -> None:
    """Render random people from the face model (demo head unless face_model.path says
    FLAME): images with 68 landmarks (.pts) and skin masks (.mask.png) in the
    <identity>/<image> layout that `wildface preprocess` reads, labels.csv, per-image ground
    truth (params.json) and each identity's neutral mesh + 7 landmarks in the NoW layout."""
    from recon.devices import set_cpu_threads

    sets = list(overrides or [])
    for key, value in (("identities", identities), ("images_per_identity", images_per_identity),
                       ("seed", seed)):
        if value is not None:
            sets.append(f"synth.{key}={value}")
    cfg = load_config_or_exit(config, sets)
    set_cpu_threads()
    from recon.synth import generate

    def progress(done: int, total: int) -> None:
        typer.echo(f"\rrendered {done}/{total} images", nl=done == total)

    summary = generate(out, cfg.synth, cfg.face_model, progress=progress)
    seconds = summary["seconds"]
    typer.echo(f"{summary['images']} images of {summary['identities']} identities in "
               f"{seconds:.1f} s after loading the face model "
               f"({60 * summary['images'] / max(seconds, 1e-9):.0f}/min)")
    typer.echo(f"preprocessing input: {summary['images_dir']} (labels: {summary['labels']})")
    typer.echo(f"NoW layout: {summary['now_dir']}")
