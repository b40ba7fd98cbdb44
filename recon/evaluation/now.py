"""The NoW protocol: scan crop, alignment, scan-to-mesh distances, statistics, artefacts.

Per image: crop the subject's scan around the face (from its 7 picked points), align the
predicted neutral mesh to the scan (landmark Procrustes, then ICP refinement), and take
the exact unsigned distance of every cropped scan vertex to the predicted surface (mm).
Statistics (median, mean, std) are over all distances of all images concatenated, as in
the official evaluation, per challenge and overall.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from recon.evaluation.alignment import Similarity, landmark_alignment, refine_alignment
from recon.evaluation.config import EvaluationConfig
from recon.evaluation.now_io import (
    CHALLENGES,
    NowFormatError,
    NowImage,
    find_prediction,
    find_scan,
    image_list_path,
    read_image_list,
    read_landmarks,
    read_mesh,
    read_pp,
)
from recon.evaluation.point_to_mesh import MeshDistance
from recon.formats.files import atomic_write_bytes as _atomic_bytes

CURVE_STEP_MM = 0.01


def crop_region(scan_lmk: np.ndarray) -> tuple[np.ndarray, float]:
    """Face crop sphere from the scan's 7 landmarks (7, 3) -> (centre (3,), radius).

    centre = nose_bottom + 0.3 (mid inner eye corners - nose_bottom);
    radius = 1.4 (outer-eye distance + nose distance) / 2, where the nose distance runs
    from the inner-eye midpoint to the nose bottom. Indices: outer eye corners 0 and 3,
    inner eye corners 1 and 2, nose bottom 4.
    """
    lmk = np.asarray(scan_lmk, np.float64)
    nose_bottom = lmk[4]
    nose_bridge = (lmk[1] + lmk[2]) / 2
    centre = nose_bottom + 0.3 * (nose_bridge - nose_bottom)
    outer_eye = np.linalg.norm(lmk[0] - lmk[3])
    nose = np.linalg.norm(nose_bridge - nose_bottom)
    return centre, float(1.4 * (outer_eye + nose) / 2)


def crop_scan(scan_points: np.ndarray, scan_lmk: np.ndarray) -> np.ndarray:
    """Scan vertices (N, 3) within the crop sphere (inclusive) -> (M, 3)."""
    centre, radius = crop_region(scan_lmk)
    keep = np.linalg.norm(scan_points - centre, axis=1) <= radius
    return scan_points[keep]


@dataclass
class ImageResult:
    """Distances (mm) of one image's cropped scan vertices, and how they were aligned."""

    distances: np.ndarray
    transform: Similarity
    iterations: int


def evaluate_image(
    scan_points: np.ndarray,
    scan_lmk: np.ndarray,
    pred_verts: np.ndarray,
    pred_faces: np.ndarray,
    pred_lmk: np.ndarray,
    cfg: EvaluationConfig | None = None,
    *,
    cropped: bool = False,
) -> ImageResult:
    """Score one prediction against its scan.

    scan_points: (N, 3) scan vertices (mm); scan_lmk: (7, 3); pred_verts: (V, 3);
    pred_faces: (F, 3); pred_lmk: (7, 3) in the prediction's frame/unit. ``cropped``:
    scan_points are already cropped.
    """
    cfg = cfg or EvaluationConfig()
    pts = np.asarray(scan_points, np.float64)
    if not cropped:
        pts = crop_scan(pts, scan_lmk)
    if len(pts) == 0:
        raise ValueError("no scan vertex inside the face crop: check the scan landmarks")
    mesh = MeshDistance(pred_verts, pred_faces)
    fixed_scale = cfg.unit_factor if cfg.metrical else None
    init = landmark_alignment(pred_lmk, scan_lmk, fixed_scale)
    refined = refine_alignment(
        pts, mesh, init,
        estimate_scale=not cfg.metrical,
        max_iters=cfg.refine_iters,
        tol=cfg.refine_tol,
        max_points=cfg.refine_points,
    )
    tf = refined.transform
    dist = tf.scale * mesh.query(tf.inverse_apply(pts)).distances
    return ImageResult(dist, tf, refined.iterations)


def summarize(distances: np.ndarray) -> dict[str, float]:
    """median, mean, std (population, as numpy) and count of a distance array."""
    d = np.asarray(distances, np.float64)
    if len(d) == 0:
        return {"median": float("nan"), "mean": float("nan"), "std": float("nan"), "n": 0}
    return {"median": float(np.median(d)), "mean": float(d.mean()), "std": float(d.std()), "n": int(len(d))}


def cumulative_curve(distances: np.ndarray, max_mm: float = 8.0, step: float = CURVE_STEP_MM):
    """Percentage of distances <= each threshold in [0, max_mm] -> (thresholds, percent)."""
    thr = np.round(np.arange(0.0, max_mm + step / 2, step), 10)
    d = np.sort(np.asarray(distances, np.float64))
    pct = 100.0 * np.searchsorted(d, thr, side="right") / max(len(d), 1)
    return thr, pct


# ---- dataset-level evaluation ------------------------------------------------------------


