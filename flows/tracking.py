"""MLflow tracking and registry of wildface training runs.

- Runs: one parent run per pipeline (or per ``train`` flow) and one nested run per stage
  (``coarse``, ``detail``) holding the full resolved config as params, the dataset's
  manifest hash and shard list, the code version, system figures, every loss term and the
  step time as metrics, and every ``tracking.figure_every`` steps a DECA-style figure.
  The driver creates the stage run; the rank-0 Ray Train worker logs into it by run id
  (:class:`StepLogger`), so metrics need no round trip through Ray.
- Registry: the full coarse+detail reconstructor is ONE registered model, a pyfunc
  (:class:`flows.reconstructor.Reconstructor`) whose artifacts are the detail checkpoint, the resolved config and
  the face model's cached arrays; each new version gets the ``tracking.alias`` alias
  (``challenger``) and tags naming its data, metrics and the sha256 of its files (checked at
  every load, :mod:`flows.model_uri`). Aliases, never stages; every move of one records who,
  when and the previous holder (:func:`set_alias`).

Where runs go (:func:`resolve_tracking_uri`): ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
else the MLflow server of ``wildface services`` when it answers, else a sqlite store in the
output folder (``sqlite:///OUT/mlflow.db``, artifacts in ``OUT/mlartifacts``).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from flows.model_uri import (CODE_FILE, MLMODEL, alias_tag, assert_finite_model,
                             model_checksums, resolve_model, services_mlflow_uri)
from infra.config import ServicesConfig, TrackingConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
# MLflow models-from-code file of the registered pyfunc (no pickled Python objects).
RECONSTRUCTOR_FILE = Path(__file__).resolve().parent / "reconstructor.py"
FIGURE_ROWS = ("input", "landmarks 2D (green target, red predicted)", "landmarks 3D",
               "coarse shape", "detailed shape", "textured render")


# -- where runs go ------------------------------------------------------------------------
def absolute_uri(uri: str) -> str:
    """A relative sqlite database (``sqlite:///runs.db``) made absolute, from this process's
    working folder (the training workers log to it from folders of their own); any other
    URI as it is."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def resolve_tracking_uri(cfg: TrackingConfig, out_dir: str | os.PathLike,
                         services: ServicesConfig | None = None) -> str:
    """``cfg.uri`` > ``$MLFLOW_TRACKING_URI`` > services' server > sqlite in ``out_dir``
    (:func:`absolute_uri`)."""
    given = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if given:
        return absolute_uri(given)
    served = services_mlflow_uri(services)
    if served:
        return served
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def ui_hint(uri: str) -> str:
    """Where a person looks at the runs of ``uri``."""
    if uri.startswith("http"):
        return uri
    return f"mlflow ui --backend-store-uri {uri} --port 5000  (then http://127.0.0.1:5000)"


