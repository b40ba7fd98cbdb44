"""iBUG PTS landmark files (300-W): 68 points, 1-based pixel coordinates.

In memory landmarks are (68, 2) 0-based pixel coordinates (x right, y down), the layout of
:mod:`recon.landmarks`. ``wildface synth`` writes a ``.pts`` beside each image; the
preprocessing and reconstruct jobs read one as the image's landmarks instead of running the
detectors (``preprocessing.annotations``).
"""
from __future__ import annotations

import numpy as np

from recon.landmarks import N_LANDMARKS



def read_pts(data: bytes) -> np.ndarray:
    """PTS bytes -> (68, 2) float32, 0-based pixel coordinates. ValueError when the bytes
    are not a 68-point PTS file."""
    try:
        text = data.decode("utf-8", errors="strict")
        body = text[text.index("{") + 1:text.index("}")]
        pts = np.array([[float(v) for v in line.split()] for line in body.strip().splitlines()
                        if line.strip()], dtype=np.float32)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable .pts annotation: {err}") from None
    if pts.shape != (N_LANDMARKS, 2):
        raise ValueError(f".pts annotation has shape {pts.shape}, expected ({N_LANDMARKS}, 2)")
    return pts - 1.0


def write_pts(lmk: np.ndarray) -> bytes:
    """(68, 2) 0-based pixel coordinates -> PTS bytes (1-based)."""
    lines = [f"{x + 1:.3f} {y + 1:.3f}" for x, y in np.asarray(lmk, dtype=np.float64)]
    return (f"version: 1\nn_points: {N_LANDMARKS}\n{{\n" + "\n".join(lines) + "\n}\n").encode()