@lru_cache(maxsize=4)
def _cropped_scan(mesh_path: str, pp_path: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached per process: the images of a subject share one scan and arrive together.
    verts, _ = read_mesh(mesh_path)
    lmk = read_pp(pp_path)
    return crop_scan(verts, lmk), lmk


@dataclass
class _Scored:
    """One image's outcome: distances, or why there are none (``failed``: a prediction was
    there but could not be read or scored; otherwise it is missing)."""

    image: NowImage
    distances: np.ndarray | None
    reason: str = ""
    failed: bool = False


def _score_one(args: tuple[str, str, NowImage, EvaluationConfig]) -> _Scored:
    dataset_dir, predictions_dir, image, cfg = args
    pred = find_prediction(predictions_dir, image)
    if pred.mesh is None or pred.landmarks is None:
        what = "mesh" if pred.mesh is None else "landmarks"
        return _Scored(image, None, f"missing predicted {what}")
    scan = find_scan(dataset_dir, image.subject)
    pts, lmk = _cropped_scan(str(scan.mesh), str(scan.landmarks))
    try:
        verts, faces = read_mesh(pred.mesh)
        res = evaluate_image(pts, lmk, verts, faces, read_landmarks(pred.landmarks), cfg, cropped=True)
        if not np.isfinite(res.distances).all():
            raise ValueError("the alignment gave non-finite distances")
    except Exception as e:  # noqa: BLE001 - one bad prediction fails its image, not the evaluation
        why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        return _Scored(image, None, f"invalid prediction: {why}", failed=True)
    return _Scored(image, res.distances.astype(np.float32))


def _write_parquet(path: Path, rows: list[tuple[NowImage, np.ndarray]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "subject": [im.subject for im, _ in rows],
        "challenge": [im.challenge for im, _ in rows],
        "image": [im.rel_path for im, _ in rows],
        "n_points": pa.array([len(d) for _, d in rows], pa.int64()),
        "median": [float(np.median(d)) for _, d in rows],
        "mean": [float(d.mean()) for _, d in rows],
        "distances": pa.array([d for _, d in rows], pa.list_(pa.float32())),
    })
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_curve_png(path: Path, thr: np.ndarray, curves: dict[str, np.ndarray], max_mm: float) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot(111)
    for name, pct in curves.items():
        ax.plot(thr, pct, label=name, lw=2.0 if name == "all" else 1.0)
    ax.set_xlim(0, max_mm)
    ax.set_ylim(0, 100)
    ax.set_xlabel("Error [mm]")
    ax.set_ylabel("Percentage of scan vertices")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_bytes(path, buf.getvalue())


def evaluate_now(
    dataset_dir: str | os.PathLike,
    predictions_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: EvaluationConfig | None = None,
) -> dict:
    """Score a predictions folder on a NoW-layout dataset; write the artefacts.

    Writes to ``out_dir``: ``metrics.json`` (``median``, ``mean``, ``std`` in mm over all
    distances, ``challenges`` with the same per challenge, counts, missing predictions,
    settings), ``distances.parquet`` (one row per image with its distances),
    ``cumulative_curve.csv`` and ``cumulative_curve.png``. Returns the metrics dict.
    Images without a prediction are counted as missing (as the official code counts missing
    files); an unreadable or invalid prediction (malformed file, NaN/inf coordinates, wrong
    landmarks, an alignment that fails) fails its image only, and is listed in ``failed``
    with the reason while the others are scored. No usable prediction at all is an error,
    and so is a missing or malformed scan.
    """
    cfg = cfg or EvaluationConfig()
    dataset_dir, predictions_dir, out = Path(dataset_dir), Path(predictions_dir), Path(out_dir)
    if not predictions_dir.is_dir():
        raise NowFormatError(f"predictions folder not found: {predictions_dir}")
    images = sorted(read_image_list(image_list_path(dataset_dir, cfg.split)))
    for subject in sorted({im.subject for im in images}):
        find_scan(dataset_dir, subject)  # fail early on a missing scan
    jobs = [(str(dataset_dir), str(predictions_dir), im, cfg) for im in images]
    if cfg.workers == 1 or len(jobs) == 1:
        results = [_score_one(j) for j in jobs]
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs)), mp_context=ctx) as pool:
            results = list(pool.map(_score_one, jobs, chunksize=max(1, len(jobs) // (8 * cfg.workers))))

    rows = [(r.image, r.distances) for r in results if r.distances is not None]
    missing = [{"image": r.image.rel_path, "reason": r.reason} for r in results
               if r.distances is None and not r.failed]
    failed = [{"image": r.image.rel_path, "reason": r.reason} for r in results if r.failed]
    if not rows:
        detail = f" ({len(failed)} failed, first: {failed[0]['image']}: {failed[0]['reason']})" if failed else ""
        raise NowFormatError(f"no prediction found for any of the {len(images)} images in "
                             f"{predictions_dir}{detail}")

    all_d = np.concatenate([d for _, d in rows]).astype(np.float64)
    metrics: dict = {
        **{k: v for k, v in summarize(all_d).items() if k != "n"},
        "n_points": int(len(all_d)),
        "n_images": len(rows),
        "n_missing": len(missing),
        "missing": missing,
        "n_failed": len(failed),
        "failed": failed,
        "split": cfg.split,
        "metrical": cfg.metrical,
        "unit": "mm",
        "challenges": {},
    }
    thr, pct_all = cumulative_curve(all_d, cfg.curve_max_mm)
    curves = {"all": pct_all}
    for cdir, name in CHALLENGES.items():
        ds = [d for im, d in rows if im.challenge_dir == cdir]
        if ds:
            cd = np.concatenate(ds).astype(np.float64)
            metrics["challenges"][name] = {**summarize(cd), "n_images": len(ds)}
            curves[name] = cumulative_curve(cd, cfg.curve_max_mm)[1]

    out.mkdir(parents=True, exist_ok=True)
    _write_parquet(out / "distances.parquet", rows)
    header = "threshold_mm," + ",".join(f"pct_{k}" for k in curves)
    table = np.column_stack([thr, *curves.values()])
    lines = [header] + [",".join(f"{x:.4f}" for x in r) for r in table]
    _atomic_bytes(out / "cumulative_curve.csv", ("\n".join(lines) + "\n").encode())
    _write_curve_png(out / "cumulative_curve.png", thr, curves, cfg.curve_max_mm)
    _atomic_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics
