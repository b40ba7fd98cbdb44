"""Occluders for synthetic images: random flat shapes drawn over part of the face.

Shapes are drawn in pixel coordinates (column x, row y, pixel centres at integers) with a
coverage mask computed analytically per pixel centre, so the skin mask can exclude them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from recon.landmarks import LEFT_EYE, MOUTH, NOSE, RIGHT_EYE

# Regions an occluder is placed on (like hands, glasses, microphones, hair over an eye).
TARGETS: dict[str, tuple[int, ...]] = {
    "right_eye": RIGHT_EYE, "left_eye": LEFT_EYE, "nose": NOSE, "mouth": MOUTH,
}
SHAPES = ("ellipse", "rectangle", "triangle")


@dataclass(frozen=True)
class Occluder:
    """What was drawn: shape, the region aimed at, centre (x, y) and half sizes in pixels,
    rotation (radians), colour RGB in [0, 1]."""

    shape: str
    target: str
    centre: tuple[float, float]
    half_size: tuple[float, float]
    angle: float
    colour: tuple[float, float, float]

    def to_json(self) -> dict:
        return asdict(self)

    def coverage(self, size: int) -> np.ndarray:
        """(size, size) bool: pixel centres inside the shape."""
        yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                             indexing="ij")
        c, s = np.cos(self.angle), np.sin(self.angle)
        dx, dy = xx - self.centre[0], yy - self.centre[1]
        u = (c * dx + s * dy) / self.half_size[0]
        v = (-s * dx + c * dy) / self.half_size[1]
        if self.shape == "ellipse":
            return u * u + v * v <= 1.0
        if self.shape == "rectangle":
            return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
        # isosceles triangle with apex at v = -1 and base at v = +1
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)


def random_occluder(rng: np.random.Generator, landmarks_px: np.ndarray) -> Occluder:
    """An occluder over a random face region. landmarks_px: (68, 2) pixel coordinates."""
    target = list(TARGETS)[int(rng.integers(len(TARGETS)))]
    pts = landmarks_px[list(TARGETS[target])]
    box = float(np.ptp(landmarks_px, axis=0).max())
    centre = pts.mean(axis=0) + rng.normal(0, 0.05 * box, 2)
    half = box * rng.uniform(0.12, 0.3, 2)
    return Occluder(
        shape=SHAPES[int(rng.integers(len(SHAPES)))], target=target,
        centre=(float(centre[0]), float(centre[1])), half_size=(float(half[0]), float(half[1])),
        angle=float(rng.uniform(0, np.pi)), colour=tuple(float(x) for x in rng.random(3)),
    )
