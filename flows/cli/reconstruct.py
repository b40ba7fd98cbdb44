"""``wildface reconstruct`` and ``wildface animate``: what users do with a trained model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.options import load_config_or_exit

MODEL_HELP = ("a checkpoint (.pt) or training folder, models:/<name>@<alias> (e.g. "
              "models:/wildface-deca@champion), models:/<name>/<N>, or runs:/<run id>")
FACE_MODEL_HELP = ("face model to run with ('demo-head', a FLAME .pkl or .npz); default: the "
                   "one recorded with the model (a different one is an error)")


def _fail(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def reconstruct(
    inputs: list[str] = typer.Argument(..., metavar="INPUT...",
                                       help="images, videos, folders or s3:// prefixes"),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="output folder or s3:// prefix"),
    ray: bool = typer.Option(False, "--ray", help="run as a Ray Data batch job (actor pool)"),
    aligned: bool = typer.Option(False, "--aligned", help="each input is a square face crop: "
                                 "resized whole to the model's input, no detection; adds "
                                 "displacement.npy and landmarks2d in the input's pixels"),
    face_model: Optional[str] = typer.Option(None, "--face-model", help=FACE_MODEL_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow server"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML file or configs/ name"),
    overrides: Optional[list[str]] = typer.Option(None, "--set",
                                                  help="override, e.g. reconstruct.batch_size=4"),
) -> None:
    """Per face: FLAME parameters (JSON, with the model version), coarse and detailed meshes
    (OBJ with UVs, albedo texture, normal and displacement maps), a visual grid; for videos a
    per-frame parameter table (Parquet). One folder per input, resumable: finished inputs
    are skipped; failures are listed with their reason in OUT/summary.json. With --aligned,
    every input is taken as a ready face crop (docs/reconstruct.md)."""
    cfg = load_config_or_exit(config, overrides)
    from flows.reconstruct import run_batch
    from infra.storage import OutputLocked
    from recon.inference.reconstruct import FaceModelMismatch

    def progress(done: int, total: int, result: dict) -> None:
        reason = f" ({result['reason']})" if result.get("reason") else ""
        typer.echo(f"[{done}/{total}] {result['name']}: {result['status']}{reason}")

    try:
        summary = run_batch(inputs, out, model, cfg, use_ray=ray, face_model=face_model,
                            tracking_uri=tracking_uri or cfg.tracking.uri, progress=progress,
                            aligned=aligned)
    except (FaceModelMismatch, FileNotFoundError, ValueError, OutputLocked) as err:
        _fail(str(err))
    typer.echo(json.dumps({k: summary[k] for k in ("inputs", "processed", "counts", "seconds")}))
    if summary["failures"]:
        typer.echo(f"{len(summary['failures'])} failure(s), see {summary['out']}/summary.json")


def animate(
    source: Path = typer.Argument(..., help="image of the face to animate (main face), or a "
                                  "params.json written by `wildface reconstruct`"),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    driver: Optional[Path] = typer.Option(
        None, "--driver", "-d", help="expression source: an image, a video, or a parameter "
        "table (.parquet/.csv/.json/.jsonl with exp and jaw or pose columns)"),
    expression: Optional[str] = typer.Option(
        None, "--expression", "-e", help="named controls, e.g. smile=1.5,jaw_open=0.3 "
        "(`--list-controls` prints the model's); animated neutral -> pose -> neutral"),
    frames: Optional[int] = typer.Option(None, "--frames", min=2,
                                         help="--expression: frames (default config)"),
    fps: Optional[float] = typer.Option(None, "--fps", help="frame rate (default: the driver "
                                        "video's, else reconstruct.animation_fps)"),
    obj_sequence: bool = typer.Option(False, "--obj-sequence", help="also one OBJ per frame"),
    gif: bool = typer.Option(True, "--gif/--no-gif", help="also write animation.gif"),
    list_controls: bool = typer.Option(False, "--list-controls", help="print the controls and exit"),
    face_model: Optional[str] = typer.Option(None, "--face-model", help=FACE_MODEL_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow server"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML file or configs/ name"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="override, e.g. "
                                                  "reconstruct.animation_fps=30"),
) -> None:
    """Keep SOURCE's identity, albedo, light and detail code; take expression and jaw pose
    from DRIVER (or named controls); render the sequence with expression-dependent detail
    (shape and textured) to PNG frames, animation.mp4 and animation.gif."""
    cfg = load_config_or_exit(config, overrides)
    import tempfile

    from flows.registry import load_reconstructor
    from recon.inference import animate as anim
    from recon.devices import set_cpu_threads
    from recon.inference.reconstruct import FaceModelMismatch

    set_cpu_threads(cfg.reconstruct.threads)
    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        try:
            recon = load_reconstructor(model, face_model=face_model, directory=tmp,
                                       tracking_uri=tracking_uri or cfg.tracking.uri,
                                       device=cfg.reconstruct.device,
                                       refine=cfg.reconstruct.refine)
        except (FaceModelMismatch, FileNotFoundError, ValueError) as err:
            _fail(str(err))
    n_exp = recon.model.flame.n_exp
    if list_controls:
        typer.echo("\n".join(anim.control_names(recon.expression_names, n_exp)))
        return
    if (driver is None) == (expression is None):
        _fail("give exactly one of --driver or --expression", 2)
    try:
        codes, background = _source_codes(recon, source, cfg)
        rate = fps or cfg.reconstruct.animation_fps
        if expression is not None:
            exp, jaw = anim.controls_to_codes(anim.parse_controls(expression),
                                              recon.expression_names, n_exp)
            drive = anim.ramp(exp, jaw, frames or cfg.reconstruct.animation_frames)
        else:
            drive, driver_fps = _drive(recon, driver, cfg, n_exp)
            rate = fps or driver_fps or rate
        result = anim.write_animation(
            recon, anim.animate_codes(codes, drive), out, rate, obj_sequence=obj_sequence,
            gif=gif, batch_size=cfg.reconstruct.batch_size, background=background)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"{result['frames']} frames -> {result['video']}"
               + (f", {result['gif']}" if "gif" in result else "") + f" ({out / 'frames'})")


def _main_face(recon, path: Path, cfg):
    """(crop (S, S, 3) uint8, crop landmarks) of the main face of a photo."""
    from preprocessing.faces import FaceFinder, crop_face

    finder = FaceFinder(cfg.preprocess)
    rgb = finder.decode(path.read_bytes())
    pts = path.with_suffix(".pts")
    faces, dropped = finder.find(rgb, pts.read_bytes() if cfg.preprocess.use_annotations
                                 and pts.is_file() else None)
    if not faces:
        raise ValueError(f"{path}: no face found" + (f" ({'; '.join(dropped)})" if dropped else ""))
    return crop_face(rgb, faces[0].landmarks, recon.image_size, recon.crop_scale)


def _source_codes(recon, source: Path, cfg):
    """The source's codes (batch of 1) and its crop as the background (None for params.json)."""
    from recon.inference.reconstruct import codes_from_params

    if not source.is_file():
        raise FileNotFoundError(f"source not found: {source}")
    if source.suffix.lower() == ".json":
        return codes_from_params(json.loads(source.read_text()), recon.device), None
    crop, _, _ = _main_face(recon, source, cfg)
    return recon.encode(crop[None]), crop


