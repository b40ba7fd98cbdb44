"""Landmark conventions: the iBUG 68-point layout, NoW's 7 points, DECA's landmark losses,
and the box around a face's landmarks. The one home of the layout: the preprocessing (photo
landmarks, skin masks) and the model (FLAME's landmarks, losses) index the same groups.

Indices are 0-based iBUG indices into the 68 landmarks (``landmarks2d`` / ``landmarks3d`` of
:class:`recon.face_model.flame.FLAME`: 17 jaw contour points first, then the 51 static ones). iBUG's
"right" means the subject's right (image left, -x in FLAME's frame). Groups are tuples: index
an array with ``lmk[list(GROUP)]`` (a bare tuple would index several axes).
"""
from __future__ import annotations

import numpy as np

N_LANDMARKS = 68
N_STATIC = 51
N_CONTOUR = 17

JAW = tuple(range(0, 17))
RIGHT_BROW = tuple(range(17, 22))
LEFT_BROW = tuple(range(22, 27))
NOSE_BRIDGE = tuple(range(27, 31))
NOSE_BASE = tuple(range(31, 36))
NOSE = NOSE_BRIDGE + NOSE_BASE
RIGHT_EYE = tuple(range(36, 42))
LEFT_EYE = tuple(range(42, 48))
OUTER_LIPS = tuple(range(48, 60))
INNER_LIPS = tuple(range(60, 68))
MOUTH = OUTER_LIPS + INNER_LIPS

GROUPS: dict[str, tuple[int, ...]] = {
    "jaw": JAW,
    "right_brow": RIGHT_BROW,
    "left_brow": LEFT_BROW,
    "nose": NOSE,
    "right_eye": RIGHT_EYE,
    "left_eye": LEFT_EYE,
    "outer_lips": OUTER_LIPS,
    "inner_lips": INNER_LIPS,
}

NOSE_TIP = 30
NOSE_BOTTOM = 33
RIGHT_EYE_OUTER, RIGHT_EYE_INNER = 36, 39
LEFT_EYE_INNER, LEFT_EYE_OUTER = 42, 45
MOUTH_RIGHT, MOUTH_LEFT = 48, 54

# NoW's 7 landmarks, as indices into the 51 static landmarks (iBUG index - 17):
# right eye outer/inner, left eye inner/outer, nose bottom, mouth right/left corner.
NOW7_STATIC = (19, 22, 25, 28, 16, 31, 37)
NOW7 = tuple(i + N_CONTOUR for i in NOW7_STATIC)  # (36, 39, 42, 45, 33, 48, 54)

# DECA's eye-closure loss: upper-lid vs lower-lid landmark pairs (distance in the prediction
# should match the distance in the target landmarks).
EYE_LID_PAIRS = ((37, 41), (38, 40), (43, 47), (44, 46))
# DECA's lip-closure loss: upper inner lip vs lower inner lip pairs.
LIP_PAIRS = ((61, 67), (62, 66), (63, 65))


def landmark_box(landmarks):
    """Bounding box of landmarks: (..., N, 2) numpy array or torch tensor -> (..., 4) of the
    same kind, ``x0, y0, x1, y1`` in the landmarks' units (the extreme points themselves)."""
    if isinstance(landmarks, np.ndarray):
        return np.concatenate([landmarks.min(axis=-2), landmarks.max(axis=-2)], axis=-1)
    import torch  # a tensor came in, so torch is loaded; numpy callers never import it

    return torch.cat([landmarks.amin(dim=-2), landmarks.amax(dim=-2)], dim=-1)


def landmark_square(landmarks):
    """The square DECA's crops are built on: (..., N, 2) numpy or torch landmarks -> centre
    (..., 2) of their :func:`landmark_box` and its size (...,) = max(width, height)."""
    box = landmark_box(landmarks)
    lo, hi = box[..., :2], box[..., 2:]
    extent = hi - lo
    size = extent.max(axis=-1) if isinstance(extent, np.ndarray) else extent.amax(dim=-1)
    return (lo + hi) / 2, size


def deca_landmark_weights() -> np.ndarray:
    """Per-landmark weights of DECA's landmark L1 loss, (68,) float32.

    Jaw points 5, 6, 10, 11 x2; nose 27-35 x1.5 and 30, 31, 35 x3; mouth 48-67 x1.5 and the
    corners 48, 54 x3; all others 1.
    """
    w = np.ones(N_LANDMARKS, dtype=np.float32)
    w[[5, 6, 10, 11]] = 2.0
    w[list(NOSE)] = 1.5
    w[[30, 31, 35]] = 3.0
    w[list(MOUTH)] = 1.5
    w[[48, 54]] = 3.0
    return w


# iBUG mirror permutation (subject's right <-> left), for flipping images horizontally.
FLIP_PERMUTATION = (
    tuple(range(16, -1, -1))
    + tuple(range(26, 16, -1))
    + (27, 28, 29, 30)
    + (35, 34, 33, 32, 31)
    + (45, 44, 43, 42, 47, 46)
    + (39, 38, 37, 36, 41, 40)
    + (54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55)
    + (64, 63, 62, 61, 60, 67, 66, 65)
)
