"""Reconstruction speed: milliseconds per face, CPU with 2 threads (and GPU when present).

Cases, each at batch 1 and 32 (``--batch``):

- ``crop``: a face crop in, codes + coarse mesh + detail displacement/normals out
  (``FaceReconstructor.reconstruct(crops, render=False)``: both encoders, FLAME, the detail
  decoder; what a batch job needs besides writing files);
- ``crop+render``: the same plus the renders of the visual grid (coarse, detail, textured);
- ``photo``: from a decoded photo: dlib HOG detection, 68 landmarks, crop, then ``crop``
  (batch 1; scikit-image's astronaut, 512 x 512, one face);
- ``refine`` / ``refine+photo``: the test-time refinement (``model.refine``) of a
  keypoint-head copy of the model, ``--refine-steps`` Adam steps, keypoints only / with the
  photometric phase; its ms/face are for the refinement alone, per 1000 steps
  (``--refine-steps 0`` skips them).

Models (random weights: speed does not depend on them): ``demo`` = ``configs/demo.yaml``
(ResNet18, 128 px crops, 64 px UV maps), ``paper`` = the paper's setup (ResNet50, 224 px,
256 px UV maps). Goal: <= 60 ms per face from a crop with the demo backbone on CPU.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/inference.py [--repeats 5]``.
Figures are in docs/reconstruct.md with the machine they ran on.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flows.config import load_config

MODELS = {"demo": ("demo", []), "paper": (None, [])}


def _model(name: str, device: str, tmp: Path, refine=None):
    """A randomly initialised model, saved and loaded as users load one; ``refine``: a
    ``RefineConfig`` for a keypoint-head copy that runs it."""
    from recon.deca import DECA
    from recon.inference.reconstruct import load_model
    from recon.training.checkpoint import save_checkpoint

    config, overrides = MODELS[name]
    cfg = load_config(config, overrides + (["model.head=keypoints"] if refine else []))
    torch.manual_seed(0)
    model = DECA(cfg.face_model, cfg.model)
    path = save_checkpoint(tmp / f"{name}.pt", stage="detail", step=0,
                           model=model.state_dict(), optimizer={},
                           config_json=cfg.model_dump_json(), face_model=model.face_model_name)
    return load_model(path, device=device, refine=refine), cfg


def _time(fn, repeats: int) -> tuple[float, float]:
    """Best wall seconds and the CPU seconds (all threads) of that run."""
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refine-steps", type=int, default=100,
                    help="Adam steps of the refinement cases (0: skip them)")
    ap.add_argument("--cases", nargs="+", default=["crop", "photo", "refine"],
                    help="crop (crop and crop+render), photo, refine (refine, refine+photo)")
    ap.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                    help="default: the CPU, and CUDA when present")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {args.threads} CPU threads, best of {args.repeats}")
    print(f"{'model':<6} {'device':<6} {'case':<12} {'batch':>5} {'ms/face':>9} {'cpu ms/face':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for device in devices:
                # The refinement cases build their own models: only crop and photo use this one.
                if {"crop", "photo"} & set(args.cases):
                    recon, cfg = _model(name, device, Path(tmp))
                    S = recon.image_size
                for batch in args.batch if "crop" in args.cases else []:
                    crops = np.random.default_rng(0).integers(0, 255, (batch, S, S, 3), np.uint8)
                    with torch.no_grad():
                        for case, render in (("crop", False), ("crop+render", True)):
                            reps = args.repeats if batch == 1 or case == "crop" else max(1, args.repeats // 2)
                            s, c = _time(lambda: recon.inference.reconstruct(crops, render=render), reps)
                            print(f"{name:<6} {device:<6} {case:<12} {batch:>5} "
                                  f"{1000 * s / batch:>9.1f} {1000 * c / batch:>12.1f}", flush=True)
                if "refine" in args.cases and args.refine_steps > 0:
                    _time_refinement(name, device, Path(tmp), args)
                if "photo" not in args.cases:
                    continue
                from skimage import data  # the photo case's only need for it

                from preprocessing.faces import FaceFinder, crop_face

                photo = np.asarray(data.astronaut())[..., :3]
                finder = FaceFinder(cfg.preprocess)

                def from_photo():
                    faces, _ = finder.find(photo)
                    crop, _, _ = crop_face(photo, faces[0].landmarks, S, recon.crop_scale)
                    recon.inference.reconstruct(crop[None], render=False)

                s, c = _time(from_photo, args.repeats)
                print(f"{name:<6} {device:<6} {'photo':<12} {1:>5} {1000 * s:>9.1f} "
                      f"{1000 * c:>12.1f}", flush=True)


def _time_refinement(name: str, device: str, tmp: Path, args) -> None:
    """ms/face per 1000 refinement steps: encode with the refinement minus encode without."""
    from recon.config import RefineConfig

    for case, photometric in (("refine", 0.0), ("refine+photo", 2.0)):
        recon, _ = _model(name, device, tmp, RefineConfig(steps=args.refine_steps,
                                                          photometric=photometric))
        for batch in args.batch:
            crops = torch.rand(batch, 3, recon.image_size, recon.image_size,
                               generator=torch.Generator().manual_seed(0)).to(recon.device)
            reps = max(1, args.repeats // 2)
            with torch.no_grad():
                plain = _time(lambda: recon.model.encode(crops), reps)
                refined = _time(lambda: recon.encode(crops), reps)  # the refining path
            per = 1000 * 1000 / args.refine_steps / batch  # ms/face per 1000 steps
            print(f"{name:<6} {device:<6} {case:<12} {batch:>5} "
                  f"{(refined[0] - plain[0]) * per:>9.0f} {(refined[1] - plain[1]) * per:>12.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
