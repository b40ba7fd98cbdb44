"""Independent references and test meshes for the renderer tests (imported by them).

``reference_zbuffer`` is a brute-force float64 NumPy z-buffer written from the conventions
alone (no code shared with ``recon.render``): per triangle, per pixel centre, inclusive
barycentric inside test, nearest (largest z) wins, ties to the lowest face id.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def to_pixels(verts_ndc: np.ndarray, H: int, W: int) -> np.ndarray:
    v = np.asarray(verts_ndc, dtype=np.float64)
    return np.stack([(v[:, 0] + 1) * W / 2 - 0.5, (1 - v[:, 1]) * H / 2 - 0.5, v[:, 2]], -1)


def barycentric_at(tri: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """tri (3, 3) pixel coords; px, py (...) -> (..., 3) barycentrics (float64)."""
    (x0, y0, _), (x1, y1, _), (x2, y2, _) = tri
    det = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
    l0 = ((y1 - y2) * (px - x2) + (x2 - x1) * (py - y2)) / det
    l1 = ((y2 - y0) * (px - x2) + (x0 - x2) * (py - y2)) / det
    return np.stack([l0, l1, 1.0 - l0 - l1], -1)


def reference_zbuffer(verts_ndc, faces, H: int, W: int, cull: bool = False):
    """Returns pix_to_face (H, W) int64 (-1 empty), bary (H, W, 3), zbuf (H, W) (-inf)."""
    p = to_pixels(verts_ndc, H, W)
    faces = np.asarray(faces, dtype=np.int64)
    p2f = np.full((H, W), -1, dtype=np.int64)
    zbuf = np.full((H, W), -np.inf)
    bary = np.zeros((H, W, 3))
    for f, idx in enumerate(faces):
        tri = p[idx]
        if not np.isfinite(tri).all():
            continue
        (x0, y0, _), (x1, y1, _), (x2, y2, _) = tri
        area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)  # rows point down
        if area == 0 or (cull and area > 0):
            continue
        c0 = max(int(math.ceil(tri[:, 0].min())), 0)
        c1 = min(int(math.floor(tri[:, 0].max())), W - 1)
        r0 = max(int(math.ceil(tri[:, 1].min())), 0)
        r1 = min(int(math.floor(tri[:, 1].max())), H - 1)
        if c0 > c1 or r0 > r1:
            continue
        rr, cc = np.mgrid[r0:r1 + 1, c0:c1 + 1].astype(np.float64)
        b = barycentric_at(tri, cc, rr)
        inside = (b >= 0).all(-1)
        z = b @ tri[:, 2]
        better = inside & (z > zbuf[r0:r1 + 1, c0:c1 + 1])  # strict: ties keep lower id
        sub_p, sub_z, sub_b = (a[r0:r1 + 1, c0:c1 + 1] for a in (p2f, zbuf, bary))
        sub_p[better] = f
        sub_z[better] = z[better]
        sub_b[better] = b[better]
    return p2f, bary, zbuf


def check_against_reference(verts_ndc, faces, H, W, frags_b, b: int = 0, cull=False,
                            exact: bool = False, tol: float = 1e-4, max_mismatch=0.002):
    """Compare one image of a Fragments with the reference. Differences are allowed only
    where the reference shows a float tie (unless ``exact``): the renderer's face must cover
    the pixel centre within ``tol`` (barycentric) and be at the reference depth within
    ``tol``; at most ``max_mismatch`` of the pixels may differ at all."""
    v = np.asarray(verts_ndc, dtype=np.float64)
    p2f, bary, zbuf = reference_zbuffer(v, faces, H, W, cull)
    mine = frags_b.pix_to_face[b].cpu().numpy()
    diff = np.argwhere(mine != p2f)
    if exact:
        assert diff.shape[0] == 0, f"{diff.shape[0]} pixels differ, e.g. {diff[:5].tolist()}"
    assert diff.shape[0] <= max_mismatch * H * W, f"{diff.shape[0]} pixels differ"
    p = to_pixels(v, H, W)
    zscale = max(1.0, float(np.abs(p[np.isfinite(p[:, 2]), 2]).max(initial=0)))
    for r, c in diff:
        f = mine[r, c]
        if f < 0:  # reference covers, renderer not: reference face must be on its boundary
            bb = barycentric_at(p[faces[p2f[r, c]]], np.float64(c), np.float64(r))
            assert bb.min() <= tol, f"hole at {(r, c)}: bary {bb}"
            continue
        bb = barycentric_at(p[faces[f]], np.float64(c), np.float64(r))
        assert bb.min() >= -tol, f"pixel {(r, c)}: face {f} does not cover it ({bb})"
        if p2f[r, c] >= 0:
            z = bb @ p[faces[f], 2]
            assert z >= zbuf[r, c] - tol * zscale, f"pixel {(r, c)}: face {f} behind"
    same = (mine == p2f) & (p2f >= 0)
    return p2f, bary, zbuf, same


# ----------------------------------------------------------------------------- meshes
def uv_sphere(n_lat: int = 24, n_lon: int = 48, radius: float = 1.0):
    """Closed sphere, outward counter-clockwise faces: verts (V, 3), faces (F, 3)."""
    th = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    ph = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    ring = np.stack([np.sin(T) * np.cos(P), np.cos(T), np.sin(T) * np.sin(P)], -1)
    verts = np.concatenate([[[0, 1, 0]], ring.reshape(-1, 3), [[0, -1, 0]]]) * radius
    faces = []
    nr = n_lat - 1
    for j in range(n_lon):
        faces.append([0, 1 + (j + 1) % n_lon, 1 + j])
        last = 1 + (nr - 1) * n_lon
        faces.append([len(verts) - 1, last + j, last + (j + 1) % n_lon])
    for i in range(nr - 1):
        for j in range(n_lon):
            a = 1 + i * n_lon + j
            b = 1 + i * n_lon + (j + 1) % n_lon
            c, d = a + n_lon, b + n_lon
            faces += [[a, b, c], [b, d, c]]
    return verts.astype(np.float64), np.array(faces, dtype=np.int64)


def grid_mesh(n: int, lo: float, hi: float, z=None):
    """(n x n) vertex grid in NDC over [lo, hi]^2, two triangles per quad (CCW)."""
    t = np.linspace(lo, hi, n)
    X, Y = np.meshgrid(t, t)
    Z = np.zeros_like(X) if z is None else z(X, Y)
    verts = np.stack([X, Y, Z], -1).reshape(-1, 3)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3),
                            np.stack([a, d, c], -1).reshape(-1, 3)])
    return verts, faces


def soup(rng: np.random.Generator, n: int = 60):
    """Random triangles plus slivers, collinear and interpenetrating ones."""
    tris = [rng.uniform(-1.1, 1.1, (n, 3, 3))]
    # slivers: a long edge and a third vertex almost on it
    a, b = rng.uniform(-1, 1, (20, 3)), rng.uniform(-1, 1, (20, 3))
    c = 0.5 * (a + b) + rng.normal(0, 1e-3, (20, 3))
    tris.append(np.stack([a, b, c], 1))
    # exactly collinear in NDC and in pixels (dyadic coordinates): zero area, skipped
    col = np.array([[[-0.5, -0.5, 0.3], [0.0, 0.0, 0.3], [0.5, 0.5, 0.3]],
                    [[-0.75, 0.25, 0.9], [0.25, 0.25, 0.9], [0.5, 0.25, 0.9]]])
    tris.append(col)
    # two big interpenetrating triangles (depth planes crossing)
    inter = np.array([[[-0.9, -0.8, -0.5], [0.9, -0.7, 0.5], [0.0, 0.9, 0.0]],
                      [[-0.8, 0.8, 0.6], [0.8, 0.7, -0.6], [0.1, -0.9, 0.1]]])
    tris.append(inter)
    t = np.concatenate(tris)
    verts = t.reshape(-1, 3)
    faces = np.arange(verts.shape[0]).reshape(-1, 3)
    return verts, faces


def rotation_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def demo_head(poses: list[tuple[float, float, float]] | None = None):
    """The demo head (FLAME format) posed by global axis-angle rotations ``poses`` (B, 3)
    with a little jaw opening: verts (B, V, 3) float32, faces (F, 3), vt (T, 2), ft (F, 3)."""
    from recon.config import FaceModelConfig
    from recon.face_model.flame import FLAME
    from recon.face_model.flame_io import load_face_model

    assets = load_face_model(FaceModelConfig())
    faces = torch.as_tensor(np.asarray(assets.faces), dtype=torch.long)
    vt = torch.as_tensor(np.asarray(assets.vt), dtype=torch.float32)
    ft = torch.as_tensor(np.asarray(assets.ft), dtype=torch.long)
    if poses is None:
        verts = torch.as_tensor(np.asarray(assets.v_template), dtype=torch.float32)[None]
        return verts, faces, vt, ft
    flame = FLAME(assets)
    B = len(poses)
    pose = torch.zeros(B, 6)
    pose[:, :3] = torch.tensor(poses, dtype=torch.float32)
    pose[:, 3] = 0.15  # jaw open: lips and mouth interior overlap in depth
    with torch.no_grad():
        out = flame(torch.zeros(B, flame.n_shape), torch.zeros(B, flame.n_exp), pose)
    return out.vertices.float(), faces, vt, ft
