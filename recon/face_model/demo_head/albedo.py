"""Demo-head albedo in UV space: mean skin with darker lips, brows, hair and lashes, eyes with
iris and pupil, and a linear basis (skin tone, redness, hair, lips, brows, stubble, iris, ...
then smooth random UV fields). Values are RGB in [0, 1]; image row 0 is the top (v = 1)."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

from recon.face_model.demo_head.geometry import EYE_HALF_WIDTH, MOUTH_Y, NC, Surface, gauss2, smoothstep

SKIN_RGB = (0.80, 0.60, 0.49)
HAIR_RGB = (0.22, 0.15, 0.11)
LIP_RGB = (0.68, 0.38, 0.37)
BROW_RGB = (0.28, 0.19, 0.14)
SCLERA_RGB = (0.92, 0.90, 0.87)
IRIS_RGB = (0.36, 0.25, 0.15)
N_TEX = 50
SIZE = 256


def smooth_uv_basis(size: int, n: int, seed: int, with_global: bool = True) -> np.ndarray:
    """(size, size, 3, n) smooth colour variations over the UV square: optionally three
    global colour directions first (brightness, redness, yellowness), then random
    low-frequency sinusoid fields with decaying amplitude."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3, n), np.float32)
    k0 = 0
    if with_global:
        for k, c in enumerate([(0.10, 0.09, 0.08), (0.05, -0.02, -0.02), (0.03, 0.02, -0.04)][:n]):
            out[..., k] = np.asarray(c, np.float32)
        k0 = min(3, n)
    m = n - k0
    if m <= 0:
        return out
    f = rng.uniform(1.0, 6.0, size=(m, 4, 2)) * rng.choice([-1, 1], size=(m, 4, 2))
    ph = rng.uniform(0, 2 * np.pi, size=(m, 4))
    # Mostly brightness, a little chroma: skin-like variations rather than rainbow noise.
    col = rng.normal(size=(m, 4, 1)) + 0.2 * rng.normal(size=(m, 4, 3))
    g = (np.arange(size) + 0.5) / size
    acc = np.zeros((m, 3, size, size))
    for i in range(m):
        for j in range(4):
            # sin(a(u) + b(v)) = sin a cos b + cos a sin b: two outer products, no 2D sin.
            a = 2 * np.pi * f[i, j, 0] * g + ph[i, j]
            b = 2 * np.pi * f[i, j, 1] * (1 - g)
            wave = np.multiply.outer(np.cos(b), np.sin(a)) + np.multiply.outer(np.sin(b), np.cos(a))
            for c in range(3):
                acc[i, c] += wave * col[i, j, c]
    acc = acc.transpose(2, 3, 1, 0)
    acc /= np.abs(acc).max(axis=(0, 1, 2)) + 1e-12
    out[..., k0:] = acc * 0.03 * (1 + np.arange(m)) ** -0.5
    return out


def _texel_params(surf: Surface, size: int):
    """Per texel: head grid (row, col) or eyeball (eye index, polar angle)."""
    NR = len(surf.row_y)
    g = (np.arange(size) + 0.5) / size
    U, Vv = np.meshgrid(g, 1 - g)
    row = (1 - (Vv - 0.14) / 0.855) * NR - 1
    col = U * NC
    head = (Vv >= 0.14) & (row >= 0)
    eye_idx = np.full(U.shape, -1)
    polar = np.zeros(U.shape)
    for k in range(3):  # two eyeballs, then the mouth cavity
        cx, cy, rad = 0.07 + 0.14 * k, 0.07, 0.065
        d = np.hypot(U - cx, Vv - cy)
        inside = d <= rad * 1.02
        eye_idx[inside] = k
        polar[inside] = np.minimum(d[inside] / rad, 1.0) * np.pi
    return head, np.clip(row, 0, NR - 1), col, eye_idx, polar


