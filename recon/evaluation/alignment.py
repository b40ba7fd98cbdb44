"""Alignment of a predicted mesh to a scan: landmark Procrustes, then ICP refinement.

Transforms map the prediction into the scan's frame (``x -> s R x + t``), so distances stay
in the scan's unit (mm for NoW). No reflections: rotations are proper (det +1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recon.evaluation.point_to_mesh import MeshDistance


@dataclass(frozen=True)
class Similarity:
    """``x -> scale * rotation @ x + translation``; rotation (3, 3), translation (3,)."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x: (N, 3) -> (N, 3)."""
        return self.scale * x @ self.rotation.T + self.translation

    def inverse_apply(self, y: np.ndarray) -> np.ndarray:
        """y: (N, 3) -> (N, 3), the inverse map."""
        return (y - self.translation) @ self.rotation / self.scale


def umeyama(src: np.ndarray, dst: np.ndarray, scale: float | None = None) -> Similarity:
    """Least-squares similarity ``T`` minimising ``sum |T(src_i) - dst_i|^2`` (Umeyama 1991).

    src, dst: (N, 3). ``scale=None`` estimates the scale; a number fixes it (rigid fit of
    ``scale * src``).
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 3:
        raise ValueError(f"need matching (N>=3, 3) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[2] = -1.0
    rot = (u * d) @ vt
    if scale is None:
        var_s = (xs**2).sum() / len(src)
        if var_s <= 0:
            raise ValueError("source points are all identical")
        scale = float((sig * d).sum() / var_s)
    trans = mu_d - scale * rot @ mu_s
    return Similarity(float(scale), rot, trans)


def aligned_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance between corresponding vertices after a similarity alignment of
    ``pred`` onto ``truth`` (the shape error when scale and pose are not the shape's).
    pred, truth: (V, 3)."""
    sim = umeyama(pred, truth)
    return float(np.linalg.norm(sim.apply(pred) - truth, axis=1).mean())


def landmark_alignment(pred_lmk: np.ndarray, scan_lmk: np.ndarray, scale: float | None = None) -> Similarity:
    """Similarity Procrustes on the 7 landmark pairs (pred -> scan). (7, 3) each.

    ``scale`` fixed (metrical protocol: the unit conversion) or None (estimated).
    """
    return umeyama(pred_lmk, scan_lmk, scale)


@dataclass
class RefineResult:
    transform: Similarity
    #: Gauss-Newton steps taken (``max_iters`` at most; 0 = the initial transform)
    iterations: int
    #: mean squared scan-to-mesh distance of the refinement points at each visited transform
    history: list[float] = field(default_factory=list)


def _rodrigues(w: np.ndarray) -> np.ndarray:
    theta = float(np.linalg.norm(w))
    if theta < 1e-15:
        return np.eye(3)
    k = w / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def _gauss_newton_step(p: np.ndarray, q: np.ndarray, n: np.ndarray, estimate_scale: bool,
                       damping: float = 1e-9) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """One Gauss-Newton step on sum(((q_i' - p_i) . n_i)^2) for an update of the closest
    points q (N, 3) about the centroid c of p: q' = e^sigma R(w) (q - c) + c + delta.

    n (N, 3) are unit directions of the residuals. Returns (w, sigma, delta, c).
    """
    c = p.mean(0)
    a = q - c
    cols = [np.cross(a, n), n] + ([np.einsum("ij,ij->i", a, n)[:, None]] if estimate_scale else [])
    J = np.concatenate(cols, axis=1)
    r = np.einsum("ij,ij->i", q - p, n)
    H = J.T @ J
    H[np.diag_indices_from(H)] += damping * (np.trace(H) / len(H) + 1.0)
    x = np.linalg.solve(H, -J.T @ r)
    return x[:3], (float(x[6]) if estimate_scale else 0.0), x[3:6], c


def refine_alignment(
    scan_points: np.ndarray,
    mesh: MeshDistance,
    init: Similarity,
    *,
    estimate_scale: bool = True,
    max_iters: int = 30,
    tol: float = 1e-6,
    max_points: int | None = 20000,
    seed: int = 0,
) -> RefineResult:
    """Rigid refinement (scale, rotation, translation) minimising the mean squared
    scan-to-mesh distance, with exact point-to-triangle closest points at every step.

    scan_points: (N, 3) in the scan frame; ``mesh`` is the prediction in its own frame.
    Each step linearises every distance about its closest surface point (Gauss-Newton:
    residual along the point-to-closest-point direction, i.e. point-to-plane ICP, which
    converges in a few steps where point-to-point ICP crawls). The transform with the
    lowest measured objective is returned. Stops after ``max_iters`` steps (0 = keep
    ``init``), when a step does not lower the objective, or when the relative decrease
    falls below ``tol``. ``max_points`` (None = all) caps the points
    used by the steps to a fixed random subset (``seed``): the objective is an average,
    so a 20k subset moves the result far less than the benchmark's resolution while
    keeping each step cheap (see docs/evaluation.md).
    """
    pts = np.asarray(scan_points, np.float64)
    if max_points is not None and len(pts) > max_points:
        pick = np.random.default_rng(seed).choice(len(pts), size=max_points, replace=False)
        pts = pts[np.sort(pick)]
    tf, best, best_err = init, init, np.inf
    history: list[float] = []
    steps = 0
    while True:
        # The distance to T(mesh) is s * (distance of T^-1(p) to the mesh): query in the
        # mesh's frame, map the closest points back.
        cp = mesh.query(tf.inverse_apply(pts))
        err = float(np.mean((tf.scale * cp.distances) ** 2))
        history.append(err)
        if not err < best_err:
            break  # a step that does not improve: the best transform stays
        improved = len(history) == 1 or best_err - err > tol * best_err
        best, best_err = tf, err
        if not improved or steps == max_iters:
            break
        q = tf.apply(cp.points)
        diff = pts - q
        norm = np.linalg.norm(diff, axis=1, keepdims=True)
        v0, v1, v2 = (tf.apply(mesh.verts[mesh.faces[cp.faces, k]]) for k in range(3))
        face_n = np.cross(v1 - v0, v2 - v0)
        face_n /= np.maximum(np.linalg.norm(face_n, axis=1, keepdims=True), 1e-300)
        n = np.where(norm > 1e-9 * tf.scale, diff / np.maximum(norm, 1e-300), face_n)
        w, sigma, delta, c = _gauss_newton_step(pts, q, n, estimate_scale)
        R = _rodrigues(w)
        k = float(np.exp(sigma))
        # x -> k R (T(x) - c) + c + delta, composed with T
        tf = Similarity(k * tf.scale, R @ tf.rotation, k * R @ (tf.translation - c) + c + delta)
        steps += 1
    return RefineResult(best, steps, history)