def setup(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` (tracking and registry) and return the experiment id, created
    with an artifact folder next to a sqlite database (else MLflow would use ./mlruns)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently
        return client.get_experiment_by_name(experiment).experiment_id


# -- what a run records ---------------------------------------------------------------------
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> ``{"train.lr": "0.0001", ...}`` (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return out


def code_version() -> str:
    """git sha of the working tree (``+dirty`` when modified), else the package version."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "wildface-" + version("wildface")
        except PackageNotFoundError:
            return "unknown"


def system_figures() -> dict[str, str]:
    """Machine and library versions of the run (tags)."""
    import ray
    import torch

    figures = {
        "system.python": platform.python_version(),
        "system.platform": platform.platform(),
        "system.cpu_count": str(os.cpu_count()),
        "system.torch": torch.__version__,
        "system.ray": ray.__version__,
        "system.mlflow": mlflow.__version__,
        "system.cuda_devices": str(torch.cuda.device_count() if torch.cuda.is_available() else 0),
    }
    if torch.cuda.is_available():
        figures["system.gpu"] = torch.cuda.get_device_name(0)
    try:
        import psutil

        figures["system.memory_gb"] = f"{psutil.virtual_memory().total / 2**30:.1f}"
    except ImportError:
        pass
    return figures


def dataset_summary(data_root: str, split: str = "train") -> dict[str, Any]:
    """Manifest hash (sha256 of ``manifest.parquet``, else of ``identities.json``), the
    shard list and the data root of a preprocessing output."""
    from infra import storage
    from preprocessing.manifest import IDENTITIES_FILE, MANIFEST_FILE

    digest = "none"
    for name in (MANIFEST_FILE, IDENTITIES_FILE):
        uri = storage.join(data_root, name)
        if storage.exists(uri):
            digest = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
            break
    shards = sorted(u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(data_root, "shards"))
                    if u.endswith(".tar"))
    return {"data_root": str(data_root), "manifest_sha256": digest,
            "shards": [s for s in shards if s.startswith(f"{split}-")], "all_shards": shards}


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Params in chunks of 100 (MLflow's batch limit), values cut to its 6000 characters."""
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def start_stage_run(client: MlflowClient, experiment_id: str, stage: str, config: Mapping,
                    dataset: Mapping[str, Any], parent_run_id: str | None) -> str:
    """Create the nested MLflow run of a stage with its config, data and code; returns its id
    (ended by :func:`end_run`)."""
    tags = {"wildface.stage": stage, "wildface.code_version": code_version(),
            "wildface.data_root": dataset["data_root"],
            "wildface.manifest_sha256": dataset["manifest_sha256"], **system_figures()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    log_params(client, run.info.run_id, flatten(config))
    client.log_text(run.info.run_id, "\n".join(dataset["shards"]), "dataset/shards.txt")
    client.log_dict(run.info.run_id, dict(config), "config/resolved.json")
    return run.info.run_id


def end_run(client: MlflowClient, run_id: str, failed: bool = False) -> None:
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


@contextmanager
def parent_run(uri: str, experiment: str, name: str, config: Mapping) -> Iterator[str]:
    """A pipeline-level MLflow run (id yielded); stage runs nest under it."""
    exp_id = setup(uri, experiment)
    client = MlflowClient(uri, uri)
    run = client.create_run(exp_id, run_name=name,
                            tags={"wildface.stage": "pipeline",
                                  "wildface.code_version": code_version()})
    client.log_dict(run.info.run_id, dict(config), "config/resolved.json")
    try:
        yield run.info.run_id
    except BaseException:
        end_run(client, run.info.run_id, failed=True)
        raise
    end_run(client, run.info.run_id)


@contextmanager
def system_metrics(run_id: str, enabled: bool, interval_s: float = 10.0) -> Iterator[None]:
    """MLflow's CPU/memory(/GPU) sampler on this node, logging into ``run_id``."""
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# -- per-step logging from the rank-0 worker ------------------------------------------------
class StepLogger:
    """Logs the trainer's step terms and figures into one stage run (rank 0 only).

    ``on_step(step, terms)`` (the trainer's hook: ``step`` = steps done, ``terms`` = loss
    terms + ``loss``, ``skipped``, ``lr``, ``step_time_s``, ``images_per_s``): every
    ``cfg.log_every`` steps the mean of each loss term since the last log (``loss/<term>``),
    the mean learning rate (``train/lr``), the mean step time (``time/step_s``), the samples
    per second of all ranks (``time/samples_per_s``) and the skipped-step count
    (``train/skipped``). ``log_figure`` writes ``figures/step_XXXXXXX.png``.
    """

    # step terms that are not losses, logged as their means under these names
    _NAMES = {"lr": "train/lr", "step_time_s": "time/step_s"}

    def __init__(self, uri: str, run_id: str, cfg: TrackingConfig, batch_size: int,
                 world_size: int = 1, client: MlflowClient | None = None) -> None:
        self.client = client or MlflowClient(uri, uri)
        self.run_id, self.cfg = run_id, cfg
        self.samples_per_step = batch_size * world_size
        self._sums: dict[str, float] = {}
        self._count = 0
        self._skipped = 0.0

    def on_step(self, step: int, terms: Mapping[str, float]) -> None:
        for k, v in terms.items():
            if k == "skipped":
                self._skipped = float(v)
            elif k != "images_per_s":
                name = self._NAMES.get(k, f"loss/{k}")
                self._sums[name] = self._sums.get(name, 0.0) + float(v)
        self._count += 1
        if step % self.cfg.log_every == 0:
            self.flush(step)

    def flush(self, step: int) -> None:
        if not self._count:
            return
        now = int(time.time() * 1000)
        means = {k: v / self._count for k, v in self._sums.items()}
        if "time/step_s" in means:
            means["time/samples_per_s"] = self.samples_per_step / max(means["time/step_s"], 1e-9)
        means["train/skipped"] = self._skipped
        metrics = [Metric(k, v, now, step) for k, v in sorted(means.items()) if np.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)
        self._sums, self._count = {}, 0

    def wants_figure(self, step: int) -> bool:
        return step % self.cfg.figure_every == 0

    def log_figure(self, step: int, grid: np.ndarray) -> None:
        self.client.log_image(self.run_id, grid, artifact_file=f"figures/step_{step:07d}.png")


def download_latest_figure(client: MlflowClient, run_id: str, directory: Path,
                           stage: str) -> Path | None:
    """Copy the run's last figure to ``directory/<stage>.png`` (None when it has none)."""
    entries = [f.path for f in client.list_artifacts(run_id, "figures") if f.path.endswith(".png")]
    if not entries:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, sorted(entries)[-1], tmp))
        dest = directory / f"{stage}.png"
        shutil.copyfile(local, dest)
    return dest


# -- the figure -------------------------------------------------------------------------------
def _to_uint8(images) -> np.ndarray:
    """(B, 3, H, W) tensor in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255
            ).round().astype(np.uint8)


def _draw_points(image: np.ndarray, points: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Draw (N, 2) points in the [-1, 1] image convention as 3x3 squares, in place."""
    H, W = image.shape[:2]
    cols = np.round((points[:, 0] + 1) * W / 2 - 0.5).astype(int)
    rows = np.round((points[:, 1] + 1) * H / 2 - 0.5).astype(int)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            r, c = rows + dr, cols + dc
            ok = (r >= 0) & (r < H) & (c >= 0) & (c < W)
            image[r[ok], c[ok]] = colour


def deca_figure(model, images, landmarks) -> np.ndarray:
    """DECA's training figure for a fixed set of images: a (6 H, B W, 3) uint8 grid.

    model: ``recon.deca.DECA``; images (B, 3, S, S) in [0, 1]; landmarks (B, 68, 2) targets
    in the image convention. Rows (:data:`FIGURE_ROWS`): input; 2D landmarks, target green
    vs predicted red; projected 3D landmarks (blue); coarse shape; detailed shape; textured
    render (with detail when the model has a detail code).
    """
    import torch

    from recon.render import ndc_to_image

    was_training = model.training
    model.eval()
    with torch.no_grad():
        rec = model.reconstruct(images, with_detail=True, render=True)
        lmk3d = ndc_to_image(model.project(rec.landmarks3d, rec.codes.cam))[..., :2]
    model.train(was_training)
    inputs = _to_uint8(images)
    lmk2d_rows, lmk3d_rows = inputs.copy(), inputs.copy()
    for b in range(inputs.shape[0]):
        _draw_points(lmk2d_rows[b], landmarks[b].cpu().numpy(), (0, 255, 0))
        _draw_points(lmk2d_rows[b], rec.landmarks2d[b].cpu().numpy(), (255, 0, 0))
        _draw_points(lmk3d_rows[b], lmk3d[b].cpu().numpy(), (0, 128, 255))
    detail_shape = rec.shape_detail_images if rec.shape_detail_images is not None else rec.shape_images
    textured = rec.images_detail if rec.images_detail is not None else rec.images
    rows = [inputs, lmk2d_rows, lmk3d_rows, _to_uint8(rec.shape_images),
            _to_uint8(detail_shape), _to_uint8(textured)]
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


# -- the registered model -----------------------------------------------------------------------
def log_reconstructor(uri: str, cfg, *, run_id: str, detail_checkpoint: str,
                      coarse_checkpoint: str) -> str:
    """Log the reconstructor pyfunc (:mod:`flows.reconstructor`) into ``run_id`` as ``model/``:
    artifacts = both checkpoints, the resolved config and the face model's arrays. The sha256
    of every file (:func:`flows.model_uri.model_checksums`, the ``MLmodel`` and the code file
    included) become ``sha256.*`` tags of the logged model: the record each load checks the
    artifact store's copies against. Returns the model URI (``models:/m-...``) to load or
    register."""
    from importlib.metadata import version

    from recon.flame_io import load_face_model

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(cfg.model_dump_json(indent=1))
        face_path = load_face_model(cfg.face_model).save_npz(Path(tmp) / "face_model.npz")
        artifacts = {"checkpoint": detail_checkpoint, "coarse_checkpoint": coarse_checkpoint,
                     "config": str(config_path), "face_model": str(face_path)}
        # Hashed here, from the files handed to MLflow, not read back from its artifact store.
        record = model_checksums({**artifacts, CODE_FILE: RECONSTRUCTOR_FILE})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(RECONSTRUCTOR_FILE), artifacts=artifacts,
                # Declared so that loading may override it (load_model(model_config=...) or
                # MLFLOW_PYFUNC_INFERENCE_CONFIG): MLflow ignores keys not logged here.
                model_config={"device": "auto"},
                # Explicit requirements: inferring them would load the model in a subprocess.
                pip_requirements=[f"wildface=={version('wildface')}",
                                  f"torch=={version('torch')}", f"mlflow=={mlflow.__version__}"],
            )
        # MLflow writes the MLmodel itself: read back at once, before anyone else uses it.
        logged = client.get_logged_model(info.model_id)
        mlmodel = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{logged.artifact_location.rstrip('/')}/{MLMODEL}", dst_path=tmp,
            tracking_uri=uri)
        record.update(model_checksums({MLMODEL: mlmodel}))
    client.set_logged_model_tags(info.model_id, record)
    return info.model_uri


def register_model(uri: str, cfg, model_uri: str, *, run_id: str, data: str,
                   metrics: Mapping[str, float] | None = None,
                   extra_tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """Register ``model_uri`` as a new version of ``tracking.registered_model``, tagged with
    its data (root, manifest hash), code version, face model, backbone, ``metrics``
    (``metric.<name>``) and the sha256 of its files (``sha256.*``), and point the
    ``tracking.alias`` alias (``challenger``) at it (:func:`set_alias`).
    Returns ``{"name", "version", "uri", "run_id"}``.

    Refused, registering nothing: a model whose files do not match the checksums recorded when
    it was logged (:class:`flows.model_uri.ModelIntegrityError`) and one whose checkpoint holds
    ``inf`` / ``nan`` (:class:`recon.training.checkpoint.NonFiniteState`)."""

    tc = cfg.tracking
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        files = resolve_model(model_uri, tmp, uri)
        assert_finite_model(files)
    mv = mlflow.register_model(model_uri, tc.registered_model)
    tags = {"data_root": str(data), "code_version": code_version(),
            "face_model": cfg.face_model.path if cfg.face_model.path == "demo-head"
            else Path(cfg.face_model.path).name, "backbone": cfg.model.backbone}
    tags.update({f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()
                 if isinstance(v, (int, float))})
    tags["manifest_sha256"] = client.get_run(run_id).data.tags.get("wildface.manifest_sha256",
                                                                   "unknown")
    tags.update(extra_tags or {})
    tags.update(files.checksums)  # last: nothing else may overwrite the record
    for k, v in tags.items():
        client.set_model_version_tag(tc.registered_model, mv.version, k, str(v)[:5000])
    set_alias(client, tc.registered_model, tc.alias, mv.version)
    return {"name": tc.registered_model, "version": str(mv.version),
            "uri": f"models:/{tc.registered_model}/{mv.version}", "run_id": run_id}


def _who() -> str:
    """``user@host`` of this process (the uid when the user has no name here)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry or $USER
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def set_alias(client: MlflowClient, name: str, alias: str, version: str | int) -> str | None:
    """Point ``alias`` of registered model ``name`` at ``version``, the one way wildface moves
    an alias: who, when and the previous holder are written to the version's tags
    (:func:`alias_tag`) before the move, so no move is left without a record. Returns the
    previous holder's version (None when the alias was free)."""
    from datetime import datetime, timezone

    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:  # the alias is free
        previous = None
    record = {"set_by": _who(),
              "set_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "previous": previous or "none"}
    for field, value in record.items():
        client.set_model_version_tag(name, str(version), alias_tag(alias, field), value)
    client.set_registered_model_alias(name, alias, str(version))
    return previous


def download_coarse_checkpoint(ref: str, uri: str, directory: Path) -> Path:
    """The coarse checkpoint of ``runs:/<run id>`` (its ``checkpoint/`` artifact) or of a
    registered version ``models:/<name>/<version>`` / ``models:/<name>@<alias>``, downloaded
    to ``directory``."""
    client = MlflowClient(uri, uri)
    directory.mkdir(parents=True, exist_ok=True)
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].strip("/").split("/")[0]
        files = [f.path for f in client.list_artifacts(run_id, "checkpoint")
                 if f.path.endswith(".pt")]
        if not files:
            raise FileNotFoundError(f"{ref}: the run has no checkpoint/ artifact")
        return Path(client.download_artifacts(run_id, sorted(files)[-1], str(directory)))

    files = resolve_model(ref, directory, uri)  # checked against the version's record
    coarse = files.artifacts.get("coarse_checkpoint")
    if coarse is None or not coarse.name.startswith("coarse-"):
        raise FileNotFoundError(f"{ref}: the model version has no coarse checkpoint artifact")
    return coarse
