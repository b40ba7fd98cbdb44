"""Prefect flow ``evaluate``: score a model version on a NoW-layout dataset and record it.

1. **Dataset**: ``dataset`` (or ``evaluate_flow.dataset``) — real NoW when you have it, any
   NoW-layout folder — else a synthetic NoW-layout set rendered by ``wildface synth`` with
   ``evaluate_flow.synthetic_*`` (held-out seed; written once to ``OUT/synthetic`` and
   reused). The synthetic images get their ground-truth landmarks beside them as ``.pts``
   (the annotated-input convention of the preprocessing), so the faces are found exactly;
   real NoW images go through the detector.
2. **Predict** (:func:`predict_dataset`, also ``wildface evaluate predict``): per image the
   main face is found and cropped as in ``wildface reconstruct``, and the model's neutral mesh
   (expression, jaw and head pose zeroed) and its 7 NoW landmarks are written in the NoW
   layout (``recon.evaluation.predict.predict_now``).
   The baseline that knows nothing, the mean face (the face model's template, all codes
   zero, the same mesh for every image), is predicted beside it (``predictions-mean-face``).
3. **Score** both with the NoW protocol (``recon.evaluation.now.evaluate_now``), in parallel
   over scans (``evaluation.workers`` processes).
4. **Record** on the model version's MLflow run: metrics ``now_median``, ``now_mean``,
   ``now_std`` (mm; what ``promote`` reads), ``now_n_images``, ``now_n_missing``,
   ``now_n_failed``, the baseline's ``now_mean_face_median`` / ``now_mean_face_mean`` (which
   ``promote`` requires the model to beat), and the artifacts
   ``evaluation/now/cumulative_curve.png`` and ``metrics.json``; a registered version also
   gets the tags ``metric.now_*``.

:func:`evaluate_model` is the same without Prefect or MLflow logging (the ``pipeline`` flow
calls it and logs the metrics itself).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from infra.offline import apply_offline_env

apply_offline_env()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config import WildfaceConfig, load_config  # noqa: E402

METRIC_PREFIX = "now_"
BASELINE_PREFIX = "now_mean_face_"
DEFAULT_MODEL = "models:/wildface-deca@challenger"


# -- dataset -----------------------------------------------------------------------------------
def synthetic_dataset(out: str | Path, cfg: WildfaceConfig) -> Path:
    """A ``wildface synth`` set under ``out`` (rendered once) -> its NoW-layout folder."""
    from recon.synth import generate
    from recon.synth.generate import NOW_DIR, PARAMS_FILE

    out = Path(out)
    ec = cfg.evaluate_flow
    if not (out / PARAMS_FILE).is_file():
        synth = cfg.synth.model_copy(update={
            "identities": ec.synthetic_identities,
            "images_per_identity": ec.synthetic_images_per_identity,
            "seed": ec.synthetic_seed})
        generate(out, synth, cfg.face_model)
    return add_synthetic_landmarks(out / NOW_DIR, cfg)


def add_synthetic_landmarks(dataset: str | Path, cfg: WildfaceConfig) -> Path:
    """When ``dataset`` is the ``now/`` folder of a ``wildface synth`` set, write each image's
    ground-truth landmarks beside it as ``.pts`` (once); other datasets are left alone."""
    import numpy as np

    from recon.evaluation.now_io import image_list_path, read_image_list
    from recon.formats.landmarks_io import write_pts
    from recon.formats.files import atomic_write_bytes
    from recon.synth import load_params
    from recon.synth.generate import NOW_DIR, PARAMS_FILE

    dataset = Path(dataset)
    if dataset.name != NOW_DIR or not (dataset.parent / PARAMS_FILE).is_file():
        return dataset
    params = load_params(dataset.parent)["images"]
    root = dataset / cfg.evaluation.image_root
    for image in read_image_list(image_list_path(dataset, cfg.evaluation.split)):
        pts = (root / image.rel_path).with_suffix(".pts")
        key = f"{image.subject}/{Path(image.rel_path).stem}"
        if not pts.is_file() and key in params:
            atomic_write_bytes(pts, write_pts(np.asarray(params[key]["landmarks_px"])))
    return dataset


# -- predictions --------------------------------------------------------------------------------
def neutral_predictor(recon, cfg: WildfaceConfig):
    """``predict_neutral(image_path) -> (verts (V, 3), faces (F, 3), lmk7 (7, 3))`` of a loaded
    model (:class:`recon.inference.reconstruct.FaceReconstructor`): the main face, cropped as
    ``wildface reconstruct`` does (a ``.pts`` beside the image is used when
    ``preprocess.use_annotations``)."""
    from preprocessing.faces import FaceFinder, crop_face

    finder = FaceFinder(cfg.preprocess)

    def predict(path: Path):
        rgb = finder.decode(Path(path).read_bytes())
        pts = Path(path).with_suffix(".pts")
        faces, dropped = finder.find(rgb, pts.read_bytes() if cfg.preprocess.use_annotations
                                     and pts.is_file() else None)
        if not faces:
            raise ValueError("no face found" + (f" ({'; '.join(dropped)})" if dropped else ""))
        crop, _, _ = crop_face(rgb, faces[0].landmarks, recon.image_size, recon.crop_scale)
        codes = recon.encode(crop[None])
        verts, tris, now7 = recon.neutral(codes.shape)
        return verts[0], tris, now7[0]

    return predict


def mean_face_predictor(recon):
    """``predict_neutral`` of the baseline that knows nothing: the face model's template (all
    codes zero) for every image, whatever it shows."""
    import torch

    verts, tris, now7 = recon.neutral(torch.zeros(1, recon.model.flame.n_shape))

    def predict(path: Path):
        return verts[0], tris, now7[0]

    return predict


def predict_dataset(model: str, dataset: str | Path, out: str | Path, cfg: WildfaceConfig, *,
                    face_model: str | None = None, tracking_uri: str | None = None,
                    overwrite: bool = False, baseline_out: str | Path | None = None):
    """NoW-layout predictions of ``model`` (``--model`` forms) for ``dataset`` into ``out``,
    and the mean face's (:func:`mean_face_predictor`) into ``baseline_out`` when given.
    Returns (``PredictSummary``, the model's ``ModelInfo``)."""
    import tempfile

    from flows.registry import load_reconstructor
    from recon.devices import set_cpu_threads
    from recon.evaluation.predict import predict_now

    set_cpu_threads(cfg.reconstruct.threads)
    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        recon = load_reconstructor(model, face_model=face_model, directory=tmp,
                                   tracking_uri=tracking_uri, device=cfg.reconstruct.device)
    layout = dict(split=cfg.evaluation.split, image_root=cfg.evaluation.image_root,
                  overwrite=overwrite)
    summary = predict_now(neutral_predictor(recon, cfg), dataset, out, progress="evaluate",
                          **layout)
    if baseline_out is not None:
        predict_now(mean_face_predictor(recon), dataset, baseline_out, **layout)
    return summary, recon.info


def now_metrics(metrics: dict, baseline: dict | None = None) -> dict[str, float]:
    """The protocol's metrics.json (and the mean face's) -> the flat metrics logged to
    MLflow."""
    flat = {f"{METRIC_PREFIX}median": float(metrics["median"]),
            f"{METRIC_PREFIX}mean": float(metrics["mean"]),
            f"{METRIC_PREFIX}std": float(metrics["std"]),
            f"{METRIC_PREFIX}n_images": float(metrics["n_images"]),
            f"{METRIC_PREFIX}n_missing": float(metrics["n_missing"]),
            f"{METRIC_PREFIX}n_failed": float(metrics["n_failed"])}
    if baseline is not None:
        flat[f"{BASELINE_PREFIX}median"] = float(baseline["median"])
        flat[f"{BASELINE_PREFIX}mean"] = float(baseline["mean"])
    return flat


def evaluate_model(model_uri: str, dataset: str | Path | None, out: str | Path,
                   config: WildfaceConfig | None = None, tracking_uri: str | None = None
                   ) -> dict[str, float]:
    """Predict and score ``model_uri`` on ``dataset`` (None: the synthetic set) without
    Prefect or MLflow logging; artefacts in ``out/predictions`` and ``out/now`` (the mean
    face's in ``out/predictions-mean-face`` and ``out/now-mean-face``). Returns
    :func:`now_metrics`."""
    from recon.evaluation.now import evaluate_now

    cfg = config or load_config()
    out = Path(out)
    data = (add_synthetic_landmarks(dataset, cfg) if dataset
            else synthetic_dataset(out / "synthetic", cfg))
    predict_dataset(model_uri, data, out / "predictions", cfg, tracking_uri=tracking_uri,
                    overwrite=True, baseline_out=out / "predictions-mean-face")
    return now_metrics(
        evaluate_now(data, out / "predictions", out / "now", cfg.evaluation),
        evaluate_now(data, out / "predictions-mean-face", out / "now-mean-face", cfg.evaluation))


# -- the flow ------------------------------------------------------------------------------------
@task(name="now-dataset", cache_policy=NO_CACHE)
def dataset_task(dataset: str | None, out: str, cfg: WildfaceConfig) -> str:
    if dataset:
        if not Path(dataset).is_dir():
            raise FileNotFoundError(f"NoW-layout dataset not found: {dataset}")
        return str(add_synthetic_landmarks(dataset, cfg))
    return str(synthetic_dataset(Path(out) / "synthetic", cfg))


@task(name="now-predict", cache_policy=NO_CACHE)
def predict_task(model: str, dataset: str, out: str, cfg: WildfaceConfig,
                 tracking_uri: str | None) -> dict[str, Any]:
    predictions, baseline = Path(out) / "predictions", Path(out) / "predictions-mean-face"
    for folder in (predictions, baseline):
        if folder.exists():
            shutil.rmtree(folder)  # another model's predictions must not be reused
    summary, info = predict_dataset(model, dataset, predictions, cfg, tracking_uri=tracking_uri,
                                    baseline_out=baseline)
    get_run_logger().info("predicted %d images (%d failed) with %s", summary.written,
                          len(summary.failed), info.as_dict().get("uri"))
    return {"predictions": str(predictions), "baseline": str(baseline),
            "written": summary.written, "failed": summary.failed, "model": info.as_dict()}


@task(name="now-score", cache_policy=NO_CACHE)
def score_task(dataset: str, predictions: str, out: str, cfg: WildfaceConfig,
               name: str = "now") -> dict:
    from recon.evaluation.now import evaluate_now

    return evaluate_now(dataset, predictions, Path(out) / name, cfg.evaluation)


@task(name="now-log", cache_policy=NO_CACHE)
def log_task(model_source: dict, metrics: dict, out: str, tracking_uri: str,
             baseline: dict | None = None) -> dict[str, Any]:
    """Metrics and the curve onto the model version's run; tags on a registered version."""
    from mlflow.tracking import MlflowClient

    run_id = model_source.get("run_id")
    if not run_id:
        raise ValueError("the model has no MLflow run to log to (a local checkpoint?); "
                         "use `wildface evaluate predict` + `evaluate now` instead")
    client = MlflowClient(tracking_uri, tracking_uri)
    flat = now_metrics(metrics, baseline)
    for k, v in flat.items():
        client.log_metric(run_id, k, v)
    now_dir = Path(out) / "now"
    for name in ("cumulative_curve.png", "metrics.json"):
        client.log_artifact(run_id, str(now_dir / name), "evaluation/now")
    if model_source.get("registered_model") and model_source.get("version"):
        for k, v in flat.items():
            client.set_model_version_tag(model_source["registered_model"],
                                         model_source["version"], f"metric.{k}", f"{v:.6g}")
    return {"run_id": run_id, **flat}


@flow(name="evaluate", log_prints=True)
def evaluate(
    model: str = DEFAULT_MODEL,
    dataset: str | None = None,
    out: str = "runs/evaluate",
    config: str | None = None,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    cfg: WildfaceConfig | None = None,
) -> dict[str, Any]:
    """Predict with ``model`` (a registered version: ``models:/<name>@<alias>`` or
    ``models:/<name>/<N>``, or ``runs:/<id>``) on a NoW-layout ``dataset`` (None:
    ``evaluate_flow.dataset``, else the synthetic set), score it with the NoW protocol and
    log ``now_median`` / ``now_mean`` / ``now_std`` and the curve to the version's run.
    ``cfg`` (in-process) or ``config`` + ``overrides`` (deployments)."""
    from flows.tracking import resolve_tracking_uri

    cfg = cfg or load_config(config, overrides)
    uri = resolve_tracking_uri(cfg.tracking, services=cfg.services, given=tracking_uri)
    out_path = Path(out).resolve()
    data = dataset_task(dataset or cfg.evaluate_flow.dataset, str(out_path), cfg)
    predicted = predict_task(model, data, str(out_path), cfg, uri)
    metrics = score_task(data, predicted["predictions"], str(out_path), cfg)
    baseline = score_task(data, predicted["baseline"], str(out_path), cfg, "now-mean-face")
    logged = log_task(predicted["model"], metrics, str(out_path), uri, baseline)
    result = {"model": predicted["model"], "dataset": data, "metrics": logged,
              "failed_predictions": predicted["failed"], "out": str(out_path)}
    (out_path / "evaluate.json").write_text(json.dumps(result, indent=1))
    print(f"NoW on {data}: median {logged['now_median']:.3f} / mean {logged['now_mean']:.3f} / "
          f"std {logged['now_std']:.3f} mm (mean face: median "
          f"{logged['now_mean_face_median']:.3f} mm) -> run {logged['run_id']}")
    return result
