"""DECA's two training stages as plain step objects, independent of Ray / MLflow / Prefect.

Usage (what a trainer does each iteration)::

    step = CoarseStep(model, cfg.loss, cfg.train, identity_net=net)   # or DetailStep
    optimizer = torch.optim.Adam(step.parameters(), lr=cfg.train.lr)
    loss, terms = step(batch)          # forward + losses; terms: name -> float
    stepped = step.optim_step(loss, optimizer, scaler)   # False: skipped (non-finite)

Numerical integrity: a step whose loss or gradient is not finite is skipped; after
``train.max_skipped_steps`` consecutive skips, or when the weights themselves are not finite
after an optimiser step, ``optim_step`` raises :class:`NonFiniteTraining` (naming the step and
the first offending parameter) instead of training on with a diverged model.

Batches: ``images`` (B, 3, S, S) in [0, 1], ``landmarks`` (B, 68, 2) in the [-1, 1] image
convention, ``masks`` (B, 1, S, S) skin masks, ``identity`` (B,) long labels (N identities x K
images). The coarse stage trains the coarse encoder only (with ``model.head: keypoints`` the
first ``train.keypoint_steps`` calls train its keypoint head alone; its landmark-only
pretraining phase covers the calls before ``train.pretrain_steps``); the detail stage trains
the detail encoder and decoder only, with the coarse encoder frozen in eval mode. A step's
random draws (the consistency partners) come from its own generator seeded by ``train.seed``;
``state_dict`` / ``load_state_dict`` carry it and the counters across a resume.

Mixed precision (``train.amp``, CUDA only): the encoders and the detail decoder run under
autocast; the face model, renderer and losses stay float32. Pass a ``torch.amp.GradScaler`` to
``optim_step`` for float16.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from recon.config import LossConfig, TrainConfig
from recon.deca import DECA, Codes
from recon.losses.consistency import identity_partners
from recon.losses.mrf import IDMRFLoss
from recon.losses.total import (coarse_code_terms, coarse_image_terms, detail_image_terms,
                                detail_map_terms, keypoint_terms)
from recon.render import sh_shading

Batch = Mapping[str, torch.Tensor]
_IMAGE_KEYS = ("images", "landmarks", "masks")


class NonFiniteTraining(RuntimeError):
    """Training diverged: too many consecutive skipped steps, or non-finite weights."""


def _rows(batch: Batch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: batch[k][rows] for k in _IMAGE_KEYS}


def _total(terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    loss = torch.stack(list(terms.values())).sum()
    logged = {k: float(v.detach()) for k, v in terms.items()}
    logged["loss"] = float(loss.detach())
    return loss, logged


class _Stage:
    """Shared machinery: autocast, the guarded optimiser step, resumable state."""

    def __init__(self, model: DECA, loss_cfg: LossConfig, train_cfg: TrainConfig) -> None:
        self.model = model
        self.loss_cfg = loss_cfg
        self.train_cfg = train_cfg
        self.generator = torch.Generator().manual_seed(train_cfg.seed)
        self.iteration = 0  # calls so far
        self.skipped = 0  # optimiser steps skipped for a non-finite loss or gradient
        self.consecutive_skipped = 0  # ... of them since the last step taken
        self._statistics: list[tuple[torch.Tensor, torch.Tensor]] = []

    def trained_modules(self) -> list[nn.Module]:
        """The networks this stage trains (their parameters are :meth:`parameters`)."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def _keep_statistics(self) -> None:
        """Copy the trained networks' buffers (batch-norm running statistics) before a
        forward pass: a skipped step puts them back, since a non-finite batch would leave
        them ``nan`` although the weights never moved."""
        self._statistics = [(b, b.detach().clone()) for m in self.trained_modules()
                            for b in m.buffers()]

    def _autocast(self, device: torch.device) -> torch.autocast:
        enabled = self.train_cfg.amp and device.type == "cuda"
        return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda"
                              else torch.bfloat16, enabled=enabled)

    def optim_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        sync_grads: Callable[[list[nn.Parameter]], None] | None = None,
    ) -> bool:
        """Backward, optional gradient-norm clipping (``train.grad_clip``), optimiser step.

        A non-finite loss or gradient never reaches the optimiser: the step is skipped,
        counted in ``self.skipped``, the trained networks' buffers (batch-norm statistics) are
        put back as they were before the forward pass, and False returned. ``sync_grads``
        (e.g. an all-reduce for data-parallel training) runs on the gradients before the
        check; a worker with a non-finite loss hands it NaN gradients, so every worker skips
        the same step.

        Raises :class:`NonFiniteTraining` at the ``train.max_skipped_steps``-th consecutive
        skip, and when a parameter is not finite after the optimiser step (every worker holds
        the same weights, so all of them stop). float16 overflows under a ``scaler`` are its
        normal back-off (it halves its scale and retries) and count towards the limit only
        once the scale has fallen below 1.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        finite_loss = bool(torch.isfinite(loss.detach()).all())
        if finite_loss:
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
        else:
            for p in params:
                p.grad = torch.full_like(p, math.nan)
        if sync_grads is not None:
            sync_grads(params)
        # The norm first, clipping after: a skipped step's gradients still name the culprit.
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not bool(torch.isfinite(norm)):
            culprit = "the loss" if not finite_loss else "the gradient of " + (
                self._first_non_finite(params, grads=True)
                or "every parameter (entries finite, their norm overflowed)")
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in self._statistics:
                    buffer.copy_(saved)
            backing_off = False
            if scaler is not None and finite_loss:
                scaler.update()  # float16 overflow: lower the scale, as GradScaler does
                backing_off = scaler.get_scale() >= 1.0
            self.skipped += 1
            if not backing_off:
                self.consecutive_skipped += 1
            limit = self.train_cfg.max_skipped_steps
            if self.consecutive_skipped >= limit:
                raise NonFiniteTraining(
                    f"training diverged at step {self.iteration}: {self.consecutive_skipped} "
                    f"consecutive steps skipped (train.max_skipped_steps={limit}), the last one "
                    f"for a non-finite value in {culprit}")
            return False
        if self.train_cfg.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.train_cfg.grad_clip, norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.consecutive_skipped = 0
        # One norm of all the weights (one device sync, a few multi-tensor kernels); only a
        # non-finite one is looked at entry by entry (a norm can overflow with finite entries).
        if not bool(torch.isfinite(torch.nn.utils.get_total_norm(params))) and \
                (name := self._first_non_finite(params)) is not None:
            raise NonFiniteTraining(
                f"training diverged at step {self.iteration}: parameter "
                f"{name} is not finite after the optimiser step "
                f"(learning rate {optimizer.param_groups[0]['lr']:g})")
        return True

    def _first_non_finite(self, params: list[nn.Parameter], grads: bool = False) -> str | None:
        """The model's name of the first of ``params`` (or of their gradients) holding inf
        or nan; None when every entry is finite (their norm overflowed)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in params:
            value = p.grad if grads else p
            if value is not None and not bool(torch.isfinite(value).all()):
                return names.get(id(p), "<unnamed>")
        return None

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "skipped": self.skipped,
                "consecutive_skipped": self.consecutive_skipped,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.iteration = int(state["iteration"])
        self.skipped = int(state["skipped"])
        # Checkpoints written before the count was kept resume with none.
        self.consecutive_skipped = int(state.get("consecutive_skipped", 0))
        self.generator.set_state(state["generator"])


