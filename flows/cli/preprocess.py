"""``wildface preprocess`` and ``wildface detect``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def preprocess(
    input: str = typer.Option(..., "--input", "-i", help="folder or s3:// prefix of photos"),
    output: str = typer.Option(..., "--output", "-o", help="folder or s3:// prefix for shards"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML file or configs/ name"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. preprocess.shard_size=500"),
    no_ray: bool = typer.Option(False, "--no-ray", help="process in this process (debugging)"),
) -> None:
    """Photos in, WebDataset shards + manifest out (runs the Prefect flow `preprocess`)."""
    from flows.preprocess import preprocess as flow

    summary = flow(input=input, output=output, config=config, overrides=list(set_),
                   use_ray=not no_ray)
    typer.echo(json.dumps(summary, indent=1))


def detect(
    images: list[Path] = typer.Argument(..., help="photos to look at"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML file or configs/ name"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. preprocess.detector=dlib-cnn"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every face in each photo: box, score and 68 landmarks in the photo's pixels (0-based,
    x right, y down), with the configured detector and landmarker."""
    from flows.config import load_config
    from preprocessing.decode import Rejected, decode_image
    from preprocessing.detect import make_detector
    from preprocessing.landmarks import make_landmarker

    cfg = load_config(config, list(set_)).preprocess
    detector, landmarker = make_detector(cfg), make_landmarker(cfg)
    results = []
    for path in images:
        entry: dict = {"image": str(path)}
        try:
            rgb = decode_image(path.read_bytes(), min_size=cfg.min_image_size,
                               max_pixels=cfg.max_pixels,
                               max_bytes=int(cfg.max_file_mb * 2**20)).rgb
            entry["faces"] = [
                face.to_dict() | {"landmarks": landmarker(rgb, face.box).round(2).tolist()}
                for face in detector(rgb)
            ]
        except (Rejected, OSError) as err:
            entry["error"] = str(err)
        results.append(entry)
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    for entry in results:
        if "error" in entry:
            typer.echo(f"{entry['image']}: {entry['error']}")
            continue
        typer.echo(f"{entry['image']}: {len(entry['faces'])} face(s)")
        for face in entry["faces"]:
            typer.echo(f"  box={face['box']} score={face['score']} "
                       f"landmarks[0..2]={face['landmarks'][:3]}")
