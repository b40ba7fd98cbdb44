"""Backgrounds for synthetic images: noise, gradients, procedural textures, photo crops.

Every function takes a numpy ``Generator`` and returns (H, W, 3) float32 in [0, 1]; the
result depends only on the generator's state (deterministic from a seed).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

# scikit-image ships these in its wheel (no download); none shows a face. Grey ones are tinted.
_PHOTOS = ("coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "brick",
           "grass", "gravel", "camera", "coins", "moon", "page")


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photos as (H, W, 3) float32 in [0, 1] (those that load)."""
    from skimage import data

    out = []
    for name in _PHOTOS:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - a missing optional image only narrows the choice
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3].astype(np.float32)
        out.append(img / (255.0 if img.max() > 1.5 else 1.0))
    return tuple(out)


def _resize(small: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of (h, w, C) to (size, size, C) (cell-centred)."""
    h, w = small.shape[:2]
    ys = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    xs = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = small[y0][:, x0] * (1 - fx) + small[y0][:, x1] * fx
    bottom = small[y1][:, x0] * (1 - fx) + small[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour noise at a random frequency plus fine grain."""
    cells = int(rng.integers(2, 17))
    img = _resize(rng.random((cells, cells, 3), dtype=np.float32), size)
    img += rng.normal(0, 0.04, (size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 1)


def gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours in a random direction."""
    a, b = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    u = (np.arange(size) + 0.5) / size - 0.5
    t = np.cos(angle) * u[None, :] + np.sin(angle) * u[:, None]
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    return (a * (1 - t[..., None]) + b * t[..., None]).astype(np.float32)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stripes, checks or waves in two random colours."""
    a, b = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, size / 3)
    u = (np.cos(angle) * xx + np.sin(angle) * yy) / period
    v = (-np.sin(angle) * xx + np.cos(angle) * yy) / period
    kind = int(rng.integers(3))
    if kind == 0:
        t = (np.floor(u) % 2).astype(np.float32)
    elif kind == 1:
        t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    else:
        t = (0.5 + 0.5 * np.sin(2 * np.pi * u + 2 * np.sin(np.pi * v))).astype(np.float32)
    return (a * (1 - t[..., None]) + b * t[..., None]).astype(np.float32)


def photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a bundled photo, resized, randomly flipped and tinted."""
    pool = photos()
    if not pool:
        return noise(rng, size)
    img = pool[int(rng.integers(len(pool)))]
    h, w = img.shape[:2]
    side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = img[y:y + side, x:x + side]
    step = max(1, side // (2 * size))  # cheap pre-decimation keeps resizing fast
    crop = _resize(crop[::step, ::step], size)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    tint = rng.uniform(0.7, 1.3, 3).astype(np.float32)
    return np.clip(crop * tint, 0, 1)


KINDS = {"noise": noise, "gradient": gradient, "texture": texture, "photo": photo}


def background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A background of ``kind`` (one of ``KINDS``): (size, size, 3) float32 in [0, 1]."""
    if kind not in KINDS:
        raise ValueError(f"unknown background kind {kind!r}; choose from {sorted(KINDS)}")
    return np.ascontiguousarray(KINDS[kind](rng, size))
