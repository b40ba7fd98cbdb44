"""Reconstruction speed: milliseconds per face, CPU with 2 threads (and GPU when present).

Cases, each at batch 1 and 32 (``--batch``):

- ``crop``: a face crop in, codes + coarse mesh + detail displacement/normals out
  (``FaceReconstructor.reconstruct(crops, render=False)``: both encoders, FLAME, the detail
  decoder; what a batch job needs besides writing files);
- ``crop+render``: the same plus the renders of the visual grid (coarse, detail, textured);
- ``photo``: from a decoded photo: dlib HOG detection, 68 landmarks, crop, then ``crop``
  (batch 1; scikit-image's astronaut, 512 x 512, one face).

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


def _model(name: str, device: str, tmp: Path):
    from recon.deca import DECA
    from recon.reconstruct import load_model
    from recon.training.checkpoint import save_checkpoint

    config, overrides = MODELS[name]
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = DECA(cfg.face_model, cfg.model)
    path = save_checkpoint(tmp / f"{name}.pt", stage="detail", step=0,
                           model=model.state_dict(), optimizer={},
                           config_json=cfg.model_dump_json(), face_model=model.face_model_name)
    return load_model(path, device=device), cfg


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    from skimage import data

    photo = np.asarray(data.astronaut())[..., :3]
    print(f"torch {torch.__version__}, {args.threads} CPU threads, best of {args.repeats}")
    print(f"{'model':<6} {'device':<6} {'case':<12} {'batch':>5} {'ms/face':>9} {'cpu ms/face':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for device in devices:
                recon, cfg = _model(name, device, Path(tmp))
                S = recon.image_size
                for batch in args.batch:
                    crops = np.random.default_rng(0).integers(0, 255, (batch, S, S, 3), np.uint8)
                    with torch.no_grad():
                        for case, render in (("crop", False), ("crop+render", True)):
                            reps = args.repeats if batch == 1 or case == "crop" else max(1, args.repeats // 2)
                            s, c = _time(lambda: recon.reconstruct(crops, render=render), reps)
                            print(f"{name:<6} {device:<6} {case:<12} {batch:>5} "
                                  f"{1000 * s / batch:>9.1f} {1000 * c / batch:>12.1f}", flush=True)
                from flows.reconstruct import FaceFinder, crop_face

                finder = FaceFinder(cfg.preprocess)

                def from_photo():
                    faces, _ = finder.find(photo)
                    crop, _, _ = crop_face(photo, faces[0].landmarks, S, recon.crop_scale)
                    recon.reconstruct(crop[None], render=False)

                s, c = _time(from_photo, args.repeats)
                print(f"{name:<6} {device:<6} {'photo':<12} {1:>5} {1000 * s:>9.1f} "
                      f"{1000 * c:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
