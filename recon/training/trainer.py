"""Single-process trainer: coarse or detail stage on CPU or one GPU, with checkpoints and resume.

Wraps :class:`recon.training.steps.CoarseStep` / ``DetailStep`` around identity-grouped
batches (:mod:`recon.training.data`). The distributed trainer (Ray Train) reuses it: pass
``rank`` / ``world_size`` (each rank draws its own batches), ``sync_grads`` (the all-reduce) and
``save_checkpoints=False`` on ranks other than 0; plug tracking in through callbacks.

Resume: at start the trainer loads the latest checkpoint of its stage in ``<out>/checkpoints``
(model, optimiser, grad scaler, step counters and generator, RNG states) and continues at its
step with the very batches an uninterrupted run would have drawn (batches and augmentation
depend only on the seed and the step), so on CPU the continuation is bit-identical.

Divergence: :meth:`Trainer.run` raises :class:`recon.training.steps.NonFiniteTraining` after
``train.max_skipped_steps`` consecutive skipped steps or as soon as a weight is not finite,
and a checkpoint is never written with a non-finite value in it
(:class:`recon.training.checkpoint.NonFiniteState`): a diverged run fails, it does not end
with a checkpoint that reconstructs ``nan`` meshes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from recon.config import DataConfig, FaceModelConfig, LossConfig, NetworkConfig, TrainConfig
from recon.devices import pick_device
from recon.progress import EVERY_S, Progress, print_line
from recon.training.checkpoint import (CheckpointError, NonFiniteState, checkpoint_due,
                                       checkpoint_path, latest_checkpoint, load_checkpoint,
                                       prune_checkpoints, save_checkpoint, set_rng_state)
from recon.training.data import (CropAugment, IdentityBatchSampler, SampleStore,
                                 make_train_loader)
from recon.training.steps import CoarseStep, DetailStep, NonFiniteTraining

log = logging.getLogger(__name__)

Stage = Literal["coarse", "detail"]
CHECKPOINT_DIR = "checkpoints"


class TrainingConfig(Protocol):
    """What the trainer reads of a config (``flows.config.WildfaceConfig`` has it all)."""

    face_model: FaceModelConfig
    model: NetworkConfig
    loss: LossConfig
    train: TrainConfig
    data: DataConfig

    def model_dump_json(self) -> str: ...


class TrainerCallback:
    """Hooks called by :meth:`Trainer.run` (override what you need; all are no-ops here).
    Each receives the calling ``trainer`` first (its ``model``, ``step``, ``resumed_from``).

    ``on_step(trainer, step, terms)``: after every optimiser step; ``step`` counts steps done
    (1 after the first), ``terms`` maps loss names (and ``loss``, ``skipped``,
    ``step_time_s``, ``images_per_s``) to floats. ``on_checkpoint(trainer, path)``: after a
    checkpoint file is complete.
    """

    def on_step(self, trainer: Trainer, step: int, terms: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass


class JsonlLog(TrainerCallback):
    """Appends every ``log_every``-th step's terms to a JSON-lines file."""

    def __init__(self, path: str | Path, log_every: int = 1) -> None:
        self.path = Path(path)
        self.log_every = max(1, log_every)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_step(self, trainer: Trainer, step: int, terms: dict[str, float]) -> None:
        if step % self.log_every == 0:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": step, **terms}) + "\n")