def _drive(recon, driver: Path, cfg, n_exp: int):
    """A driver file -> (Drive, frame rate or None)."""
    import numpy as np

    from recon.inference import animate as anim
    from recon.inference.video import is_video, read_frames, video_fps

    if not driver.is_file():
        raise FileNotFoundError(f"driver not found: {driver}")
    if driver.suffix.lower() in (".parquet", ".csv", ".json", ".jsonl"):
        return anim.read_table(driver, n_exp), None
    if not is_video(driver):
        crop, _, _ = _main_face(recon, driver, cfg)
        return anim.drive_from_codes(recon.encode(crop[None])), None
    from preprocessing.faces import FaceFinder, crop_face

    finder = FaceFinder(cfg.preprocess)
    rc = cfg.reconstruct
    crops = []
    for frame in read_frames(driver, rc.video_every, rc.video_max_frames):
        faces, _ = finder.find(frame)
        if faces:  # frames without a face are left out of the animation
            crops.append(crop_face(frame, faces[0].landmarks, recon.image_size,
                                   recon.crop_scale)[0])
    if not crops:
        raise ValueError(f"{driver}: no face in any frame")
    exps, jaws = [], []
    for start in range(0, len(crops), rc.batch_size):
        d = anim.drive_from_codes(recon.encode(np.stack(crops[start:start + rc.batch_size])))
        exps.append(d.exp)
        jaws.append(d.jaw)
    import torch

    return (anim.Drive(exp=torch.cat(exps), jaw=torch.cat(jaws)),
            video_fps(driver) / rc.video_every)
