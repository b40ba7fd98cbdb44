"""The built-in demo head: deterministic, FLAME-shaped, landmarks on the intended features,
clean mesh (no degenerate triangles, consistent outward winding)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from recon.face_model.demo_head import build_demo_head
from recon.face_model.face_assets import FaceModelAssets
from recon.face_model.flame import FLAME
from recon.face_model.flame_io import load_face_model
from recon.landmarks import EYE_LID_PAIRS, LIP_PAIRS, MOUTH_LEFT, MOUTH_RIGHT


@pytest.fixture(scope="module")
def assets():
    return load_face_model("demo-head")


@pytest.fixture(scope="module")
def flame(assets):
    return FLAME(assets, n_shape=100, n_exp=50)


def lmk(flame, expression=None, jaw=0.0):
    e = torch.zeros(1, flame.n_exp)
    for k, v in (expression or {}).items():
        e[0, flame.expression_names.index(k)] = v
    pose = torch.zeros(1, 6)
    pose[0, 3] = jaw
    return flame(torch.zeros(1, flame.n_shape), e, pose).landmarks3d[0].numpy()


def test_deterministic_across_builds(assets):
    again = build_demo_head()  # a fresh build, not the cache
    for key in ("v_template", "faces", "shapedirs", "weights", "J_regressor", "vt", "ft", "albedo_basis",
                "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords", "static_lmk_bary_coords"):
        np.testing.assert_array_equal(getattr(again, key), getattr(assets, key), err_msg=key)


def test_flame_sizes_and_format(assets, tmp_path):
    assert 4500 <= assets.n_vertices <= 5600 and 9000 <= assets.n_faces <= 11000
    assert assets.name == "demo-head"
    assert assets.n_shape_total >= 100 and assets.n_exp_total >= 50
    assert assets.posedirs.shape == (assets.n_vertices, 3, 36)
    assert list(assets.parents) == [-1, 0, 1, 1, 1]
    np.testing.assert_allclose(assets.weights.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(assets.J_regressor.sum(1), 1.0, atol=1e-5)
    assert assets.albedo_mean.shape == (256, 256, 3) and assets.albedo_basis.shape[:3] == (256, 256, 3)
    assert 0 <= assets.albedo_mean.min() and assets.albedo_mean.max() <= 1
    assert 4000 <= len(assets.vt) <= 6500 and assets.vt.min() >= 0 and assets.vt.max() <= 1
    assert {"face", "left_eyeball", "right_eyeball"} <= set(assets.masks)
    assert assets.expression_names[:4] == ["smile", "mouth_open", "brows_up", "eyes_closed"]
    # FLAME's frame and scale: metres, y up, face toward +z.
    v = assets.v_template
    width = np.ptp(v[:, 0])
    assert 0.13 < width < 0.2
    nose_tip = v[np.argmax(v[:, 2])]
    assert abs(nose_tip[0]) < 1e-3 and -0.02 < nose_tip[1] < 0.02
    # Round trip through the cached format.
    path = assets.save_npz(tmp_path / "demo.npz")
    back = FaceModelAssets.load_npz(path)
    np.testing.assert_array_equal(back.shapedirs, assets.shapedirs)
    assert back.expression_names == assets.expression_names and set(back.masks) == set(assets.masks)


def test_components_ordered_by_variance(assets):
    S = assets.n_shape_total
    var = (assets.shapedirs[:, :, :S].astype(np.float64) ** 2).mean(axis=(0, 1))
    assert np.all(np.diff(var) <= 0)  # identity: by decreasing variance, like PCA
    var_e = (assets.shapedirs[:, :, S + 15 :].astype(np.float64) ** 2).mean(axis=(0, 1))
    assert np.all(np.diff(var_e) <= 1e-15)  # expression extras after the named actions
    # Identity and expression are separate: expression fields live on the face.
    e = assets.shapedirs[:, :, S:]
    back_of_head = assets.v_template[:, 2] < -0.05
    assert np.abs(e[back_of_head]).max() < 1e-6


def test_no_degenerate_triangles_and_consistent_outward_winding(assets):
    v, f = assets.v_template.astype(np.float64), assets.faces
    tri = v[f]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = 0.5 * np.linalg.norm(n, axis=1)
    assert area.min() > 1e-9
    assert len({tuple(sorted(t)) for t in f.tolist()}) == len(f)  # no duplicate faces
    # Consistent orientation: every directed edge at most once (manifold, coherently oriented).
    directed = Counter((int(a), int(b)) for t in f for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])))
    assert max(directed.values()) == 1
    # Outward: each connected part has positive signed volume, and normals point away from the
    # head centre for the vast majority of faces.
    vol = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    assert vol > 0
    parts = ("left_eyeball", "right_eyeball", "mouth_interior")
    in_part = np.zeros(len(f), bool)
    for part in parts:  # closed components: all normals away from their own centre
        ids = np.isin(f, assets.masks[part]).all(1)
        in_part |= ids
        c = v[assets.masks[part]].mean(0)
        assert (np.einsum("ij,ij->i", n[ids], tri[ids].mean(1) - c) > 0).all(), part
    centre = np.array([0.0, 0.0, -0.01])
    outward = np.einsum("ij,ij->i", n[~in_part], tri[~in_part].mean(1) - centre) > 0
    assert outward.mean() > 0.97


def test_uv_layout_has_little_overlap(assets):
    uv = assets.vt[assets.ft].astype(np.float64)
    area = 0.5 * ((uv[:, 1, 0] - uv[:, 0, 0]) * (uv[:, 2, 1] - uv[:, 0, 1])
                  - (uv[:, 2, 0] - uv[:, 0, 0]) * (uv[:, 1, 1] - uv[:, 0, 1]))
    nz = np.abs(area) > 1e-12
    # One orientation everywhere (no flipped charts), total area below the unit square.
    assert (np.sign(area[nz]) == np.sign(area[nz][0])).mean() > 0.99
    assert np.abs(area).sum() < 1.0


def test_landmarks_on_features(flame, assets):
    L = lmk(flame)
    v = assets.v_template
    # Symmetric pairs mirror each other.
    assert abs(L[36, 0] + L[45, 0]) < 2e-3 and abs(L[48, 0] + L[54, 0]) < 2e-3
    # Subject's right (iBUG 36, 48, 0) is at -x.
    assert L[36, 0] < L[39, 0] < 0 < L[42, 0] < L[45, 0]
    assert L[48, 0] < 0 < L[54, 0] and L[0, 0] < 0 < L[16, 0]
    # Vertical order: brows > eyes > nose tip > nose bottom > mouth > chin.
    assert L[19, 1] > L[37, 1] > L[30, 1] > L[33, 1] > L[62, 1] > L[57, 1] > L[8, 1]
    # Nose tip is the most forward landmark; eyes sit on the eyeballs' front.
    assert np.argmax(L[:, 2]) == 30
    eye_c = v[assets.masks["left_eyeball"]].mean(0)
    assert np.linalg.norm(L[[43, 44, 46, 47]].mean(0)[:2] - eye_c[:2]) < 0.006


def test_smile_moves_mouth_corners_apart_and_up(flame):
    base, smile = lmk(flame), lmk(flame, {"smile": 2.0})
    w0 = np.linalg.norm(base[MOUTH_LEFT] - base[MOUTH_RIGHT])
    w1 = np.linalg.norm(smile[MOUTH_LEFT] - smile[MOUTH_RIGHT])
    assert w1 > w0 + 0.008
    assert smile[MOUTH_LEFT, 1] > base[MOUTH_LEFT, 1] + 0.005


def test_eyes_closed_closes_the_lids(flame):
    def gaps(L):
        return np.array([np.linalg.norm(L[a] - L[b]) for a, b in EYE_LID_PAIRS])

    g0, g1, g2 = gaps(lmk(flame)), gaps(lmk(flame, {"eyes_closed": 1.0})), gaps(lmk(flame, {"eyes_closed": 2.0}))
    assert g0.min() > 0.005  # open in the template
    assert np.all(g1 < g0) and np.all(g2 < 0.0015)  # closed at 2 std


def test_mouth_opens_with_jaw_and_expression(flame):
    def gaps(L):
        return np.array([np.linalg.norm(L[a] - L[b]) for a, b in LIP_PAIRS])

    g0 = gaps(lmk(flame))
    assert g0.max() < 1e-3  # closed lips in the template
    assert gaps(lmk(flame, jaw=0.2)).min() > 0.008
    assert gaps(lmk(flame, {"mouth_open": 1.5})).min() > 0.006


@pytest.mark.parametrize("deg", [30.0, -30.0])
def test_dynamic_contour_follows_silhouette(flame, assets, deg):
    """Which side's contour a turned head uses, from the geometry alone: the side whose
    jaw-line triangles face away from the camera (+z) after the turn is the one whose
    contour slides to the silhouette; the side facing the camera stays on the jaw line."""
    pose = torch.zeros(1, 6)
    pose[0, 1] = np.deg2rad(deg)
    out = flame(torch.zeros(1, flame.n_shape), torch.zeros(1, flame.n_exp), pose)
    dyn, full = out.landmarks2d[0, :17].numpy(), out.landmarks3d[0, :17].numpy()
    v = out.vertices[0].numpy()
    tri = v[assets.faces[assets.full_lmk_faces_idx[:17]]]  # (17, 3, 3)
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    facing = n[:, 2] / np.linalg.norm(n, axis=1)
    far, near = (slice(9, 16), slice(1, 8))
    if facing[near].mean() < facing[far].mean():
        far, near = near, far
    assert facing[far].mean() < facing[near].mean() - 0.2  # the turn tells the sides apart
    # Far side: out to the silhouette, i.e. further from the face's middle in image x than
    # the jaw-line points, which have rotated behind it.
    outward = np.sign(full[far, 0] - full[8, 0])
    shift = outward * (dyn[far, 0] - full[far, 0])
    assert shift.min() > -1e-6 and np.sort(shift)[-3:].min() > 2e-4 and shift.sum() > 2e-3
    np.testing.assert_allclose(dyn[near], full[near], atol=1e-7)  # near side on the jaw line


def _same_assets(a: FaceModelAssets, b: FaceModelAssets) -> None:
    from dataclasses import fields

    for f in fields(FaceModelAssets):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict):
            assert x.keys() == y.keys(), f.name
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{f.name}[{k}]")
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def test_built_head_is_kept_for_the_next_process_and_rebuilt_when_unreadable(tmp_path,
                                                                              monkeypatch):
    """The first process builds the demo head and keeps it under $WILDFACE_HOME; the next one
    reads it back identical to a fresh build without building; a damaged file is built again,
    and a home that cannot be written only costs the build."""
    from recon.face_model import flame_io
    from recon.face_model.demo_head import build_demo_head as real_build

    monkeypatch.setenv("WILDFACE_HOME", str(tmp_path / "home"))
    path = flame_io.demo_head_file()
    assert path.parent == tmp_path / "home" / "face-models" and not path.exists()
    builds = []

    def counting_build():
        builds.append(1)
        return real_build()

    monkeypatch.setattr("recon.face_model.demo_head.build_demo_head", counting_build)
    fresh = flame_io._demo_head()
    assert len(builds) == 1 and path.is_file()
    kept = flame_io._demo_head()
    assert len(builds) == 1  # read, not built
    _same_assets(kept, fresh)
    _same_assets(kept, real_build())

    path.write_bytes(b"not a zip")
    _same_assets(flame_io._demo_head(), fresh)
    assert len(builds) == 2 and FaceModelAssets.load_npz(path).n_vertices == fresh.n_vertices

    (tmp_path / "ro").write_text("a file, so no folder can be made below it")
    monkeypatch.setenv("WILDFACE_HOME", str(tmp_path / "ro"))
    _same_assets(flame_io._demo_head(), fresh)
    assert len(builds) == 3
    monkeypatch.setenv("WILDFACE_HOME", "s3://bucket/prefix")
    assert flame_io.demo_head_file() is None


def test_kept_head_is_named_by_the_code_that_builds_it(tmp_path, monkeypatch):
    """A change to the code that builds the head (here: numpy's version) names another file,
    so a build of older code is never read; the new build replaces the old file."""
    from recon.face_model import flame_io

    monkeypatch.setenv("WILDFACE_HOME", str(tmp_path))
    before = flame_io.demo_head_file()
    assert before == flame_io.demo_head_file()
    before.parent.mkdir(parents=True)
    before.write_bytes(b"an older build")
    monkeypatch.setattr(np, "__version__", np.__version__ + ".post1")
    after = flame_io.demo_head_file()
    assert after != before
    flame_io._demo_head()
    assert sorted(after.parent.iterdir()) == [after]
