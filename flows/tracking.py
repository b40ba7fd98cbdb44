"""MLflow tracking of wildface training runs: where runs go, what a run records, per-step
logging and the training figure.

- Runs: one parent run per pipeline (or per ``train`` flow) and one nested run per stage
  (``coarse``, ``detail``) holding the full resolved config as params, the dataset's
  manifest hash and shard list, the code version, system figures, every loss term and the
  step time as metrics, and every ``tracking.figure_every`` steps a DECA-style figure.
  The driver creates the stage run; the rank-0 Ray Train worker logs into it by run id
  (:class:`StepLogger`), so metrics need no round trip through Ray.
- The registered model (logging, registering, aliases, loading) is :mod:`flows.registry`'s.

Where runs and models are (:func:`resolve_tracking_uri`, the one resolver): a given
``--tracking-uri``, else ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the MLflow server
of ``wildface services`` when it answers, else a sqlite store in the output folder
(``sqlite:///OUT/mlflow.db``, artifacts in ``OUT/mlartifacts``).
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
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infra.config import ServicesConfig, TrackingConfig

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parent.parent
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


def _server_answers(uri: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def services_mlflow_uri(services: ServicesConfig | None = None) -> str | None:
    """The MLflow server of ``wildface services`` when it answers, else None."""
    svc = services or ServicesConfig()
    uri = f"http://{svc.host}:{svc.mlflow_port}"
    return uri if _server_answers(uri) else None


def resolve_tracking_uri(cfg: TrackingConfig | None = None,
                         out_dir: str | os.PathLike | None = None,
                         services: ServicesConfig | None = None, *,
                         given: str | None = None) -> str:
    """Where runs and models are, the first of: ``given`` (a ``--tracking-uri``),
    ``cfg.uri`` (``tracking.uri``), ``$MLFLOW_TRACKING_URI``, without ``out_dir`` the URI
    this process set (``mlflow.set_tracking_uri``), the services' server when it answers,
    then the sqlite store in ``out_dir``. Without ``out_dir`` and nothing found: ValueError.
    A relative sqlite database is made absolute (:func:`absolute_uri`).

    The process's own URI is skipped for an output folder: an earlier flow in this process
    would otherwise pull a new run into its store."""
    explicit = given or (cfg.uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return absolute_uri(explicit)
    if out_dir is None:
        import mlflow
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

        if is_tracking_uri_set():
            return mlflow.get_tracking_uri()
    served = services_mlflow_uri(services)
    if served:
        return served
    if out_dir is None:
        raise ValueError("an MLflow model URI needs a tracking URI: pass --tracking-uri, set "
                         "MLFLOW_TRACKING_URI or tracking.uri, or start `wildface services up`")
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
    import mlflow
    from mlflow.tracking import MlflowClient

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
    import mlflow
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
    from mlflow.entities import Param

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
    from mlflow.tracking import MlflowClient

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
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri, uri)
        self.client = client
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
        from mlflow.entities import Metric

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
def deca_figure(model, images, landmarks) -> np.ndarray:
    """DECA's training figure for a fixed set of images: a (6 H, B W, 3) uint8 grid.

    model: ``recon.deca.DECA``; images (B, 3, S, S) in [0, 1]; landmarks (B, 68, 2) targets
    in the image convention. Rows (:data:`FIGURE_ROWS`): input; 2D landmarks, target green
    vs predicted red; projected 3D landmarks (blue); coarse shape; detailed shape; textured
    render (with detail when the model has a detail code).
    """
    import torch

    from recon.inference.reconstruct import to_uint8
    from recon.render import draw_landmarks, ndc_to_image

    was_training = model.training
    model.eval()
    with torch.no_grad():
        rec = model.reconstruct(images, with_detail=True, render=True)
        lmk3d = ndc_to_image(model.project(rec.landmarks3d, rec.codes.cam))[..., :2]
    model.train(was_training)
    landmarks = landmarks.to(images.device)
    lmk2d = draw_landmarks(draw_landmarks(images, landmarks, (0.0, 1.0, 0.0)),
                           rec.landmarks2d, (1.0, 0.0, 0.0))
    lmk3d = draw_landmarks(images, lmk3d, (0.0, 128 / 255, 1.0))
    detail_shape = rec.shape_detail_images if rec.shape_detail_images is not None else rec.shape_images
    textured = rec.images_detail if rec.images_detail is not None else rec.images
    rows = [images, lmk2d, lmk3d, rec.shape_images, detail_shape, textured]
    return np.concatenate([np.concatenate(list(to_uint8(r)), axis=1) for r in rows], axis=0)
