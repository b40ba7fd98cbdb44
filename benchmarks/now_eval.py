"""Seconds per scan of the NoW protocol (crop, landmark alignment, ICP refinement, exact
scan-to-mesh distances) on CPU.

Setting: a procedural head mesh of 5000 vertices / 9800 faces (FLAME: 5023 / 9976) as
the prediction, with a 1 mm smooth shape error and 2 mm landmark noise so that the
refinement has work to do; the scan is a dense subdivision of the head. Two sizes:
``scan120k`` (123k scan vertices, ~32k inside the face crop, like a NoW scan) and
``crop120k`` (490k scan vertices, ~128k inside the crop: every one of ~120k points
measured, the issue's worst case). One process per scan; ``--workers 2`` runs scans in
parallel to give the throughput on 2 cores.

    .venv/bin/python benchmarks/now_eval.py [--repeats 3] [--workers 2]

Prints wall and CPU seconds per scan: on a shared machine the CPU seconds are the cost of
a scan (the work is single-threaded). Figures are in docs/evaluation.md (with the machine).
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from recon.evaluation.config import EvaluationConfig
from recon.evaluation.now import crop_scan, evaluate_image
from recon.evaluation.now_synthetic import head_mesh, landmark_vertices, random_similarity, subdivide, vertex_normals


def make_case(subdivision: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    verts, faces = head_mesh(50, 100)
    lmk = verts[landmark_vertices(verts)]
    scan, _ = subdivide(verts, faces, subdivision)
    bump = np.sin(verts * np.array([0.07, 0.05, 0.06]) + rng.uniform(0, 6, 3)).prod(axis=1)
    pred = verts + 1.0 * bump[:, None] * vertex_normals(verts, faces)
    tf = random_similarity(rng)
    pred_lmk = tf.apply(lmk + rng.normal(scale=2.0, size=lmk.shape))
    return scan, lmk, tf.apply(pred), faces, pred_lmk


def run_once(args) -> tuple[float, float, int, float]:
    """-> (wall s, CPU s of this process, ICP steps, median error mm) of one scan."""
    subdivision, cfg = args
    scan, lmk, pv, pf, pl = make_case(subdivision)
    t, c = time.perf_counter(), time.process_time()
    res = evaluate_image(scan, lmk, pv, pf, pl, cfg)
    return (time.perf_counter() - t, time.process_time() - c, res.iterations,
            float(np.median(res.distances)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--refine-points", type=int, default=EvaluationConfig().refine_points,
                    help="0 = all cropped points in every refinement step")
    args = ap.parse_args()
    cfg = EvaluationConfig(refine_points=args.refine_points or None)
    print(f"cpus={os.cpu_count()} refine_points={cfg.refine_points} refine_iters={cfg.refine_iters}")
    for name, sub in (("scan120k", 5), ("crop120k", 10)):
        n_scan = len(make_case(sub)[0])
        n_crop = len(crop_scan(*make_case(sub)[:2]))
        times = [run_once((sub, cfg)) for _ in range(args.repeats)]
        best = min(t for t, *_ in times)
        best_cpu = min(c for _, c, *_ in times)
        _, _, iters, med = times[0]
        # CPU seconds are what a scan costs when the machine is not shared (the work is
        # single-threaded); wall seconds include waiting for other processes.
        print(f"{name}: scan {n_scan} verts, {n_crop} cropped; {iters} ICP steps; "
              f"median error {med:.4f} mm; {best:.3f} s/scan wall, {best_cpu:.3f} s CPU "
              f"(best of {args.repeats}, 1 process)")
        if args.workers > 1:
            jobs = [(sub, cfg)] * (2 * args.workers)
            with ProcessPoolExecutor(args.workers) as pool:
                list(pool.map(run_once, jobs[: args.workers]))  # warm up the workers
                t = time.perf_counter()
                inner = list(pool.map(run_once, jobs))
                wall = time.perf_counter() - t
            # setup (mesh generation) runs in the workers too: report the scoring time only
            per_scan = sum(r[0] for r in inner) / len(inner)
            print(f"{name}: {args.workers} workers: {per_scan:.3f} s per scan each, "
                  f"{per_scan / args.workers:.3f} s per scan of throughput (wall {wall:.1f} s with setup)")


if __name__ == "__main__":
    main()
