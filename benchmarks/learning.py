"""Does the coarse stage learn? Neutral-shape error on held-out synthetic identities.

Renders a synthetic set (``recon.synth``), trains the coarse stage on CPU on all but the
held-out identities (demo config unless ``--config``), and compares, on every image of the
held-out identities, the predicted neutral mesh (shape code only: expression and jaw zeroed)
with the ground truth, after a similarity (Umeyama) alignment over the face-region vertices:

- trained model,
- mean shape (shape code 0: the template),
- the untrained model (same initialisation, no steps).

Reported: mean per-vertex distance in the model's units (metres; also mm), and the ratio to the
mean-shape error (goal: trained <= 0.5). Diagnostics: the held-out 68-landmark error (crop
pixels), the correlation of predicted and true shape codes (does the encoder read identity at
all), the identity signal against the shape prior, the landmark-only ceiling (the best ratio
any estimator reaches from landmarks that precise), the loss optimum (the ratio of codes
fitted to each held-out image by the coarse loss itself, no encoder: what the losses allow),
and with ``--probe`` the supervised probe (the same encoder and budget trained on the true
shape codes: whether it can read identity at all).
Then train step time per image for the demo and paper configs (coarse step, full losses, on
this machine).

    .venv/bin/python benchmarks/learning.py [--steps 600 | --train-seconds 300]
        [--identities 48] [--device cuda] [--skip-paper]

Figures are recorded in docs/training.md with the machine they ran on.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flows.config import load_config, with_stage_weights
from recon.config import RefineConfig
from recon.deca import Codes
from recon.evaluation.heldout import (HeldoutErrors, face_region, heldout_shape_errors,
                                      neutral_errors, truth_shape_codes)
from recon.inference.fitting import refine_codes
from recon.synth import generate, iter_samples, load_params
from recon.training.data import CropAugment, SampleStore, iter_eval_batches
from recon.training.steps import CoarseStep
from recon.training.trainer import Trainer, TrainerCallback


def shape_errors(model, store: SampleStore, params: dict, augment: CropAugment, region: np.ndarray,
                 code_pairs: list | None = None, landmark_px: list | None = None,
                 keypoint_px: list | None = None, refine: RefineConfig | None = None
                 ) -> HeldoutErrors:
    """Per-image aligned neutral-shape errors of ``model`` and of the mean shape, as the
    pipeline's evaluation computes them (:func:`recon.evaluation.heldout.heldout_shape_errors`).
    ``code_pairs``: if given, gets ``(predicted code, true code)`` (n_shape,) per image appended.
    ``landmark_px``: if given, gets each image's mean 68-landmark distance (crop pixels)
    between the model's full reconstruction and the truth appended: how well the fit that
    identity must show through is done on unseen images. ``keypoint_px``: the same for the
    keypoint head's located points (``model.head: keypoints``). ``refine``: the encoder's
    codes then the test-time fit to its keypoints and the photo
    (:func:`recon.inference.fitting.refine_codes`), as reconstruction runs it."""
    model.eval()
    n_shape = model.flame.n_shape

    def encode(images: torch.Tensor) -> Codes:
        codes = model.encode(images, with_detail=False)
        return codes if refine is None else refine_codes(model, codes, images, refine)

    def diagnostics(keys: list[str], batch: dict[str, torch.Tensor], codes: Codes) -> None:
        half = batch["images"].shape[-1] / 2  # [-1, 1] image units -> pixels
        if landmark_px is not None:
            lmk = model.decode(codes, with_detail=False, render=False).landmarks2d
            landmark_px.extend(((lmk - batch["landmarks"]).norm(dim=-1).mean(1) * half).tolist())
        if keypoint_px is not None and codes.keypoints is not None:
            keypoint_px.extend(((codes.keypoints - batch["landmarks"]).norm(dim=-1).mean(1)
                                * half).tolist())
        if code_pairs is not None:
            code_pairs.extend(zip(codes.shape.cpu().numpy(),
                                  truth_shape_codes(params, keys, n_shape).numpy()))

    return heldout_shape_errors(model, iter_eval_batches(store, augment, batch_size=16),
                                params, region, encode, on_batch=diagnostics)


@torch.no_grad()
def identity_signal(model, params: dict, keys: list[str], reg_shape: float,
                    face_fraction: float) -> dict:
    """How much the 68-landmark loss can tell identities apart, against the shape prior.

    For the given images' ground truth (shape, expression, pose; the encoder's initial
    camera, which frames a face like a training crop): the weighted landmark loss of the
    mean shape against the ground-truth landmarks (what predicting the mean shape costs
    the data term), and the shape regulariser ``reg_shape * |shape|^2 / 2`` at the
    ground-truth codes (what predicting the truth costs the prior). Where the second is
    larger, the loss's optimum is pulled toward the mean shape whatever the training budget.
    """
    from recon.losses.landmarks import weighted_landmark_loss

    imgs = [params["images"][k] for k in keys]
    device = model.device
    shape = truth_shape_codes(params, keys, model.flame.n_shape).to(device)
    exp = torch.tensor([p["expression"] for p in imgs], dtype=torch.float32, device=device)
    pose = torch.tensor([p["pose"] for p in imgs], dtype=torch.float32, device=device)
    n = len(imgs)
    cam = torch.tensor(model.initial_camera(face_fraction), device=device).expand(n, 3)
    light = torch.zeros(n, 9, 3, device=device)
    tex = torch.zeros(n, model.albedo.n_tex, device=device)

    def landmarks(s: torch.Tensor) -> torch.Tensor:
        codes = Codes(shape=s, tex=tex, exp=exp[:, :model.flame.n_exp], pose=pose, cam=cam,
                      light=light)
        return model.decode(codes, with_detail=False, render=False).landmarks2d

    data = float(weighted_landmark_loss(landmarks(torch.zeros_like(shape)), landmarks(shape)))
    prior = float(reg_shape * (shape ** 2).sum(1).mean() / 2)
    return {"landmark_loss_of_mean_shape": data, "shape_prior_at_truth": prior}


def landmark_ceiling(model, region: np.ndarray, image_size: int, noise_px: list[float],
                     exp_std: float, yaws_deg: tuple[float, ...] = (0.0, 30.0)) -> list[dict]:
    """The best held-out shape error that 2D landmarks alone allow, as a ratio to the mean
    shape's: a linear-Gaussian bound.

    Linearised at the template (face pose yawed by each of ``yaws_deg``), the 68 landmarks
    in crop pixels are ``J x`` with x = (shape, expression, pose, camera) offsets. With the
    codes' priors (shape N(0, 1), expression N(0, exp_std), pose and camera free) and
    landmark noise of ``sigma`` px per coordinate, the posterior covariance of the shape
    code is the shape block of ``(J^T J / sigma^2 + prior precision)^-1``. Mapped through the
    face-region vertices with the similarity directions (translation, rotation, scale)
    projected out, as the benchmark's alignment removes them, its trace gives the RMS
    error of the best possible estimate; the same for the prior gives the mean shape's.
    No regressor that sees only landmarks this precise can beat the ratio (on average);
    photometric cues can. Returns ``{"yaw_deg", "noise_px", "ratio"}`` per pair.
    """

    ns, ne, nt = model.flame.n_shape, model.flame.n_exp, model.albedo.n_tex
    cam0 = torch.tensor(model.initial_camera(1 / 1.6))

    def face(shape: torch.Tensor) -> torch.Tensor:
        return model.neutral(shape[None]).vertices[0, region].reshape(-1)

    # Forward mode: one pass per input (tens of codes), not one per output coordinate
    # (thousands of face-region vertex coordinates: 16 s of CPU on the demo head).
    jacobian = functools.partial(torch.autograd.functional.jacobian, vectorize=True,
                                 strategy="forward-mode")
    F = jacobian(face, torch.zeros(ns)).double().numpy()
    mean = model.neutral(torch.zeros(1, ns)).vertices[0, region].double().numpy()
    X = mean - mean.mean(0)
    similarity = [np.tile(np.eye(3)[k], len(X)) for k in range(3)]
    similarity += [np.cross(np.eye(3)[k], X).reshape(-1) for k in range(3)] + [X.reshape(-1)]
    S = np.stack(similarity, 1)
    FQ = F - S @ np.linalg.lstsq(S, F, rcond=None)[0]  # aligned error directions per code
    # trace(FQ C FQ^T) = sum(C * FQ^T FQ): (codes x codes), never (coordinates x coordinates)
    G = FQ.T @ FQ
    prior = np.trace(G)
    precision = np.diag([1.0] * ns + [exp_std ** -2] * ne + [1e-6] * 9)
    out = []
    for yaw in yaws_deg:
        def landmarks_px(x: torch.Tensor) -> torch.Tensor:
            pose = x[ns + ne:ns + ne + 6] + torch.tensor([0, np.radians(yaw), 0, 0, 0, 0.0])
            codes = Codes(shape=x[None, :ns], tex=torch.zeros(1, nt), exp=x[None, ns:ns + ne],
                          pose=pose[None].float(), cam=(cam0 + x[ns + ne + 6:])[None],
                          light=torch.zeros(1, 9, 3))
            lmk = model.decode(codes, with_detail=False, render=False).landmarks2d
            return lmk.reshape(-1) * image_size / 2

        J = jacobian(landmarks_px, torch.zeros(ns + ne + 9)).double().numpy()
        for sigma in noise_px:
            cov = np.linalg.inv(J.T @ J / sigma ** 2 + precision)[:ns, :ns]
            out.append({"yaw_deg": yaw, "noise_px": sigma,
                        "ratio": float(np.sqrt(np.sum(G * cov) / prior))})
    return out


def loss_optimum(model, store: SampleStore, params: dict, augment: CropAugment,
                 region: np.ndarray, loss_cfg, steps: int, photometric: bool,
                 max_images: int = 32) -> dict:
    """Analysis by synthesis: where the coarse losses themselves put each image's shape.

    No encoder: each of the first ``max_images`` held-out images gets free codes (shape,
    expression, pose, camera, albedo, light; from the mean face, the encoder's initial
    camera and grey light) that Adam fits to the image by the coarse loss (landmarks, eye
    and lip closure, regularisers; with ``photometric`` also the masked photometric L1 on
    the lit render, after a landmark-only first quarter as in training). Returns the mean
    aligned neutral-shape error of the fitted codes and of the mean shape on those images,
    and their ratio. An encoder trained on these losses amortises this fit image by image,
    so its ratio is not expected to beat this one.
    """
    from recon.losses.total import coarse_code_terms, coarse_image_terms
    from recon.render.shading import SH_CONSTANTS

    device = model.device
    keys, batch = next(iter_eval_batches(store, augment, batch_size=max_images))
    batch = {k: v.to(device) for k, v in batch.items()}
    n = len(keys)
    zeros = functools.partial(torch.zeros, device=device)
    light = zeros(n, 9, 3)
    light[:, 0] = 1.0 / SH_CONSTANTS[0]
    cam = torch.tensor(model.initial_camera(model.network_config.init_face_fraction), device=device)
    codes = Codes(shape=zeros(n, model.flame.n_shape), tex=zeros(n, model.albedo.n_tex),
                  exp=zeros(n, model.flame.n_exp), pose=zeros(n, 6),
                  cam=cam.expand(n, 3).clone(), light=light)
    free = [v.requires_grad_() for v in codes.as_dict().values() if v is not None]
    opt = torch.optim.Adam(free, lr=1e-2)
    for i in range(steps):
        landmarks_only = not photometric or i < steps // 4
        rec = model.decode(codes, with_detail=False, render=not landmarks_only)
        terms = coarse_image_terms(loss_cfg, rec, batch, landmarks_only)
        terms.update(coarse_code_terms(loss_cfg, codes))
        opt.zero_grad()
        torch.stack(list(terms.values())).sum().backward()
        opt.step()
        if i == 3 * steps // 4:  # the last quarter at a lower rate settles the fit
            for group in opt.param_groups:
                group["lr"] = 2e-3
    truth = truth_shape_codes(params, keys, model.flame.n_shape)
    fit = float(np.mean(neutral_errors(model, codes.shape.detach(), truth, region)))
    base = float(np.mean(neutral_errors(model, torch.zeros_like(truth), truth, region)))
    return {"photometric": photometric, "images": n, "steps": steps, "error": fit,
            "error_mean_shape": base, "ratio": fit / base}


class ShapeProbeStep(CoarseStep):
    """The coarse step with its losses replaced by the mean squared error between the
    predicted and the true shape codes: the encoder is told the answer.

    ``truth``: (n_identities, n_shape) on the model's device, row ``i`` the code of the
    batch's identity index ``i`` (the order of ``SampleStore.identities``).
    """

    def __init__(self, model, loss_cfg, train_cfg, truth: torch.Tensor) -> None:
        super().__init__(model, loss_cfg, train_cfg)
        self.truth = truth

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        self.iteration += 1
        self.model.coarse_encoder.train()
        images = batch["images"]
        with self._autocast(images.device):
            shape = self.model.encode(images, with_detail=False).shape
        loss = ((shape - self.truth[batch["identity"]]) ** 2).mean()
        return loss, {"loss": float(loss.detach())}


def supervised_probe(cfg, out_dir: Path, train_store: SampleStore, test_store: SampleStore,
                     params: dict, augment: CropAugment, region: np.ndarray,
                     mean_error: float, device: str) -> dict:
    """Can this encoder read identity from the image at this budget at all? The same
    encoder, batches, schedule, step count and device as the benchmark's training, but
    trained on the true shape codes (mean squared error) instead of the losses. Returns its
    held-out neutral-shape error as a ratio to the mean shape's (``mean_error``, on
    ``test_store`` cropped by ``augment``), and its last training error
    (the codes' own variance is 1). Where this stays near 1, losses that only hint at the
    answer are not expected to do better at this budget."""
    losses = LossLog()
    trainer = Trainer(cfg, "coarse", out_dir, train_store, device=device, callbacks=[losses])
    names = list(train_store.identities)
    truth = torch.tensor([params["identities"][n]["shape"] for n in names], dtype=torch.float32,
                         device=trainer.device)
    # The trainer's loader, schedule and checkpoints around another step function.
    trainer.step_fn = ShapeProbeStep(trainer.model, cfg.loss, cfg.train, truth)
    result = trainer.run()
    probe = shape_errors(trainer.model, test_store, params, augment, region).errors
    last = losses.values[-max(1, len(losses.values) // 10):]
    return {"steps": result.step, "train_mse_last_tenth": float(np.mean(last)),
            "ratio": float(np.mean(probe)) / mean_error}


class LossLog(TrainerCallback):
    """Keeps every step's total loss."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step(self, trainer: Trainer, step: int, terms: dict[str, float]) -> None:
        self.values.append(terms["loss"])


class Progress(TrainerCallback):
    def __init__(self, every: int, reg_shape: float) -> None:
        self.every = every
        self.reg_shape = reg_shape
        self.t0 = time.perf_counter()

    def on_step(self, trainer: Trainer, step: int, terms: dict[str, float]) -> None:
        if step % self.every == 0:
            # reg_shape = weight x mean |code|^2 / 2: the RMS shape-code norm of the batch
            shape = terms.get("reg_shape", float("nan"))
            norm = (2 * shape / self.reg_shape) ** 0.5
            print(f"  step {step} loss {terms['loss']:.4f} "
                  f"kpt {terms.get('keypoints', float('nan')):.4f} "
                  f"lmk {terms.get('landmarks', float('nan')):.4f} "
                  f"pho {terms.get('photometric', float('nan')):.4f} |shape| {norm:.2f} "
                  f"({time.perf_counter() - self.t0:.0f} s)", flush=True)


def step_time(config_name: str, steps: int, device: str, overrides: list[str]) -> dict:
    """Seconds per image of the coarse step (full losses) with a config's batch shape."""
    from recon.deca import DECA

    cfg = load_config(config_name, [*overrides, "train.pretrain_steps=0"])  # full losses
    torch.manual_seed(0)
    model = DECA(cfg.face_model, cfg.model).to(device)
    step = CoarseStep(model, cfg.loss, cfg.train)
    opt = torch.optim.Adam(step.parameters(), lr=cfg.train.lr)
    n, k = cfg.train.batch_shape("coarse")
    B, S = n * k, cfg.model.image_size
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(B, 3, S, S, generator=g),
             "landmarks": (torch.rand(B, 68, 2, generator=g) - 0.5) * 0.6,
             "masks": torch.ones(B, 1, S, S),
             "identity": torch.arange(n).repeat_interleave(k)}
    batch = {key: v.to(device) for key, v in batch.items()}
    times = []
    for i in range(steps + 1):  # the first is a warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = step(batch)
        step.optim_step(loss, opt)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    per_step = float(np.median(times))
    return {"config": config_name, "device": device, "batch": B, "image_size": S,
            "backbone": cfg.model.backbone, "s_per_step": per_step, "s_per_image": per_step / B}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--steps", type=int, default=None, help="default: the config's train.steps")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="instead of --steps: as many steps as this many seconds of full-loss "
                         "steps allow, by the config's measured step time (data loading not "
                         "counted), so a schedule like cosine still runs to its end")
    ap.add_argument("--identities", type=int, default=48)
    ap.add_argument("--images-per-identity", type=int, default=6)
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=128, help="synthetic image size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: on a busy 2-core machine 2 threads spin)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-paper", action="store_true", help="no paper-config step timing")
    ap.add_argument("--timing-steps", type=int, default=2)
    ap.add_argument("--optimum-steps", type=int, default=1600,
                    help="Adam steps of the per-image loss optimum (0: skip it)")
    ap.add_argument("--optimum-images", type=int, default=32,
                    help="held-out images the loss optimum fits")
    ap.add_argument("--probe", action="store_true",
                    help="also train the encoder on the true shape codes, same budget: can it "
                         "read identity at all?")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", type=Path,
                    help="write the synthetic set (synth/) and the run's checkpoints (run/) "
                         "here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    if args.steps is not None and args.train_seconds is not None:
        ap.error("give --steps or --train-seconds, not both")
    torch.set_num_threads(args.threads)

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.train_seconds is not None:
        per_step = step_time(args.config, 3, args.device, overrides)["s_per_step"]
        steps = max(1, int(args.train_seconds / per_step))
        print(f"--train-seconds {args.train_seconds:g}: {per_step:.3f} s/step -> {steps} steps",
              flush=True)
        overrides.append(f"train.steps={steps}")
    cfg = with_stage_weights(load_config(args.config, overrides), "coarse")
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}"}
    with (contextlib.nullcontext(str(args.keep)) if args.keep
          else tempfile.TemporaryDirectory()) as tmp:
        root = Path(tmp) / "synth"
        t, cpu = time.perf_counter(), time.process_time()
        synth_cfg = cfg.synth.model_copy(update={
            "identities": args.identities, "images_per_identity": args.images_per_identity,
            "image_size": args.image_size, "seed": args.seed})
        generate(root, synth_cfg, cfg.face_model)
        n_img = args.identities * args.images_per_identity
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        report["synth_images_per_min"] = 60 * n_img / wall
        report["synth_images_per_cpu_min"] = 60 * n_img / cpu
        print(f"synth: {n_img} images at {args.image_size} px in {wall:.1f} s "
              f"({cpu:.1f} s CPU)", flush=True)
        params = load_params(root)
        names = sorted(params["identities"])
        held = set(names[-args.held_out:])
        train_store = SampleStore.from_samples(iter_samples(root, set(names) - held))
        test_store = SampleStore.from_samples(iter_samples(root, held))

        trainer = Trainer(cfg, "coarse", Path(tmp) / "run", train_store, device=args.device,
                          callbacks=[Progress(max(1, cfg.train.steps // 10), cfg.loss.reg_shape)])
        model = trainer.model
        region = face_region(cfg.face_model)
        augment = CropAugment(out_size=cfg.model.image_size, eval_scale=cfg.data.eval_scale)
        signal = identity_signal(model, params, sorted(test_store.key_identity)[:64],
                                 cfg.loss.reg_shape, cfg.model.init_face_fraction)
        before = shape_errors(model, test_store, params, augment, region)
        untrained, mean = before.errors, before.mean_shape_errors
        optimum = [loss_optimum(model, test_store, params, augment, region, cfg.loss,
                                args.optimum_steps, photometric, args.optimum_images)
                   for photometric in (False, True) if args.optimum_steps > 0]
        t = time.perf_counter()
        result = trainer.run()
        train_s = time.perf_counter() - t
        pairs: list = []
        lmk_px: list = []
        kpt_px: list = []
        trained = shape_errors(model, test_store, params, augment, region, code_pairs=pairs,
                               landmark_px=lmk_px, keypoint_px=kpt_px).errors
        refined_px: list = []
        t = time.perf_counter()
        refined = (shape_errors(model, test_store, params, augment, region,
                                landmark_px=refined_px, refine=cfg.model.refine).errors
                   if cfg.model.refine.steps > 0 else None)
        refine_s = time.perf_counter() - t
        probe = (supervised_probe(cfg, Path(tmp) / "probe", train_store, test_store, params,
                                  augment, region, float(np.mean(mean)), args.device)
                 if args.probe else None)
    m_mean, m_untrained, m_trained = (float(np.mean(e)) for e in (mean, untrained, trained))
    report.update({
        "config": args.config, "steps": result.step, "train_seconds": train_s,
        "train_images": len(train_store), "train_identities": len(train_store.identities),
        "held_out_images": len(test_store), "held_out_identities": len(test_store.identities),
        "error_mean_shape": m_mean, "error_untrained": m_untrained, "error_trained": m_trained,
        "error_mean_shape_mm": 1000 * m_mean, "error_untrained_mm": 1000 * m_untrained,
        "error_trained_mm": 1000 * m_trained,
        "ratio_trained_to_mean": m_trained / m_mean,
        "ratio_untrained_to_mean": m_untrained / m_mean,
        "goal_met": m_trained <= 0.5 * m_mean,
        # the reconstruction as `wildface reconstruct` runs it: encoder + fit to the photo
        "refine_steps": cfg.model.refine.steps,
        "refine_photometric": cfg.model.refine.photometric,
        "refine_seconds_per_image": None if refined is None else refine_s / len(refined),
        "error_refined_mm": None if refined is None else 1000 * float(np.mean(refined)),
        "ratio_refined_to_mean": None if refined is None else float(np.mean(refined)) / m_mean,
        "held_out_landmark_px_refined": float(np.mean(refined_px)) if refined_px else None,
        **signal,
        "shape_code_norm_predicted": float(np.mean([np.linalg.norm(p) for p, _ in pairs])),
        "shape_code_norm_true": float(np.mean([np.linalg.norm(t) for _, t in pairs])),
        # does the encoder see identity at all? ~0 (noise ~1/sqrt(images)) if not
        "shape_code_correlation": [
            float(np.corrcoef([p[i] for p, _ in pairs], [t[i] for _, t in pairs])[0, 1])
            for i in range(5)],
        "held_out_landmark_px": float(np.mean(lmk_px)),
        "held_out_keypoint_px": float(np.mean(kpt_px)) if kpt_px else None,
    })
    print(f"neutral-shape error on {len(test_store)} held-out images "
          f"({len(test_store.identities)} identities), face region, after similarity alignment:")
    for name, v in (("mean shape", m_mean), ("untrained", m_untrained), ("trained", m_trained)):
        print(f"  {name:10s} {v:.6f} units ({1000 * v:.3f} mm)  ratio {v / m_mean:.3f}")
    if refined is not None:
        ratio = report["ratio_refined_to_mean"]
        print(f"  {'+ refined':10s} {float(np.mean(refined)):.6f} units "
              f"({report['error_refined_mm']:.3f} mm)  ratio {ratio:.3f}  (encoder, then "
              f"{cfg.model.refine.steps} Adam steps fitting its codes to its own keypoints"
              f"{' and the photo' if cfg.model.refine.photometric > 0 else ''}; landmarks "
              f"{report['held_out_landmark_px_refined']:.2f} px; "
              f"{report['refine_seconds_per_image']:.1f} s/image)")
    print(f"  goal trained <= 0.5 x mean shape: {'met' if report['goal_met'] else 'NOT met'}"
          + ("" if refined is None else
             f" (encoder alone); with the refinement: "
             f"{'met' if report['ratio_refined_to_mean'] <= 0.5 else 'NOT met'}"))
    print(f"  shape-code norm: predicted {report['shape_code_norm_predicted']:.2f}, "
          f"true {report['shape_code_norm_true']:.2f} (mean over held-out images)")
    print("  correlation of predicted and true shape codes, components 0-4: "
          + " ".join(f"{r:+.2f}" for r in report["shape_code_correlation"])
          + f" (|r| below ~{2 / np.sqrt(len(pairs)):.2f} is noise at {len(pairs)} images)")
    print(f"  held-out 68-landmark error: {report['held_out_landmark_px']:.2f} px "
          f"(mean distance in the {cfg.model.image_size} px crop)")
    if kpt_px:
        print(f"  held-out keypoint-head error: {report['held_out_keypoint_px']:.2f} px "
              "(its located points against the true landmarks)")
    print(f"  training: {result.step} steps in {train_s:.0f} s")
    data, prior = signal["landmark_loss_of_mean_shape"], signal["shape_prior_at_truth"]
    print(f"identity signal: landmark loss of the mean shape {data:.4f} vs shape prior at the "
          f"truth {prior:.4f} (reg_shape {cfg.loss.reg_shape:g})"
          + ("; prior > signal: the optimum leans to the mean shape" if prior > data else ""))

    report["supervised_probe"] = probe
    if probe is not None:
        print(f"supervised probe (the same encoder and budget, trained on the true shape "
              f"codes): held-out ratio {probe['ratio']:.3f}, training error "
              f"{probe['train_mse_last_tenth']:.3f} over its last tenth (1 = the codes' "
              "variance)")

    report["loss_optimum"] = optimum
    if optimum:
        print(f"loss optimum (analysis by synthesis: codes fitted per image by the coarse "
              f"loss, no encoder; {optimum[0]['images']} held-out images, "
              f"{args.optimum_steps} Adam steps): an encoder trained on these losses is not "
              "expected to beat it")
        for o in optimum:
            losses = "+ photometric" if o["photometric"] else "landmarks only"
            print(f"  {losses:14s} {1000 * o['error']:.3f} mm vs mean shape "
                  f"{1000 * o['error_mean_shape']:.3f} mm: ratio {o['ratio']:.3f}")

    # a mean 2D distance d is per-coordinate Gaussian noise of d / sqrt(pi / 2)
    held_sigma = report["held_out_landmark_px"] / np.sqrt(np.pi / 2)
    sigmas = sorted({0.25, 0.5, 1.0, round(held_sigma, 2)})
    report["landmark_ceiling"] = landmark_ceiling(model.cpu(), region, cfg.model.image_size,
                                                  sigmas, cfg.synth.exp_std)
    print("landmark-only ceiling (best RMS ratio any regressor reaches from 68 landmarks "
          f"with this per-coordinate noise, {cfg.model.image_size} px crop; the trained "
          f"model's held-out error is {held_sigma:.2f} px per coordinate):")
    for c in report["landmark_ceiling"]:
        print(f"  yaw {c['yaw_deg']:.0f} deg, noise {c['noise_px']:.2f} px: ratio {c['ratio']:.3f}")

    timings = [step_time("demo", args.timing_steps, args.device, [])]
    if not args.skip_paper:
        timings.append(step_time("paper", args.timing_steps, args.device, []))
    report["step_time"] = timings
    for t in timings:
        print(f"step time {t['config']} ({t['backbone']}, batch {t['batch']}, "
              f"{t['image_size']} px, {t['device']}): {t['s_per_step']:.2f} s/step, "
              f"{1000 * t['s_per_image']:.1f} ms/image")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
