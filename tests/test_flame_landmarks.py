"""Landmark conventions (recon.landmarks) checked on the demo head's geometry."""
from __future__ import annotations

import numpy as np

from recon.face_model.flame import FLAME
from recon.face_model.flame_io import load_face_model
from recon.landmarks import (
    EYE_LID_PAIRS,
    FLIP_PERMUTATION,
    GROUPS,
    LIP_PAIRS,
    NOW7,
    deca_landmark_weights,
)


def test_groups_partition_68():
    idx = sorted(i for g in GROUPS.values() for i in g)
    assert idx == list(range(68))
    assert NOW7 == (36, 39, 42, 45, 33, 48, 54)
    assert all(a in GROUPS["right_eye"] + GROUPS["left_eye"] for pair in EYE_LID_PAIRS for a in pair)
    assert all(a in GROUPS["inner_lips"] for pair in LIP_PAIRS for a in pair)


def test_deca_weights():
    w = deca_landmark_weights()
    assert w.shape == (68,)
    assert w[[5, 6, 10, 11]].tolist() == [2.0] * 4
    assert w[[30, 31, 35, 48, 54]].tolist() == [3.0] * 5
    assert w[27] == w[60] == 1.5 and w[0] == w[17] == w[36] == 1.0


def test_flip_permutation_mirrors_the_demo_head():
    assert sorted(FLIP_PERMUTATION) == list(range(68))
    flame = FLAME(load_face_model("demo-head"), 10, 10)
    L = flame.template_output().landmarks3d[0].numpy()
    mirrored = L[list(FLIP_PERMUTATION)] * np.array([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(mirrored, L, atol=2e-3)  # the demo head is symmetric