class CoarseStep(_Stage):
    """DECA's coarse stage: trains the coarse encoder.

    Phases by call count: ``keypoints`` (the first ``train.keypoint_steps`` calls; keypoint
    head only: its L1 to the landmarks), ``pretrain`` (until ``train.pretrain_steps``:
    landmark L1 (weighted), eye and lip closure, regularisers, and the keypoint L1 when the
    encoder has that head), then ``full``: also the photometric L1 on the lit render, the
    identity loss (when ``identity_net`` is given) and shape consistency (every image
    re-rendered with the shape code of another image of the same identity, same image losses,
    weighted by ``loss.shape_consistency``; terms ``shape_consistency/<name>``).
    """

    def __init__(self, model: DECA, loss_cfg: LossConfig, train_cfg: TrainConfig,
                 identity_net: nn.Module | None = None) -> None:
        super().__init__(model, loss_cfg, train_cfg)
        self.identity_net = identity_net

    def parameters(self) -> list[nn.Parameter]:
        return self.model.coarse_parameters()

    def trained_modules(self) -> list[nn.Module]:
        return [self.model.coarse_encoder]

    @property
    def phase(self) -> str:
        """The next call's phase: ``keypoints``, ``pretrain`` or ``full``."""
        if self.iteration < self.train_cfg.keypoint_steps:
            return "keypoints"
        return "pretrain" if self.iteration < self.train_cfg.pretrain_steps else "full"

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        model, cfg = self.model, self.loss_cfg
        phase = self.phase
        self.iteration += 1
        self._keep_statistics()
        model.coarse_encoder.train()
        images = batch["images"]
        with self._autocast(images.device):
            codes = model.encode(images, with_detail=False)
        terms = keypoint_terms(cfg, codes, batch)
        if phase == "keypoints":
            if not terms:
                raise ValueError("train.keypoint_steps needs model.head 'keypoints' and "
                                 "loss.keypoints > 0")
            return _total(terms)
        pretrain = phase == "pretrain"
        rec = model.decode(codes, with_detail=False, render=not pretrain)
        terms.update(coarse_image_terms(cfg, rec, batch, pretrain, self.identity_net))
        terms.update(coarse_code_terms(cfg, codes))
        if not pretrain and cfg.shape_consistency > 0:
            partner, has_partner = identity_partners(batch["identity"], self.generator)
            rows = torch.nonzero(has_partner).flatten()
            if rows.numel() > 0:
                swapped = codes.index(rows).replace(shape=codes.shape[partner[rows]])
                rec_swapped = model.decode(swapped, with_detail=False, render=True)
                for name, value in coarse_image_terms(cfg, rec_swapped, _rows(batch, rows),
                                                      False, self.identity_net).items():
                    terms[f"shape_consistency/{name}"] = cfg.shape_consistency * value
        return _total(terms)


