"""DECA's coarse and detail stages as Ray Train jobs, and the Prefect flow ``train``.

Each stage is one ``TorchTrainer`` run whose workers run the single-process trainer
(:class:`recon.training.trainer.Trainer`) unchanged (:func:`flows.train_worker.train_loop`,
all given one typed job, :class:`flows.stage_job.StageJob`), with:

- data parallelism: Ray Train starts the process group (gloo on CPU, NCCL on GPU) with its
  store listening on rank 0's node IP only (:mod:`flows.ray_process_group`); the
  trainer's ``sync_grads`` hook averages the gradients across ranks (an all-reduce of one
  flat buffer, as DDP does) before its guarded optimiser step; every rank starts from the
  same seeded weights, so the replicas stay identical;
- data: each rank reads its own shards (``train-*.tar`` r, r + W, ...; for a ``wildface
  synth`` folder its own identities) when they hold a full batch of identities, else the
  whole split with the trainer's rank-strided batches (:func:`flows.samples.rank_store`),
  in memory or in a memory-mapped cache on the node's disk (``data.cache_dir``);
- AMP on GPU (``train.amp``, done by the trainer);
- checkpoints: the trainer writes them atomically on rank 0 every ``train.checkpoint_every``
  steps and at the end; each is handed to ``ray.train.report`` (every rank reports at the
  same steps), so it lands in ``ray.storage_path/<run name>/`` (a local folder or s3://)
  only once complete; ``ray.checkpoints_to_keep`` are kept;
- resume: a run with the same name (``run_name``) continues from its latest checkpoint
  (``ray.train.get_checkpoint``), and a failed worker group is restarted from it up to
  ``ray.max_failures`` times (``FailureConfig``). The data stream and the step's random draws
  depend only on the seed and the step, so a resumed run sees the batches an uninterrupted
  one would have;
- tracking: the driver creates the stage's MLflow run (:mod:`flows.tracking`); rank 0 logs
  loss terms, step time and DECA figures into it; the final checkpoint is logged as the
  run's ``checkpoint/`` artifact.

The detail stage starts from a coarse checkpoint given as a path, an s3:// URI, an MLflow
run (``runs:/<run id>``, its ``checkpoint/`` artifact) or a registered model version
(``models:/<name>/<version>`` or ``models:/<name>@<alias>``, its ``coarse_checkpoint``).

Ray: a local Ray is started in this process (``ray.num_cpus``, dashboard if
``ray.include_dashboard``) unless ``ray.address`` names an existing cluster. TorchTrainer is
always launched from the driver / flow process, never from inside a Ray task. The driver's
S3/MLflow credentials reach the workers through an owner-only file, never through the
runtime environment that Ray logs (:func:`flows.ray_cluster.credentials_file`).

Fault injection for tests: ``WILDFACE_FAULT="rank=1,step=3,marker=/tmp/x"`` makes that rank
exit abruptly once (when ``marker`` does not exist yet; it is created first) after that step,
as soon as Ray's controller has registered a checkpoint. Ray collects reports by polling the
workers (every 2 s); a death before that poll loses the pending report, which would make the
test check Ray's timing instead of our resume.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.offline import apply_offline_env

apply_offline_env()

from prefect import flow, get_run_logger, task  # noqa: E402

from flows import registry, tracking  # noqa: E402
from flows.ray_cluster import (  # noqa: E402
    check_gpus,
    credentials_file,
    init_ray,
    run_storage,
    scaling_config,
)
from flows.config import WildfaceConfig, load_config, with_absolute_paths  # noqa: E402
from flows.samples import is_synth_folder, synth_digest  # noqa: E402
from flows.stage_job import Stage, StageJob, StageRun  # noqa: E402
from flows.train_worker import FAULT_ENV, train_loop  # noqa: E402
from infra import storage  # noqa: E402
from infra.config import RayConfig  # noqa: E402

STAGES: tuple[Stage, ...] = ("coarse", "detail")


@dataclass
class StageResult:
    """What one Ray Train stage produced. ``checkpoint``: the final checkpoint file, copied
    to the driver's output folder; ``checkpoint_uri``: the Ray checkpoint folder in storage."""

    stage: str
    run_name: str
    step: int
    checkpoint: str
    checkpoint_uri: str
    mlflow_run_id: str | None
    resumed_from: int | None
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    figure: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- Ray ---------------------------------------------------------------------------------------
def _worker_env(cfg: WildfaceConfig) -> dict[str, str]:
    """Variables every worker needs: the offline settings, one intra-op thread per CPU of
    the worker, plain ``print``, the S3 endpoint of this process. No secret: Ray logs these
    (credentials reach the workers through :func:`flows.ray_cluster.credentials_file`)."""
    from infra.offline import OFFLINE_ENV

    threads = str(max(1, int(cfg.ray.cpus_per_worker)))
    # A worker's auth mode is its raylet's: told "disabled", the workers of a head with
    # token authentication (`wildface services`) cannot reach its GCS and never start.
    offline = {k: v for k, v in OFFLINE_ENV.items() if k != "RAY_AUTH_MODE"}
    env = {**offline, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           # Ray Train's workers otherwise send each print both to their logger and to
           # stdout, and the driver shows every progress line twice.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    for key in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", FAULT_ENV):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


# -- one stage on Ray Train --------------------------------------------------------------------
def default_run_name(cfg: WildfaceConfig, data: str, stage: str, coarse: str | None) -> str:
    """Deterministic name of a stage run: the same config, data and start point resume the
    same Ray run (an idempotent rerun), anything else starts a new one."""
    h = hashlib.sha256()
    # Where things run and are cached does not change what is trained.
    h.update(cfg.model_dump_json(exclude={"ray": True, "tracking": True, "services": True,
                                          "data": {"cache_dir"}}).encode())
    h.update(tracking.dataset_summary(data)["manifest_sha256"].encode()
             if not is_synth_folder(data) else str(Path(data).resolve()).encode())
    h.update(str(coarse).encode())
    return f"{stage}-{h.hexdigest()[:12]}"


def run_stage(
    cfg: WildfaceConfig,
    stage: Stage,
    data: str,
    out_dir: str | Path,
    *,
    run_name: str | None = None,
    coarse: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> StageResult:
    """Run one stage as a TorchTrainer job and return where its final checkpoint is.

    ``coarse`` (detail stage): a coarse checkpoint reference (see module doc);
    ``tracking_uri`` None: no MLflow run. ``out_dir/checkpoints/`` receives a copy of the
    final checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from flows.ray_process_group import NodeStoreTorchConfig

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    out_dir = Path(out_dir).resolve()
    # Ray Train runs each worker in a folder of its own: hand it absolute paths.
    cfg = with_absolute_paths(cfg)
    data = storage.absolute(data)
    tracking_uri = tracking_uri and tracking.absolute_uri(tracking_uri)
    rc = cfg.ray
    storage.configure(cfg.storage)
    if stage == "detail":
        if coarse is None:
            raise ValueError("the detail stage needs a coarse checkpoint (coarse=...)")
        coarse = resolve_checkpoint(coarse, out_dir / "inputs", tracking_uri, rc)
    run_name = run_name or default_run_name(cfg, data, stage, coarse)
    init_ray(rc)
    check_gpus(rc.num_workers * rc.gpus_per_worker if rc.use_gpu else 0,
               "ray.num_workers x ray.gpus_per_worker (ray.use_gpu)", rc.address)

    client = run_id = None
    if tracking_uri:
        from mlflow.tracking import MlflowClient

        exp_id = tracking.setup(tracking_uri, cfg.tracking.experiment)
        client = MlflowClient(tracking_uri, tracking_uri)
        dataset = tracking.dataset_summary(data) if not is_synth_folder(data) else {
            "data_root": str(Path(data).resolve()), "manifest_sha256": synth_digest(data),
            "shards": [], "all_shards": []}
        run_id = tracking.start_stage_run(client, exp_id, stage, cfg.model_dump(mode="json"),
                                          dataset, parent_run_id)
        client.set_tag(run_id, "wildface.ray_run", run_name)
        if coarse:
            client.set_tag(run_id, "wildface.coarse_checkpoint", coarse)

    storage_path, storage_fs = run_storage(rc, cfg.storage.endpoint_url, cfg.storage.region)
    backend = "nccl" if rc.use_gpu else "gloo"
    job = StageJob(stage=stage, config=cfg, data=str(data), coarse=coarse,
                   mlflow=StageRun(tracking_uri=tracking_uri, run_id=run_id) if run_id else None)
    started = time.perf_counter()
    try:
        with tracking.system_metrics(run_id, bool(run_id) and cfg.tracking.system_metrics), \
                credentials_file() as credentials:
            trainer = TorchTrainer(
                train_loop, train_loop_config=job.loop_config(),
                # The process group's store listens on rank 0's node IP only.
                torch_config=NodeStoreTorchConfig(backend=backend),
                scaling_config=scaling_config(rc),
                run_config=RunConfig(
                    name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                    failure_config=FailureConfig(max_failures=rc.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=rc.checkpoints_to_keep),
                    worker_runtime_env={"env_vars": {**_worker_env(cfg), **credentials}},
                ),
            )
            result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"{stage} stage ({run_name}) finished without a checkpoint")
        local_dir = out_dir / "checkpoints"
        local_dir.mkdir(parents=True, exist_ok=True)
        with result.checkpoint.as_directory() as d:
            files = sorted(Path(d).glob(f"{stage}-*.pt"))
            if not files:
                raise RuntimeError(f"Ray checkpoint {result.checkpoint.path} holds no {stage} file")
            final = local_dir / files[-1].name
            # Atomic (temp + rename): a reader or a rerun never sees a half-copied checkpoint.
            storage.put_file(files[-1], final)
        metrics = {k: float(v) for k, v in (result.metrics or {}).items()
                   if isinstance(v, (int, float))}
        figure = None
        if client is not None:
            client.log_artifact(run_id, str(final), "checkpoint")
            figure = tracking.download_latest_figure(client, run_id, out_dir / "figures", stage)
            tracking.end_run(client, run_id)
    except BaseException:
        if client is not None:
            tracking.end_run(client, run_id, failed=True)
        raise
    from recon.training.checkpoint import load_checkpoint

    step = int(load_checkpoint(final, stage=stage)["step"])
    resumed = metrics.get("resumed_from", -1)
    return StageResult(stage=stage, run_name=run_name, step=step, checkpoint=str(final),
                       checkpoint_uri=str(result.checkpoint.path), mlflow_run_id=run_id,
                       resumed_from=None if resumed < 0 else int(resumed),
                       seconds=time.perf_counter() - started, metrics=metrics,
                       figure=None if figure is None else str(figure))


def resolve_checkpoint(ref: str, directory: Path, tracking_uri: str | None,
                       rc: RayConfig) -> str:
    """A coarse-checkpoint reference -> a path or s3:// URI every worker can read.

    ``runs:/<id>`` and ``models:/...`` are downloaded from MLflow to ``directory``; with a
    cluster beyond this machine (``ray.address``, else ``$RAY_ADDRESS``) and S3 storage a
    local file is uploaded next to the runs: the other nodes do not see this disk.
    """
    from infra.ray_connect import init_kwargs, is_loopback

    if ref.startswith(("runs:/", "models:/")):
        if not tracking_uri:
            raise ValueError(f"{ref}: an MLflow reference needs a tracking URI")
        ref = str(registry.download_coarse_checkpoint(ref, tracking_uri, directory))
    elif not storage.is_s3(ref) and not Path(ref).is_file():
        raise FileNotFoundError(f"coarse checkpoint not found: {ref}")
    remote = not is_loopback(init_kwargs(rc)["address"])
    if remote and storage.is_s3(rc.storage_path) and not storage.is_s3(ref):
        uri = storage.join(rc.storage_path, "inputs", Path(ref).name)
        storage.write_bytes(uri, Path(ref).read_bytes())
        return uri
    return ref if storage.is_s3(ref) else str(Path(ref).resolve())


# -- Prefect ---------------------------------------------------------------------------------
def stage_config(config: str | None, overrides: list[str] | None,
                 stage_overrides: list[str] | None) -> WildfaceConfig:
    return load_config(config, list(overrides or []) + list(stage_overrides or []))


@task(name="train-stage")
def train_stage_task(cfg: WildfaceConfig, stage: Stage, data: str, out_dir: str,
                     coarse: str | None, tracking_uri: str | None,
                     parent_run_id: str | None, run_name: str | None) -> dict:
    logger = get_run_logger()
    logger.info("%s stage: %d steps on %d Ray worker(s)%s", stage, cfg.train.steps,
                cfg.ray.num_workers, f" from {coarse}" if coarse else "")
    result = run_stage(cfg, stage, data, Path(out_dir) / stage, run_name=run_name,
                       coarse=coarse, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    logger.info("%s stage done: step %d in %.0f s, checkpoint %s%s", stage, result.step,
                result.seconds, result.checkpoint,
                f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
    return result.as_dict()


@task(name="log-model")
def log_model_task(cfg: WildfaceConfig, tracking_uri: str, coarse: dict, detail: dict) -> str:
    """Log the reconstructor into the detail stage's run; returns its model URI."""
    return registry.log_reconstructor(tracking_uri, cfg, run_id=detail["mlflow_run_id"],
                                      detail_checkpoint=detail["checkpoint"],
                                      coarse_checkpoint=coarse["checkpoint"])


@task(name="register-model")
def register_task(cfg: WildfaceConfig, tracking_uri: str, model_uri: str, coarse: dict,
                  detail: dict, data: str, metrics: dict[str, float] | None = None) -> dict:
    """Register the logged model (alias ``tracking.alias``), tagged with data and metrics."""
    all_metrics = {**{f"coarse.{k}": v for k, v in coarse["metrics"].items()},
                   **{f"detail.{k}": v for k, v in detail["metrics"].items()},
                   **(metrics or {})}
    version = registry.register_model(tracking_uri, cfg, model_uri,
                                      run_id=detail["mlflow_run_id"], data=data,
                                      metrics=all_metrics)
    get_run_logger().info("registered %s version %s (alias %s)", version["name"],
                          version["version"], cfg.tracking.alias)
    return version


def train_stages(cfg_coarse: WildfaceConfig, cfg_detail: WildfaceConfig, data: str, out: str,
                 tracking_uri: str | None, parent_run_id: str | None,
                 coarse: str | None = None, run_name: str | None = None) -> dict:
    """coarse (unless ``coarse`` is given) -> detail, as Prefect tasks of the calling flow."""
    results: dict[str, Any] = {}
    if coarse is None:
        results["coarse"] = train_stage_task(cfg_coarse, "coarse", data, out, None,
                                             tracking_uri, parent_run_id,
                                             f"{run_name}-coarse" if run_name else None)
        coarse = results["coarse"]["checkpoint"]
    else:
        results["coarse"] = {"checkpoint": coarse, "metrics": {}, "mlflow_run_id": None}
    results["detail"] = train_stage_task(cfg_detail, "detail", data, out, coarse, tracking_uri,
                                         parent_run_id,
                                         f"{run_name}-detail" if run_name else None)
    return results


@flow(name="train", log_prints=True)
def train(
    data: str,
    out: str = "runs/train",
    config: str | None = None,
    overrides: list[str] | None = None,
    coarse_overrides: list[str] | None = None,
    detail_overrides: list[str] | None = None,
    coarse: str | None = None,
    register_version: bool = True,
    run_name: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Coarse -> detail on Ray Train -> register the model (alias ``tracking.alias``).

    ``data``: a preprocessing output (shards/, identities.json) or a ``wildface synth`` folder;
    ``config`` + ``overrides`` (``key.sub=value``) apply to both stages,
    ``coarse_overrides`` / ``detail_overrides`` to one (e.g. ``train.steps=20``);
    ``coarse``: skip the coarse stage and start the detail stage from this checkpoint
    (path, s3://, ``runs:/<id>``, ``models:/<name>@<alias>``). Both configs are validated
    before any work starts. Returns the stages' results and the registered version.
    """
    cfg_c = stage_config(config, overrides, coarse_overrides)
    cfg_d = stage_config(config, overrides, detail_overrides)
    # The Ray Train workers and the run's records must not depend on the caller's folder.
    data = storage.absolute(data)
    uri = tracking.resolve_tracking_uri(cfg_d.tracking, out, cfg_d.services, given=tracking_uri)
    with tracking.parent_run(uri, cfg_d.tracking.experiment, "train",
                             cfg_d.model_dump(mode="json")) as parent:
        results = train_stages(cfg_c, cfg_d, data, out, uri, parent, coarse, run_name)
        if register_version:
            model_uri = log_model_task(cfg_d, uri, results["coarse"], results["detail"])
            results["model"] = register_task(cfg_d, uri, model_uri, results["coarse"],
                                             results["detail"], data)
    results["tracking_uri"] = uri
    results["mlflow_ui"] = tracking.ui_hint(uri)
    return results


def train_with_ray(stage: Stage, data: str, out: str | Path, config: str | None,
                   overrides: list[str], coarse: str | None) -> StageResult:
    """``wildface train --ray``: one stage on Ray Train, tracked in MLflow, printed."""
    cfg = load_config(config, overrides)
    uri = tracking.resolve_tracking_uri(cfg.tracking, out, cfg.services)
    result = run_stage(cfg, stage, data, out, coarse=coarse, tracking_uri=uri)
    print(f"{stage}: step {result.step} in {result.seconds:.0f} s"
          + (f" (resumed at {result.resumed_from})" if result.resumed_from is not None else ""))
    print(f"checkpoint: {result.checkpoint} (Ray: {result.checkpoint_uri})")
    print(f"MLflow run {result.mlflow_run_id}: {tracking.ui_hint(uri)}")
    if result.figure:
        print(f"figure: {result.figure}")
    return result
