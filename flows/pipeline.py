"""Prefect flow ``pipeline``: preprocess -> train (coarse -> detail) -> evaluate -> register,
and the demo that runs it on this machine (``wildface demo``).

Evaluation: the NoW-protocol ``evaluate`` flow of the evaluation package when it is
installed (``flows.evaluate.evaluate_model``, called with the logged model's URI); until
then, and always for a ``wildface synth`` folder given as ``heldout``, the held-out
neutral-shape error (:func:`heldout_shape_error`, computed by
:mod:`recon.evaluation.heldout`: the logged model's predicted neutral mesh vs the ground truth
of identities it never saw, after a similarity alignment over the face region, in mm). The
metrics go to the detail run (which holds the model) and the parent run, and become tags of
the registered version.

Demo decisions (``wildface demo``, :func:`run_demo`): the local services of ``wildface
services`` are used when they run, else started (``--services``, the default: Prefect server +
process worker + MLflow server on loopback, left running afterwards so their UIs can be
browsed; ``wildface services down`` stops them). With ``--no-services``, or when they cannot
start (a port taken), the flows run on an ephemeral Prefect API and MLflow writes to
``OUT/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db`` shows it), so a
fresh machine needs no server either way.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from infra.offline import apply_offline_env

apply_offline_env()

import numpy as np  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402

from flows import tracking  # noqa: E402
from flows.config import WildfaceConfig  # noqa: E402
from flows.train import (log_model_task, register_task, stage_config,  # noqa: E402
                         train_stages)

# Real photos that registry packages ship (no download): scikit-image's astronaut (public
# domain), one identity of one image; the preprocessing detects and labels it like any other.
REAL_PHOTOS = {"astronaut": ("skimage", "astronaut")}


# -- evaluation -------------------------------------------------------------------------------
def heldout_shape_error(model_uri: str, heldout: str, cfg: WildfaceConfig,
                        mesh_dir: Path | None = None, n_meshes: int = 4,
                        tracking_uri: str | None = None) -> dict[str, float]:
    """Neutral-shape error of a logged/registered model on a held-out synthetic set
    (:func:`recon.evaluation.heldout.heldout_shape_errors`: its metrics, in mm).

    The model loads through wildface's own loader (:func:`flows.registry.load_reconstructor`:
    files checked against their recorded sha256, weights only; the pyfunc's code file is never
    run). Every image of ``heldout`` (a ``wildface synth`` folder of identities not trained
    on) is cropped at the evaluation scale and encoded as reconstruction does it (with the
    model's test-time refinement when ``model.refine.steps`` > 0). ``mesh_dir``: the first
    ``n_meshes`` predictions are written there as OBJ (posed coarse mesh and neutral mesh).
    """
    import tempfile

    from flows.registry import load_reconstructor
    from recon.evaluation.heldout import face_region, heldout_shape_errors
    from recon.synth import iter_samples, load_params
    from recon.training.data import CropAugment, SampleStore, iter_eval_batches

    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        recon = load_reconstructor(model_uri, directory=tmp, tracking_uri=tracking_uri,
                                   device=cfg.reconstruct.device)
    store = SampleStore.from_samples(iter_samples(heldout))
    d = cfg.data
    augment = CropAugment(out_size=cfg.model.image_size, scale_min=d.scale_min,
                          scale_max=d.scale_max, shift=d.shift, eval_scale=d.eval_scale)
    errors = heldout_shape_errors(recon.model, iter_eval_batches(store, augment, batch_size=8),
                                  load_params(heldout), face_region(cfg.face_model),
                                  encode=recon.encode, mesh_dir=mesh_dir, n_meshes=n_meshes)
    return errors.metrics()


@task(name="evaluate")
def evaluate_task(cfg: WildfaceConfig, model_uri: str, heldout: str | None, out_dir: str,
                  tracking_uri: str, run_ids: list[str]) -> dict[str, float]:
    """Evaluate the logged model and record the metrics in ``run_ids`` (detail + parent)."""
    from mlflow.tracking import MlflowClient

    from flows.evaluate import evaluate_model

    logger = get_run_logger()
    metrics: dict[str, float] = {}
    if heldout is not None:
        try:
            metrics.update(evaluate_model(
                model_uri=model_uri, dataset=str(Path(heldout) / "now"),
                out=str(Path(out_dir) / "now"), config=cfg, tracking_uri=tracking_uri))
        except Exception as err:  # noqa: BLE001 - recorded; promotion needs the metric anyway
            logger.error("NoW evaluation failed (%s: %s): the version gets no now_* metrics",
                         type(err).__name__, err)
        metrics.update(heldout_shape_error(model_uri, heldout, cfg, Path(out_dir) / "meshes",
                                           tracking_uri=tracking_uri))
    if not metrics:
        logger.warning("no held-out data given: nothing evaluated")
        return metrics
    client = MlflowClient(tracking_uri, tracking_uri)
    for run_id in run_ids:
        for k, v in metrics.items():
            client.log_metric(run_id, k, float(v))
    logger.info("evaluation: %s", {k: round(v, 3) for k, v in metrics.items()})
    return metrics


# -- the flow ----------------------------------------------------------------------------------
@flow(name="pipeline", log_prints=True)
def pipeline(
    input: str,
    out: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    coarse_overrides: list[str] | None = None,
    detail_overrides: list[str] | None = None,
    heldout: str | None = None,
    use_ray_preprocess: bool = True,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Photos under ``input`` -> preprocessed shards (``out/data``) -> coarse and detail
    stages on Ray Train (``out/train``) -> evaluation (``out/eval``) -> registered model
    version with the ``challenger`` alias.

    ``config`` + ``overrides`` apply to every step, ``coarse_overrides`` /
    ``detail_overrides`` to one stage; all are validated before any work starts.
    ``heldout``: a ``wildface synth`` folder of identities not in ``input`` to evaluate on.
    """
    from flows.preprocess import preprocess

    cfg_c = stage_config(config, overrides, coarse_overrides)
    cfg_d = stage_config(config, overrides, detail_overrides)
    if heldout is not None and not (Path(heldout) / "params.json").is_file():
        raise ValueError(f"heldout: {heldout} is not a `wildface synth` folder (no params.json)")
    out_path = Path(out).resolve()
    data = str(out_path / "data")
    summary = preprocess(input=input, output=data, config=config, overrides=overrides,
                         use_ray=use_ray_preprocess)
    uri = tracking.resolve_tracking_uri(cfg_d.tracking, out_path, cfg_d.services,
                                       given=tracking_uri)
    with tracking.parent_run(uri, cfg_d.tracking.experiment, "pipeline",
                             cfg_d.model_dump(mode="json")) as parent:
        stages = train_stages(cfg_c, cfg_d, data, str(out_path / "train"), uri, parent)
        model_uri = log_model_task(cfg_d, uri, stages["coarse"], stages["detail"])
        metrics = evaluate_task(cfg_d, model_uri, heldout, str(out_path / "eval"), uri,
                                [stages["detail"]["mlflow_run_id"], parent])
        version = register_task(cfg_d, uri, model_uri, stages["coarse"], stages["detail"],
                                data, metrics)
    return {"preprocess": summary, "coarse": stages["coarse"], "detail": stages["detail"],
            "evaluation": metrics, "model": version, "tracking_uri": uri,
            "mlflow_ui": tracking.ui_hint(uri), "out": str(out_path)}


# -- the demo ----------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def add_real_photos(input_dir: Path) -> list[str]:
    """Copy the registry-shipped photos into ``input_dir/<identity>/`` (one per identity)."""
    import importlib

    from PIL import Image

    added = []
    for identity, (module, name) in REAL_PHOTOS.items():
        try:
            image = getattr(importlib.import_module(f"{module}.data"), name)()
        except Exception as err:  # noqa: BLE001 - an optional photo only narrows the demo
            _say(f"skipping real photo {module}.{name}: {err}")
            continue
        (input_dir / identity).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image)[..., :3]).save(input_dir / identity / f"{name}.png")
        added.append(f"{identity}/{name}.png")
    return added


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy the synth images (with their .pts / .mask.png side files) into the input."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copy2(path, target)


