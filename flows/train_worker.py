"""What runs inside each Ray Train worker of a DECA stage (:func:`train_loop`, started by
:func:`flows.train.run_stage` with a :class:`flows.stage_job.StageJob`): the single-process
trainer for this rank, with Ray's checkpoint reports, the gradient all-reduce, MLflow logging
on rank 0 and the test-only fault injection (:data:`FAULT_ENV`).

A module of its own so that Ray pickles ``train_loop`` by an importable name
(``flows.train_worker``): a Prefect worker loads a flow file such as ``flows/train.py`` as a
bare module (``train``) that Ray's worker processes cannot import.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flows import tracking
from flows.config import WildfaceConfig, with_stage_weights
from flows.samples import is_synth_folder, rank_store
from flows.stage_job import StageJob
from infra import storage
from recon.devices import set_cpu_threads
from recon.training.checkpoint import checkpoint_due
from recon.training.trainer import ProgressLog, Trainer, TrainerCallback

FAULT_ENV = "WILDFACE_FAULT"


# -- data ----------------------------------------------------------------------------------------
def figure_batch(data: str, store, cfg: WildfaceConfig, n: int) -> dict:
    """A fixed set of ``n`` images for the figures: the first ``n`` of the validation split
    (shard order) when the data has one, else of ``store`` (sorted keys); evaluation crop."""
    from itertools import islice

    from preprocessing.shards import iter_samples, read_split
    from recon.training.data import CropAugment, SampleStore, iter_eval_batches

    source = store
    if not is_synth_folder(data):
        try:
            urls, identities = read_split(data, "val")
            # Only what the figures show: the split may be larger than memory.
            source = SampleStore.from_samples(islice(iter_samples(urls), n), identities)
        except (FileNotFoundError, OSError, ValueError):
            source = store
    d = cfg.data
    augment = CropAugment(out_size=cfg.model.image_size, scale_min=d.scale_min,
                          scale_max=d.scale_max, shift=d.shift, eval_scale=d.eval_scale)
    _, batch = next(iter_eval_batches(source, augment, batch_size=n))
    return batch


def fetch_file(uri: str, directory: Path) -> Path:
    """A local copy of a file given as a local path or an s3:// URI."""
    if not storage.is_s3(uri):
        return Path(uri)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / uri.rsplit("/", 1)[-1]
    storage.write_bytes(str(dest), storage.read_bytes(uri))
    return dest