def _masks(surf: Surface, size: int) -> dict[str, np.ndarray]:
    head, row, col, eye_idx, polar = _texel_params(surf, size)
    grid = surf.verts[surf.grid_index]  # (NR, NC, 3)
    grid = np.concatenate([grid, grid[:, :1]], 1)  # seam column
    P = np.stack([map_coordinates(grid[..., d], [row, col], order=1, mode="nearest") for d in range(3)], -1)
    x, y, z = P[..., 0], P[..., 1], P[..., 2]
    ax = np.abs(x)
    m: dict[str, np.ndarray] = {"head": head.astype(float)}
    az = np.abs(np.arctan2(x, z))
    hairline = np.interp(az, [0, 0.5, 1.0, 1.3, 1.45, 1.75, np.pi], [0.086, 0.080, 0.062, 0.035, 0.004, 0.0, -0.045])
    m["hair"] = smoothstep(hairline - 0.003, hairline + 0.007, y) * head
    rho = np.hypot(x / 0.0235, (y - MOUTH_Y - 0.0005) / 0.0095 * (1 + 0.6 * (ax / 0.024) ** 2))
    m["lips"] = (1 - smoothstep(0.8, 1.05, rho)) * (z > 0.05) * head
    yb = 0.0475 + 0.0045 * (1 - ((ax - 0.031) / 0.022) ** 2)
    brow_w = smoothstep(0.010, 0.016, ax) * (1 - smoothstep(0.048, 0.056, ax))
    m["brows"] = np.exp(-(((y - yb) / (0.0028 + 0.0012 * (ax < 0.03))) ** 2)) * brow_w * (z > 0.04) * head
    m["cheeks"] = gauss2(ax, y, 0.045, -0.012, 0.014, 0.012) * head
    m["nostrils"] = gauss2(ax, y, 0.0062, -0.0148, 0.0028, 0.0016) * (z > 0.07) * head
    lower = smoothstep(-0.02, -0.03, y) * smoothstep(-0.115, -0.1, y) * (1 - m["lips"]) * (z > 0.0)
    m["stubble"] = lower * head
    lash = np.zeros_like(x)
    lid = np.zeros_like(x)
    for c in surf.eye_centers.values():
        across = np.clip(1 - ((x - c[0]) / EYE_HALF_WIDTH) ** 2, 0, 1)
        near_rim = np.exp(-(((row - surf.eye_slit_row) + 0.35) / 0.45) ** 2)
        lash = np.maximum(lash, across**0.3 * near_rim * (z > 0.04))
        lid = np.maximum(lid, gauss2(x, y, c[0], c[1] + 0.004, 0.016, 0.009) * (z > 0.04))
    m["lashes"] = lash * head
    m["eye_region"] = lid * head
    eye = (eye_idx >= 0) & (eye_idx < 2)
    m["iris"] = (1 - smoothstep(0.50, 0.56, polar)) * eye
    m["pupil"] = (1 - smoothstep(0.18, 0.22, polar)) * eye
    m["limbus"] = np.exp(-(((polar - 0.53) / 0.04) ** 2)) * eye
    m["sclera"] = eye.astype(float)
    m["mouth"] = (eye_idx == 2).astype(float)
    m["mouth_depth"] = np.clip(polar / np.pi, 0, 1) * m["mouth"]
    return m


def build_albedo(surf: Surface, size: int = SIZE, n_tex: int = N_TEX) -> tuple[np.ndarray, np.ndarray]:
    """``(albedo_mean (H, W, 3), albedo_basis (H, W, 3, n_tex))``."""
    m = _masks(surf, size)

    def paint(base: np.ndarray, mask: np.ndarray, rgb, strength: float = 1.0) -> np.ndarray:
        a = np.clip(mask * strength, 0, 1)[..., None]
        return base * (1 - a) + a * np.asarray(rgb)

    img = np.broadcast_to(np.asarray(SKIN_RGB), (size, size, 3)).copy()
    img = img * (1 - 0.06 * m["eye_region"][..., None]) + m["cheeks"][..., None] * np.array([0.04, -0.02, -0.015])
    img = paint(img, m["lips"], LIP_RGB)
    img = paint(img, m["brows"], BROW_RGB, 0.9)
    img = paint(img, m["nostrils"], (0.25, 0.13, 0.11), 0.9)
    img = paint(img, m["lashes"], (0.12, 0.08, 0.07), 0.85)
    img = paint(img, m["hair"], HAIR_RGB)
    img = paint(img, m["sclera"], SCLERA_RGB)
    img = paint(img, m["iris"], IRIS_RGB)
    img = paint(img, m["limbus"], (0.15, 0.1, 0.07), 0.6)
    img = paint(img, m["pupil"], (0.03, 0.03, 0.03))
    img = paint(img, m["mouth"], (0.30, 0.10, 0.10))
    img = paint(img, m["mouth_depth"], (0.05, 0.02, 0.02), 1.6)
    mean = np.clip(img, 0, 1).astype(np.float32)

    skin = m["head"] * (1 - m["hair"]) * (1 - m["lips"])
    named = [
        skin[..., None] * mean * 0.14,  # skin brightness
        skin[..., None] * np.array([0.05, -0.015, -0.02]),  # redness
        skin[..., None] * np.array([0.025, 0.02, -0.035]),  # olive / yellow
        m["hair"][..., None] * np.array([0.22, 0.17, 0.11]),  # hair lighter
        m["lips"][..., None] * np.array([0.07, -0.04, -0.02]),  # lip redness
        m["brows"][..., None] * np.array([-0.12, -0.09, -0.07]),  # brow darkness
        m["cheeks"][..., None] * np.array([0.06, -0.02, -0.02]),  # cheek flush
        m["stubble"][..., None] * np.array([-0.09, -0.08, -0.06]),  # stubble shadow
        m["eye_region"][..., None] * np.array([-0.05, -0.05, -0.03]),  # eye shadow
        m["iris"][..., None] * (1 - m["pupil"][..., None]) * np.array([-0.12, 0.02, 0.18]),  # iris colour
    ]
    rest = smooth_uv_basis(size, n_tex - len(named), seed=31, with_global=False)
    basis = np.concatenate([np.stack(named, -1).astype(np.float32), rest * m["head"][..., None, None]], -1)
    return mean, basis.astype(np.float32)
