"""A synthetic NoW-layout dataset with known answers, for tests, benchmarks and demos.

Real NoW data is licensed and not shipped. Here a procedural head surface (mm) plays the
subject: its "scan" is a dense linear subdivision of the head mesh (every scan vertex lies
exactly on the mesh), its 7 picked points are mesh vertices, and each "prediction" is the
head mesh under a known similarity transform into metres (as a FLAME-based model would
output), optionally with a known smooth deformation along the normals. A prediction
without deformation scores ~0 mm under the protocol.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recon.evaluation.alignment import Similarity
from recon.evaluation.now_io import (
    CHALLENGES,
    NowImage,
    write_image_list,
    write_pp,
    write_prediction,
)

#: (polar angle from +y "up", azimuth with 90 deg = +z "front") of the 7 NoW landmarks, in
#: the NoW order: right outer eye, right inner eye, left inner eye, left outer eye, nose
#: bottom, right mouth corner, left mouth corner (the subject's right is at -x).
LANDMARK_ANGLES_DEG = np.array([
    [80, 128], [80, 102], [80, 78], [80, 52], [100, 90], [112, 112], [112, 68],
], dtype=np.float64)


def _direction(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(theta) * np.cos(phi), np.cos(theta), np.sin(theta) * np.sin(phi)], -1)


def head_mesh(n_rings: int = 50, n_segments: int = 100, radii=(72.0, 95.0, 88.0)) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal head with a nose, in mm, open at the crown and neck.

    Returns verts (n_rings * n_segments, 3) and faces (2 (n_rings - 1) n_segments, 3);
    the defaults give 5000 vertices and 9800 faces (FLAME: 5023 / 9976).
    """
    theta = np.linspace(0.12, np.pi - 0.35, n_rings)
    phi = np.linspace(0.0, 2 * np.pi, n_segments, endpoint=False)
    T, P = np.meshgrid(theta, phi, indexing="ij")
    u = _direction(T, P)
    r = 1.0 / np.sqrt(((u / np.asarray(radii)) ** 2).sum(-1))
    dphi = np.angle(np.exp(1j * (P - np.pi / 2)))
    nose = 18.0 * np.exp(-(dphi**2) / (2 * 0.10**2) - (T - np.radians(92)) ** 2 / (2 * 0.16**2))
    verts = (u * (r + nose)[..., None]).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n_rings - 1), np.arange(n_segments), indexing="ij")
    a = i * n_segments + j
    b = i * n_segments + (j + 1) % n_segments
    c, d = a + n_segments, b + n_segments
    faces = np.concatenate([np.stack([a, c, b], -1), np.stack([b, c, d], -1)]).reshape(-1, 3)
    return verts, faces.astype(np.int64)


def landmark_vertices(verts: np.ndarray) -> np.ndarray:
    """Indices (7,) of the mesh vertices whose direction is closest to each landmark's."""
    dirs = _direction(*np.radians(LANDMARK_ANGLES_DEG).T)
    unit = verts / np.linalg.norm(verts, axis=1, keepdims=True)
    return np.argmax(unit @ dirs.T, axis=0)