class DetailStep(_Stage):
    """DECA's detail stage: trains the detail encoder and decoder; the coarse encoder is
    frozen (eval mode, no gradients).

    Loss (UV space, on visible face texels: the photo's skin mask x camera-facing, unoccluded
    texels x the face region): photometric L1 between the albedo shaded with the detail
    normals and the photo's UV texture, ID-MRF (when ``mrf`` is given), displacement L1, soft
    symmetry, shading smoothness; detail consistency re-runs the image terms with the detail
    code of another image of the same identity (``detail_consistency/<name>``).
    ``mrf``: an :class:`recon.losses.mrf.IDMRFLoss` (e.g. on ``recon.perceptual.VGG19Features``).
    """

    def __init__(self, model: DECA, loss_cfg: LossConfig, train_cfg: TrainConfig,
                 mrf: IDMRFLoss | None = None) -> None:
        super().__init__(model, loss_cfg, train_cfg)
        self.mrf = mrf

    def parameters(self) -> list[nn.Parameter]:
        return self.model.detail_parameters()

    def trained_modules(self) -> list[nn.Module]:
        return [self.model.detail_encoder, self.model.detail_decoder]

    def _detail_terms(self, codes: Codes, albedo_uv: torch.Tensor, uv_target: torch.Tensor,
                      uv_visible: torch.Tensor, with_maps: bool) -> dict[str, torch.Tensor]:
        with self._autocast(codes.shape.device):
            rec = self.model.decode(codes, with_detail=True, render=False)
        shading = sh_shading(rec.uv_detail_normals, codes.light)
        terms = detail_image_terms(self.loss_cfg, albedo_uv * shading, uv_target, uv_visible,
                                   self.mrf)
        if with_maps:
            terms.update(detail_map_terms(self.loss_cfg, rec.uv_displacement, shading, uv_visible))
        return terms

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        model, cfg = self.model, self.loss_cfg
        self.iteration += 1
        self._keep_statistics()
        model.coarse_encoder.eval()
        model.detail_encoder.train()
        model.detail_decoder.train()
        images = batch["images"]
        with torch.no_grad():
            with self._autocast(images.device):
                codes = model.encode(images, with_detail=False)
            coarse = model.decode(codes, with_detail=False, render=False)
            albedo_uv = model.albedo(codes.tex)
            if albedo_uv.shape[-1] != model.uv_size:
                albedo_uv = F.interpolate(albedo_uv, size=(model.uv_size, model.uv_size),
                                          mode="bilinear", align_corners=False, antialias=True)
            uv_target = model.image_to_uv(images.float(), coarse.vertices_ndc)
            uv_skin = model.image_to_uv(batch["masks"].float(), coarse.vertices_ndc)
            uv_visible = (model.renderer.visibility_uv(coarse.vertices_ndc) * uv_skin
                          * model.uv_face_mask)
        with self._autocast(images.device):
            detail = model.detail_encoder(images).float()
        codes = codes.replace(detail=detail)
        terms = self._detail_terms(codes, albedo_uv, uv_target, uv_visible, with_maps=True)
        if cfg.detail_consistency > 0:
            partner, has_partner = identity_partners(batch["identity"], self.generator)
            rows = torch.nonzero(has_partner).flatten()
            if rows.numel() > 0:
                swapped = codes.index(rows).replace(detail=detail[partner[rows]])
                for name, value in self._detail_terms(swapped, albedo_uv[rows], uv_target[rows],
                                                      uv_visible[rows], with_maps=False).items():
                    terms[f"detail_consistency/{name}"] = cfg.detail_consistency * value
        return _total(terms)