# -- the per-worker loop -------------------------------------------------------------------------
def allreduce_mean(params: list) -> None:
    """Average the gradients of ``params`` over all ranks (one flat all-reduce)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _parse_fault(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    return dict(part.split("=", 1) for part in spec.split(",") if "=" in part)


def _wait_for_registered_checkpoint(timeout_s: float = 120.0) -> None:
    """Block until Ray's checkpoint manager has written its snapshot (it does so on every
    registered checkpoint), or ``timeout_s`` passes."""
    import pyarrow.fs
    import ray.train

    st = ray.train.get_context().get_storage()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = st.storage_filesystem.get_file_info(st.checkpoint_manager_snapshot_path)
        if info.type != pyarrow.fs.FileType.NotFound:
            return
        time.sleep(0.2)


class RayReport(TrainerCallback):
    """Hands each checkpoint to Ray Train (rank 0) and keeps every rank's ``report`` calls in
    step (the trainer's rule, :func:`recon.training.checkpoint.checkpoint_due`); optional
    one-shot fault injection (:data:`FAULT_ENV`)."""

    def __init__(self, rank: int, total: int, every: int) -> None:
        self.rank, self.total, self.every = rank, total, every
        self.terms: dict[str, float] = {}
        self.fault = _parse_fault(os.environ.get(FAULT_ENV))

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        out = {k: float(v) for k, v in self.terms.items()}
        out["step"] = float(trainer.step)
        out["resumed_from"] = float(-1 if trainer.resumed_from is None else trainer.resumed_from)
        return out

    def on_step(self, trainer: Trainer, step: int, terms: dict[str, float]) -> None:
        import ray.train

        self.terms = terms
        if self.rank != 0 and checkpoint_due(step, self.total, self.every):
            ray.train.report(self.metrics(trainer))
        f = self.fault
        if f and int(f.get("rank", -1)) == self.rank and int(f.get("step", -1)) == step:
            marker = Path(f["marker"])
            if not marker.exists():
                marker.write_text(f"killed rank {self.rank} after step {step}\n")
                _wait_for_registered_checkpoint()
                os._exit(1)  # an abrupt worker death, as a lost node would be

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        import ray.train

        # Ray uploads a whole folder: give it one holding just this (complete) file.
        with tempfile.TemporaryDirectory(prefix="wildface-report-", dir=path.parent) as tmp:
            os.link(path, Path(tmp) / path.name)
            ray.train.report(self.metrics(trainer),
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))


class MlflowLog(TrainerCallback):
    """Rank 0: loss terms, step time and figures into the stage's MLflow run."""

    def __init__(self, logger: tracking.StepLogger, figure_images: dict, total: int) -> None:
        self.logger, self.figure_images, self.total = logger, figure_images, total

    def on_step(self, trainer: Trainer, step: int, terms: dict[str, float]) -> None:
        self.logger.on_step(step, terms)
        if self.logger.wants_figure(step) or step == self.total:
            self.logger.flush(step)
            model = trainer.model
            grid = tracking.deca_figure(model, self.figure_images["images"].to(model.device),
                                        self.figure_images["landmarks"].to(model.device))
            self.logger.log_figure(step, grid)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the trainer for this rank and run it (see module doc).
    ``loop_config``: a :class:`flows.stage_job.StageJob` as Ray hands it over."""
    import ray.train
    import ray.train.torch

    job = StageJob.from_loop_config(loop_config)
    stage, cfg = job.stage, job.config
    storage.configure(cfg.storage)  # before the weights: the model store may be on s3://
    cfg = with_stage_weights(cfg, stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # As many threads as CPUs Ray reserved for this worker (not OMP_NUM_THREADS, which
        # a user's environment may set for the whole machine).
        set_cpu_threads(max(1, int(cfg.ray.cpus_per_worker)))
    work = Path(tempfile.mkdtemp(prefix=f"wildface-{stage}-rank{rank}-"))
    try:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            # The trainer resumes from the latest checkpoint in its folder.
            with restored.as_directory() as d:
                (work / "checkpoints").mkdir()
                for f in Path(d).glob(f"{stage}-*.pt"):
                    shutil.copy2(f, work / "checkpoints" / f.name)
        coarse = fetch_file(job.coarse, work / "inputs") if job.coarse else None

        n_ids, k_images = cfg.train.batch_shape(stage)
        store, own = rank_store(job.data, rank, world, n_ids, cfg.data.cache_dir, k_images)
        total = cfg.train.steps
        callbacks: list[TrainerCallback] = [RayReport(rank, total, cfg.train.checkpoint_every)]
        if rank == 0:  # Ray hands a worker's stdout to the driver's terminal
            callbacks.insert(0, ProgressLog(stage, total))
        if rank == 0 and job.mlflow is not None:
            n, k = cfg.train.batch_shape(stage)
            logger = tracking.StepLogger(job.mlflow.tracking_uri, job.mlflow.run_id,
                                         cfg.tracking, batch_size=n * k, world_size=world)
            images = figure_batch(job.data, store, cfg, cfg.tracking.figure_images)
            callbacks.insert(0, MlflowLog(logger, images, total))
        trainer = Trainer(
            cfg, stage, work, store, device=device, coarse_checkpoint=coarse,
            callbacks=callbacks, rank=0 if own else rank, world_size=1 if own else world,
            sync_grads=allreduce_mean if world > 1 else None, save_checkpoints=rank == 0,
            keep_checkpoints=2)
        trainer.run(total)
    finally:
        shutil.rmtree(work, ignore_errors=True)