def subdivide(verts: np.ndarray, faces: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear subdivision: every triangle into n^2, new vertices on the old triangles.

    verts (V, 3), faces (F, 3) -> (V', 3), (n^2 F, 3); shared edge points are merged.
    """
    ij = [(i, j) for i in range(n + 1) for j in range(n + 1 - i)]
    idx = {p: k for k, p in enumerate(ij)}
    bary = np.array([[n - i - j, i, j] for i, j in ij], np.float64) / n
    # Global keys of grid points: sorted (vertex id, integer weight) pairs, so that the
    # same point on a shared edge or vertex gets the same key from both triangles.
    w = np.rint(bary * n).astype(np.int64)  # (G, 3)
    fv = faces[:, None, :].repeat(len(ij), 1)  # (F, G, 3)
    wv = np.broadcast_to(w, fv.shape)
    key_v = np.where(wv > 0, fv, -1)
    order = np.argsort(key_v, axis=2)
    keys = np.concatenate([np.take_along_axis(key_v, order, 2), np.take_along_axis(wv, order, 2)], 2)
    uniq, inv = np.unique(keys.reshape(-1, 6), axis=0, return_inverse=True)
    inv = inv.reshape(len(faces), len(ij))
    pts = np.einsum("gk,fkd->fgd", bary, verts[faces]).reshape(-1, 3)
    new_verts = np.zeros((len(uniq), 3))
    new_verts[inv.ravel()] = pts
    tris = []
    for i in range(n):
        for j in range(n - i):
            tris.append((idx[(i, j)], idx[(i + 1, j)], idx[(i, j + 1)]))
            if i + j < n - 1:
                tris.append((idx[(i + 1, j)], idx[(i + 1, j + 1)], idx[(i, j + 1)]))
    tris = np.asarray(tris)
    new_faces = inv[:, tris].reshape(-1, 3)
    return new_verts, new_faces


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3)."""
    fn = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    vn = np.zeros_like(verts)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def random_similarity(rng: np.random.Generator, scale: float = 1e-3, max_angle_deg: float = 30.0) -> Similarity:
    """A random similarity: rotation up to ``max_angle_deg`` about a random axis, translation
    up to 0.1 (in output units), the given scale."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = np.radians(rng.uniform(-max_angle_deg, max_angle_deg))
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * K @ K
    return Similarity(scale, R, rng.uniform(-0.1, 0.1, size=3))


@dataclass
class SyntheticNow:
    dataset_dir: Path
    predictions_dir: Path
    images: list[NowImage]


def write_synthetic_now(
    root: str | os.PathLike,
    *,
    n_subjects: int = 2,
    images_per_challenge: int = 1,
    subdivision: int = 2,
    deformation_mm: float = 0.0,
    mesh_resolution: tuple[int, int] = (50, 100),
    split: str = "val",
    seed: int = 0,
) -> SyntheticNow:
    """Write ``root/dataset`` (NoW layout) and ``root/predictions`` with known answers.

    Subjects differ by head proportions. Predictions are the subject's head mesh, deformed
    along its normals by ``deformation_mm * sin(...)`` (a smooth pattern; 0 = exact shape),
    then mapped into metres by a random similarity. ``subdivision`` sets the scan density
    (n^2 triangles per mesh triangle; 5 gives ~125k scan vertices at the default mesh).
    """
    from recon.formats.mesh_io import write_obj

    rng = np.random.default_rng(seed)
    root = Path(root)
    ds, pred = root / "dataset", root / "predictions"
    images: list[NowImage] = []
    for s in range(n_subjects):
        subject = f"SYN_{s:03d}"
        radii = (72.0, 95.0, 88.0) * rng.uniform(0.9, 1.1, size=3)
        verts, faces = head_mesh(*mesh_resolution, radii=radii)
        lmk = verts[landmark_vertices(verts)]
        sv, sf = subdivide(verts, faces, subdivision)
        write_obj(ds / "scans" / subject / "natural_head_rotation.000001.obj", sv, sf)
        write_pp(ds / "scans_lmks_onlypp" / subject / "natural_head_rotation.000001_picked_points.pp", lmk)
        normals = vertex_normals(verts, faces)
        for cdir in CHALLENGES:
            for k in range(images_per_challenge):
                im = NowImage(subject, cdir, f"IMG_{k:04d}")
                images.append(im)
                phase = rng.uniform(0, 2 * np.pi, size=3)
                bump = np.sin(verts * np.array([0.07, 0.05, 0.06]) + phase).prod(axis=1)
                deformed = verts + deformation_mm * bump[:, None] * normals
                tf = random_similarity(rng)
                write_prediction(pred, im, tf.apply(deformed), faces, tf.apply(lmk))
    write_image_list(ds / ("imagepathsvalidation.txt" if split == "val" else "imagepathstest.txt"), images)
    return SyntheticNow(ds, pred, images)
