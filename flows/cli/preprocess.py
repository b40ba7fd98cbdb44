"""``wildface preprocess`` and ``wildface detect``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.options import load_config_or_exit


def preprocess(
    input: list[str] = typer.Option(
        ..., "--input", "-i", help="folder or s3:// prefix of photos, or NAME=ROOT of a dataset "
        "(vggface2, celeba, aflw, bupt, voxceleb2, folders); repeat to mix datasets"),
    format: Optional[str] = typer.Option(
        None, "--format", "-f", help="dataset layout of a plain --input ROOT (default folders)"),
    output: str = typer.Option(..., "--output", "-o", help="folder or s3:// prefix for shards"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML file or configs/ name"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. preprocess.shard_size=500"),
    no_ray: bool = typer.Option(False, "--no-ray", help="process in this process (debugging)"),
) -> None:
    """Photos in, WebDataset shards + manifest out (runs the Prefect flow `preprocess`)."""
    load_config_or_exit(config, set_)  # a mistake: one line here, not a failed flow run
    from flows.preprocess import preprocess as flow
    from infra.storage import OutputLocked

    from preprocessing.datasets import LayoutError, parse_inputs

    try:
        parse_inputs(list(input), format)  # a mistake: one line here, not a failed flow run
    except LayoutError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    try:
        summary = flow(input=list(input), output=output, config=config, overrides=list(set_),
                       use_ray=not no_ray, format=format)
    except (OutputLocked, LayoutError) as err:  # another run writes the output; a bad tree
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(summary, indent=1))
    if summary["retry_later"]:
        typer.echo(f"error: {summary['retry_later']} photo(s) hit transient errors (out of memory, "
                   "storage) and are left for the next run: run the same command again", err=True)
        raise typer.Exit(1)


def detect(
    images: list[Path] = typer.Argument(..., help="photos to look at"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML file or configs/ name"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. preprocess.detector=dlib-cnn"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every face in each photo as the preprocessing and reconstruction see it
    (:mod:`preprocessing.faces`): box, score and 68 landmarks in the photo's pixels (0-based,
    x right, y down), with the configured detector and landmarker; ``dropped``: why other
    faces were left out. Exit status 1 when no photo could be read."""
    from preprocessing.decode import Rejected
    from preprocessing.faces import FaceFinder

    finder = FaceFinder(load_config_or_exit(config, set_).preprocess)
    results = []
    for path in images:
        entry: dict = {"image": str(path)}
        try:
            faces, dropped = finder.find(finder.decode(path.read_bytes()))
            entry["faces"] = [{"box": [round(float(v), 2) for v in face.box], "score": face.score,
                               "landmarks": face.landmarks.round(2).tolist()} for face in faces]
            if dropped:
                entry["dropped"] = dropped
        except (Rejected, OSError) as err:
            entry["error"] = str(err)
        results.append(entry)
    if as_json:
        typer.echo(json.dumps(results, indent=1))
    else:
        for entry in results:
            if "error" in entry:
                typer.echo(f"{entry['image']}: {entry['error']}")
                continue
            typer.echo(f"{entry['image']}: {len(entry['faces'])} face(s)")
            for face in entry["faces"]:
                typer.echo(f"  box={face['box']} score={face['score']} "
                           f"landmarks[0..2]={face['landmarks'][:3]}")
    if not any("faces" in entry for entry in results):
        typer.echo(f"error: none of the {len(results)} photo(s) could be read", err=True)
        raise typer.Exit(1)