class ProgressLog(TrainerCallback):
    """The stage's progress line (:class:`recon.progress.Progress`):
    ``coarse: 40/1000 steps, 2.1/s, ETA 7m36s, loss 0.1234``, at most every ``every_s``
    seconds, or at every ``every_steps``-th step when that is given; always at the last step.
    The rate counts from the first step of this run (a resumed run's earlier steps are not
    in it)."""

    def __init__(self, stage: str, total: int, *, every_s: float = EVERY_S,
                 every_steps: int | None = None,
                 emit: Callable[[str], None] = print_line,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.total, self.every_steps = stage, total, every_steps
        self.every_s = math.inf if every_steps else every_s
        self.emit, self.clock = emit, clock
        self.progress: Progress | None = None

    def on_step(self, trainer: Trainer, step: int, terms: dict[str, float]) -> None:
        if self.progress is None:  # the run starts with the step just done
            now = self.clock()
            self.progress = Progress(self.stage, self.total, "steps", every_s=self.every_s,
                                     start=step - 1, emit=self.emit, clock=self.clock,
                                     started_at=now - terms.get("step_time_s", 0.0))
        force = bool(self.every_steps) and step % self.every_steps == 0
        self.progress.update(step, f"loss {terms['loss']:.4f}", force=force)


@dataclass
class TrainResult:
    stage: str
    step: int
    checkpoint: Path | None
    terms: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    images: int = 0


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """One stage of DECA training on one device.

    config: a :class:`TrainingConfig` (e.g. ``WildfaceConfig``); stage: "coarse" | "detail";
    out_dir: checkpoints go to ``out_dir/checkpoints``, the step log to
    ``out_dir/<stage>-log.jsonl``; store: the training samples; coarse_checkpoint: the detail
    stage starts from this coarse checkpoint (unless it resumes a detail checkpoint);
    init_from: a checkpoint whose networks a fresh run of either stage starts from (e.g. DECA's
    imported weights, ``wildface model import-deca``; fresh optimiser; ignored on resume);
    identity_net / mrf: the coarse identity loss network and the detail ID-MRF loss (None:
    built from ``config.identity`` / ``config.perceptual`` when their loss weight is > 0 and
    the config has those sections, else the term is off).
    """

    def __init__(
        self,
        config: TrainingConfig,
        stage: Stage,
        out_dir: str | Path,
        store: SampleStore,
        *,
        device: str | torch.device | None = None,
        coarse_checkpoint: str | Path | None = None,
        init_from: str | Path | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        identity_net: nn.Module | None = None,
        mrf: nn.Module | None = None,
        rank: int = 0,
        world_size: int = 1,
        sync_grads: Callable[[list[nn.Parameter]], None] | None = None,
        save_checkpoints: bool | None = None,
        keep_checkpoints: int = 3,
        resume: bool = True,
    ) -> None:
        from recon.deca import DECA

        if stage not in ("coarse", "detail"):
            raise ValueError(f"stage must be 'coarse' or 'detail', got {stage!r}")
        self.config, self.stage = config, stage
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / CHECKPOINT_DIR
        self.device = pick_device(device)
        self.callbacks = list(callbacks)
        self.sync_grads = sync_grads
        self.save_checkpoints = rank == 0 if save_checkpoints is None else save_checkpoints
        self.keep_checkpoints = keep_checkpoints
        tc = config.train

        torch.manual_seed(tc.seed)  # network init is part of the run's determinism
        self.model = DECA(config.face_model, config.model).to(self.device)
        resume_path = latest_checkpoint(self.ckpt_dir, stage) if resume else None
        if init_from is not None and resume_path is None:
            start = load_checkpoint(init_from, self.device)
            self._check_face_model(start, init_from)
            self.model.load_state_dict(start["model"])
        if stage == "detail" and resume_path is None and init_from is None:
            if coarse_checkpoint is None:
                raise ValueError("the detail stage needs a coarse checkpoint (coarse_checkpoint)")
            coarse = load_checkpoint(coarse_checkpoint, self.device, stage="coarse")
            self._check_face_model(coarse, coarse_checkpoint)
            self.model.load_state_dict(coarse["model"])
            self.coarse_checkpoint = str(coarse_checkpoint)
        else:
            self.coarse_checkpoint = None if coarse_checkpoint is None else str(coarse_checkpoint)

        if stage == "coarse":
            if identity_net is None and config.loss.identity > 0 and hasattr(config, "identity"):
                from recon.identity.build import build_identity_network

                identity_net = build_identity_network(config.identity, self.device)
            self.step_fn = CoarseStep(self.model, config.loss, tc, identity_net=identity_net)
        else:
            if mrf is None and config.loss.mrf > 0 and hasattr(config, "perceptual"):
                from recon.losses.mrf import IDMRFLoss
                from recon.perceptual import build_perceptual_network

                mrf = IDMRFLoss(build_perceptual_network(config.perceptual, self.device),
                                centre=config.loss.mrf_centre)
            self.step_fn = DetailStep(self.model, config.loss, tc, mrf=mrf)
        trained = {id(p) for p in self.step_fn.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trained)
        # Multi-tensor Adam on every device (PyTorch picks it on CUDA only): on CPU the
        # per-parameter updates of a small network cost more than its convolutions.
        self.optimizer = torch.optim.Adam(self.step_fn.parameters(), lr=tc.lr, foreach=True)
        use_scaler = tc.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

        self.step = 0
        self.resumed_from: int | None = None
        if resume_path is not None:
            self._resume(resume_path)

        n, k = tc.batch_shape(stage)
        d = config.data
        self.sampler = IdentityBatchSampler(store.identities, n, k, seed=tc.seed, rank=rank,
                                            world_size=world_size, sources=d.sources,
                                            default_source=d.default_source)
        self.augment = CropAugment(out_size=config.model.image_size, scale_min=d.scale_min,
                                   scale_max=d.scale_max, shift=d.shift, eval_scale=d.eval_scale)
        self.store = store

    # -- checkpoints ------------------------------------------------------------------------
    def _check_face_model(self, ckpt: dict[str, Any], path: str | Path) -> None:
        if ckpt["face_model"] != self.model.face_model_name:
            raise CheckpointError(
                f"{path}: trained on face model {ckpt['face_model']!r}, this run uses "
                f"{self.model.face_model_name!r}")

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, self.device, stage=self.stage)
        self._check_face_model(ckpt, path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step_fn.load_state_dict(ckpt["step_state"])
        set_rng_state(ckpt["rng"])
        self.step = self.resumed_from = int(ckpt["step"])
        log.info("resumed %s stage from %s (step %d)", self.stage, path, self.step)

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically) and prune old ones. Raises
        ``NonFiniteTraining`` (nothing written) when the state is not finite, e.g. batch-norm
        statistics that a non-finite batch reached although its step was skipped."""
        try:
            path = save_checkpoint(
                checkpoint_path(self.ckpt_dir, self.stage, self.step), stage=self.stage,
                step=self.step, model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                config_json=self.config.model_dump_json(),
                face_model=self.model.face_model_name, skipped=self.step_fn.skipped,
                scaler=None if self.scaler is None else self.scaler.state_dict(),
                extra={"step_state": self.step_fn.state_dict(),
                       "coarse_checkpoint": self.coarse_checkpoint},
            )
        except NonFiniteState as err:
            raise NonFiniteTraining(f"training diverged at step {self.step}: {err}") from err
        prune_checkpoints(self.ckpt_dir, self.stage, self.keep_checkpoints)
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    # -- loop -------------------------------------------------------------------------------
    def run(self, steps: int | None = None) -> TrainResult:
        """Train until ``steps`` optimiser steps are done in total (default ``train.steps``),
        checkpointing every ``train.checkpoint_every`` steps and at the end
        (:func:`recon.training.checkpoint.checkpoint_due`). Raises
        ``NonFiniteTraining`` when training diverges (see the module doc); the checkpoints
        written before it stay."""
        total = self.config.train.steps if steps is None else steps
        every = self.config.train.checkpoint_every
        started = time.perf_counter()
        images = 0
        terms: dict[str, float] = {}
        last_ckpt: Path | None = None
        if self.step < total:
            loader = make_train_loader(self.store, self.sampler, self.augment,
                                       start_step=self.step,
                                       num_workers=self.config.data.num_workers)
            t0 = time.perf_counter()
            for index, batch in loader:
                if index != self.step:
                    raise RuntimeError(f"data stream at step {index}, trainer at {self.step}")
                batch = _to(batch, self.device)
                loss, terms = self.step_fn(batch)
                lr = self.config.train.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.step_fn.optim_step(loss, self.optimizer, self.scaler, self.sync_grads)
                self.step += 1
                n_img = int(batch["images"].shape[0])
                images += n_img
                t1 = time.perf_counter()
                terms = {**terms, "skipped": float(self.step_fn.skipped), "lr": lr,
                         "step_time_s": t1 - t0, "images_per_s": n_img / max(t1 - t0, 1e-9)}
                t0 = t1
                for cb in self.callbacks:
                    cb.on_step(self, self.step, terms)
                if self.save_checkpoints and checkpoint_due(self.step, total, every):
                    last_ckpt = self.save()
                if self.step >= total:
                    break
        elif self.save_checkpoints:
            last_ckpt = latest_checkpoint(self.ckpt_dir, self.stage)
        return TrainResult(stage=self.stage, step=self.step, checkpoint=last_ckpt, terms=terms,
                           skipped=self.step_fn.skipped, resumed_from=self.resumed_from,
                           seconds=time.perf_counter() - started, images=images)


__all__ = ["CHECKPOINT_DIR", "JsonlLog", "NonFiniteTraining", "ProgressLog", "TrainResult",
           "Trainer", "TrainerCallback", "TrainingConfig"]