def run_demo(out: str | Path, config: str | None = "demo", overrides: list[str] | None = None,
             coarse_steps: int | None = None, detail_steps: int | None = None,
             heldout_identities: int = 4) -> dict[str, Any]:
    """The whole chain on this machine (see the module doc); prints where to look. The
    services, if any, are chosen before Prefect is imported (:func:`use_services`)."""
    import os

    from flows.config import load_config
    from infra import services
    from recon.devices import set_cpu_threads
    from recon.synth import generate

    started = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config, overrides)  # validate before any work
    set_cpu_threads()
    uri = tracking.resolve_tracking_uri(cfg.tracking, out, cfg.services)
    if uri.startswith("sqlite:///"):
        _say(f"no MLflow server: MLflow store in {uri[len('sqlite:///'):]}")
    if not os.environ.get("PREFECT_API_URL"):
        _say("no Prefect server: flows run on an ephemeral Prefect API")

    synth_dir, heldout_dir, input_dir = out / "synth", out / "heldout", out / "input"
    if not (synth_dir / "params.json").is_file():
        _say(f"rendering the synthetic training set ({cfg.synth.identities} identities x "
             f"{cfg.synth.images_per_identity} images) ...")
        generate(synth_dir, cfg.synth, cfg.face_model,
                 progress=lambda done, total: done % 24 == 0 and _say(f"  rendered {done}/{total}"))
    if not (heldout_dir / "params.json").is_file():
        _say(f"rendering {heldout_identities} held-out identities ...")
        held = cfg.synth.model_copy(update={"identities": heldout_identities,
                                            "images_per_identity": 3,
                                            "seed": cfg.synth.seed + 10_000})
        generate(heldout_dir, held, cfg.face_model)
    _copy_tree(synth_dir / "images", input_dir)
    photos = add_real_photos(input_dir)
    _say(f"input: {input_dir} (synthetic identities + real photos {photos})")

    stage_sets = {"coarse": [f"train.steps={coarse_steps}"] if coarse_steps else [],
                  "detail": [f"train.steps={detail_steps}"] if detail_steps else []}
    _say("pipeline: preprocess -> train coarse -> train detail -> evaluate -> register")
    result = pipeline(input=str(input_dir), out=str(out), config=config, overrides=overrides,
                      coarse_overrides=stage_sets["coarse"], detail_overrides=stage_sets["detail"],
                      heldout=str(heldout_dir))
    _say("gate: does the model beat the mean face (and any champion) on held-out images?")
    from flows.promote import promote

    decision = promote(cfg=cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"uri": result["tracking_uri"]})}), version=str(result["model"]["version"]))
    minutes = (time.perf_counter() - started) / 60
    ev = result["evaluation"]
    _say(f"done in {minutes:.1f} min")
    print("\nWhere to look:")
    print(f"  MLflow:        {result['mlflow_ui']}")
    print(f"  model:         {result['model']['uri']} (alias "
          f"{cfg.tracking.alias}: models:/{result['model']['name']}@{cfg.tracking.alias})")
    print(f"  held-out error: {ev.get('heldout_shape_error_median_mm', float('nan')):.2f} mm "
          f"median (mean shape: {ev.get('heldout_mean_shape_error_mm', float('nan')):.2f} mm)")
    if "now_median" in ev:
        print(f"  NoW protocol:  {ev['now_median']:.2f} mm median on {int(ev['now_n_images'])} "
              f"held-out images ({out / 'eval' / 'now'})")
    print(f"  figures:       {out / 'train' / 'coarse' / 'figures'}, "
          f"{out / 'train' / 'detail' / 'figures'}")
    print(f"  meshes:        {out / 'eval' / 'meshes'}")
    print(f"  checkpoints:   {out / 'train' / 'coarse' / 'checkpoints'}, "
          f"{out / 'train' / 'detail' / 'checkpoints'}")
    if os.environ.get("PREFECT_API_URL"):
        print(f"  Prefect UI:    {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    if cfg.services.ray and os.environ.get("RAY_ADDRESS") == services.ray_address(cfg.services):
        print(f"  Ray dashboard: {services.urls(cfg.services)['ray']}")
    print("\n" + gate_sentence(decision))
    result["minutes"], result["promotion"] = minutes, decision
    return result


def gate_sentence(decision: dict) -> str:
    """One plain sentence on a promotion decision (:class:`flows.promote.PromotionDecision`
    as a dict): did the model learn anything the mean face does not know, and what the gate
    did."""
    ch, base = decision.get("challenger_value"), decision.get("baseline_value")
    metric = decision.get("metric", "the metric")
    if ch is None or base is None or ch != ch or base != base:
        return f"Verdict: the gate could not judge the model ({decision['reason']})."
    better = ch < base if decision.get("lower_is_better", True) else ch > base
    if not better:
        return (f"Verdict: the model is no better than the mean face on held-out images "
                f"({metric} {ch:.3g} vs {base:.3g}): it has learned nothing the face model's "
                "template does not already know, and the gate refused it; train longer or on "
                "more data.")
    did = ("promoted it to champion" if decision["promoted"]
           else f"did not promote it ({decision['reason']})")
    return (f"Verdict: the model beats the mean face on held-out images ({metric} {ch:.3g} vs "
            f"{base:.3g}): it learned something the template does not know, and the gate {did}.")
