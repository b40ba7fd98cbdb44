"""``wildface evaluate``: the NoW benchmark protocol and model promotion."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.options import load_config_or_exit

app = typer.Typer(help="NoW evaluation (scan-to-mesh error, mm) and champion promotion.",
                  no_args_is_help=True)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config (a path or a name in configs/)")
SetOption = typer.Option(None, "--set", help="override, e.g. --set evaluation.refine_iters=10")


def _config(config: Optional[str], overrides: Optional[list[str]], extra: dict):
    """The config with the command's own options (``extra``) after ``--set``."""
    return load_config_or_exit(config, list(overrides or []) + [f"{k}={v}" for k, v in extra.items()])


@app.command("now")
def now(
    dataset: Path = typer.Option(..., "--dataset", help="NoW-layout dataset folder "
                                 "(imagepaths*.txt, scans/, scans_lmks_onlypp/)"),
    predictions: Path = typer.Option(..., "--predictions", help="<subject>/<challenge>/<image>.obj + .npy/.txt"),
    out: Path = typer.Option(..., "--out", help="output folder for metrics.json and artefacts"),
    split: Optional[str] = typer.Option(None, "--split", help="val or test (default: config, val)"),
    metrical: Optional[bool] = typer.Option(None, "--metrical/--no-metrical",
                                            help="metrical variant: no scale in the alignment"),
    workers: Optional[int] = typer.Option(None, "--workers", help="parallel processes"),
    config: Optional[str] = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Score predictions with the NoW protocol; write metrics.json (median, mean, std in mm,
    per challenge), distances.parquet and the cumulative error curve (CSV, PNG). Exit status
    0 when every present prediction was scored (missing ones are counted, as the official
    evaluation does), 1 when some failed (malformed, non-finite...: listed, the figures are
    over the others) or nothing could be scored, 2 for a bad config."""
    extra = {k: v for k, v in (("evaluation.split", split),
                               ("evaluation.metrical", None if metrical is None else str(metrical).lower()),
                               ("evaluation.workers", workers)) if v is not None}
    cfg = _config(config, overrides, extra)
    from recon.evaluation.now import evaluate_now
    from recon.evaluation.now_io import NowFormatError

    try:
        m = evaluate_now(dataset, predictions, out, cfg.evaluation)
    except NowFormatError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"NoW {m['split']}{' (metrical)' if m['metrical'] else ''}: "
               f"median {m['median']:.3f} / mean {m['mean']:.3f} / std {m['std']:.3f} mm "
               f"({m['n_images']} images, {m['n_missing']} missing, {m['n_failed']} failed)")
    for name, c in m["challenges"].items():
        typer.echo(f"  {name:<10} median {c['median']:.3f} / mean {c['mean']:.3f} / std {c['std']:.3f} mm")
    typer.echo(f"wrote {out / 'metrics.json'}")
    if m["failed"]:  # scored without them: the exit status says the figures are partial
        typer.echo(f"{m['n_failed']} prediction(s) failed:", err=True)
        for f in m["failed"]:
            typer.echo(f"  {f['image']}: {f['reason']}", err=True)
        raise typer.Exit(1)


@app.command("predict")
def predict(
    model: str = typer.Option(..., "--model", "-m", help="a checkpoint or training folder, "
                              "models:/<name>@<alias>, models:/<name>/<N> or runs:/<run id>"),
    dataset: Path = typer.Option(..., "--dataset", help="NoW-layout dataset folder "
                                 "(imagepaths*.txt and the images under evaluation.image_root)"),
    out: Path = typer.Option(..., "--out", help="predictions folder (<subject>/<challenge>/<image>.obj + .npy)"),
    split: Optional[str] = typer.Option(None, "--split", help="val or test (default: config, val)"),
    face_model: Optional[str] = typer.Option(None, "--face-model", help="face model (default: "
                                             "the one recorded with the model)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI"),
    overwrite: bool = typer.Option(False, "--overwrite", help="redo existing predictions"),
    config: Optional[str] = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Write NoW-layout predictions from a model: per image the neutral mesh (expression,
    jaw and head pose zeroed) and its 7 landmarks; score them with `evaluate now`."""
    cfg = _config(config, overrides, {"evaluation.split": split} if split else {})
    from flows.evaluate import add_synthetic_landmarks, predict_dataset
    from recon.inference.reconstruct import FaceModelMismatch

    try:
        summary, info = predict_dataset(model, add_synthetic_landmarks(dataset, cfg), out, cfg,
                                        face_model=face_model,
                                        tracking_uri=tracking_uri or cfg.tracking.uri,
                                        overwrite=overwrite)
    except (FaceModelMismatch, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{summary.written} written, {summary.skipped} kept, {len(summary.failed)} failed "
               f"-> {out} (model {info.as_dict().get('uri')})")
    for image, reason in summary.failed:
        typer.echo(f"  {image}: {reason}")


@app.command("synthetic-now")
def synthetic_now(
    out: Path = typer.Option(..., "--out", help="writes OUT/dataset and OUT/predictions"),
    subjects: int = typer.Option(2, "--subjects", min=1),
    images_per_challenge: int = typer.Option(1, "--images-per-challenge", min=1),
    deformation_mm: float = typer.Option(1.0, "--deformation-mm", min=0.0,
                                         help="amplitude of the known shape error of the predictions"),
    subdivision: int = typer.Option(2, "--subdivision", min=1, help="scan density (5: ~125k vertices)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a small synthetic NoW-layout dataset and predictions with known answers
    (procedural heads; not real NoW data)."""
    from recon.evaluation.now_synthetic import write_synthetic_now

    s = write_synthetic_now(out, n_subjects=subjects, images_per_challenge=images_per_challenge,
                            deformation_mm=deformation_mm, subdivision=subdivision, seed=seed)
    typer.echo(f"dataset: {s.dataset_dir}\npredictions: {s.predictions_dir}\nimages: {len(s.images)}")


@app.command("promote")
def promote(
    version: Optional[str] = typer.Option(None, "--version", help="challenger version "
                                          "(default: the version with the challenger alias)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI"),
    config: Optional[str] = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Run the promote flow: the challenger becomes champion if its metric beats the
    champion's by the configured margin (or there is no champion)."""
    cfg = _config(config, overrides, {"tracking.uri": tracking_uri} if tracking_uri else {})
    from flows.promote import promote as promote_flow

    decision = promote_flow(cfg, version=version)
    typer.echo(json.dumps(decision, indent=2))
