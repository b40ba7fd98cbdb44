"""Per-image stages against real photos and known geometry (fast, no Ray)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from preprocess_assets import astronaut, bad_corpus, t1_path
from preprocessing import annotations
from preprocessing.config import PreprocessConfig
from preprocessing.crop import apply_affine, crop_transform, from_normalised, to_normalised, warp
from preprocessing.decode import Rejected, decode_image
from preprocessing.detect import OptionalBackend, OptionalDetector, make_detector
from preprocessing.identity import cluster, folder_identity, read_labels
from preprocessing.landmarks import Landmarker, plausible
from preprocessing.split import split_identities
from recon.landmarks import LEFT_EYE, OUTER_LIPS, RIGHT_EYE


@pytest.fixture(scope="session")
def t1() -> Path:
    return t1_path()


@pytest.fixture(scope="module")
def models():
    cfg = PreprocessConfig()
    return make_detector(cfg), Landmarker()


def _check_face(face, lmk):
    x0, y0, x1, y1 = face.box
    w, h = x1 - x0, y1 - y0
    # dlib's 68 points lie within the detector box, give or take a third of its size (turned heads).
    assert np.all(lmk[:, 0] > x0 - 0.3 * w) and np.all(lmk[:, 0] < x1 + 0.3 * w)
    assert np.all(lmk[:, 1] > y0 - 0.3 * h) and np.all(lmk[:, 1] < y1 + 0.35 * h)
    eyes_y = lmk[RIGHT_EYE + LEFT_EYE, 1].mean()
    assert eyes_y < lmk[OUTER_LIPS, 1].mean()
    # Subject's right eye is on the image's left.
    assert lmk[RIGHT_EYE, 0].mean() < lmk[LEFT_EYE, 0].mean()


def test_astronaut_face_and_landmarks(models):
    detector, landmarker = models
    rgb = astronaut()
    faces = detector(rgb)
    assert len(faces) >= 1
    x0, y0, x1, y1 = faces[0].box
    # Eileen Collins' face sits around x 170-250, y 60-160 in the 512x512 photo.
    assert 140 < (x0 + x1) / 2 < 260 and 60 < (y0 + y1) / 2 < 160
    lmk = landmarker(rgb, faces[0].box)
    _check_face(faces[0], lmk)
    assert plausible(lmk, 512, 512) is None


def test_t1_group_photo_six_faces(models, t1):
    detector, landmarker = models
    rgb = np.asarray(Image.open(t1).convert("RGB"))
    faces = detector(rgb)
    assert len(faces) == 6
    for face in faces:
        _check_face(face, landmarker(rgb, face.box))


def test_bad_inputs_rejected_with_reasons(tmp_path, t1):
    expected = bad_corpus(tmp_path, t1)
    for rel, reason in expected.items():
        data = (tmp_path / rel).read_bytes()
        if reason in (None, "no face"):
            out = decode_image(data, min_size=32, max_pixels=80_000_000, max_bytes=10**8)
            assert out.rgb.dtype == np.uint8 and out.rgb.ndim == 3 and out.rgb.shape[2] == 3
        else:
            with pytest.raises(Rejected) as err:
                decode_image(data, min_size=32, max_pixels=80_000_000, max_bytes=10**8)
            assert any(r in str(err.value) for r in reason.split("|")), (rel, err.value)


def test_decode_modes_keep_the_picture(tmp_path, t1):
    bad_corpus(tmp_path, t1)
    ref = astronaut().astype(np.float32)
    lum = ref @ np.array([0.299, 0.587, 0.114])
    for rel in ("grey16.png", "palette.png", "alpha.png", "cmyk.jpg", "exif_rotated.jpg",
                "animated.gif"):
        rgb = decode_image((tmp_path / "eileen" / rel).read_bytes(), min_size=32,
                           max_pixels=10**8, max_bytes=10**8).rgb.astype(np.float32)
        assert rgb.shape == (512, 512, 3), rel
        # Luminance correlation with the original: right orientation and a sane scale.
        got = rgb @ np.array([0.299, 0.587, 0.114])
        assert np.corrcoef(got.ravel(), lum.ravel())[0, 1] > 0.9, rel


def test_optional_detector_maps_boxes_to_the_photo_and_filters():
    """The optional backends' adapter: BGR input downscaled to detect_max_side, boxes scaled
    back to the photo's pixels, low scores and small faces dropped, best score first."""
    seen = []

    def load(weights):
        assert weights == "model.onnx"

        def find(bgr):
            seen.append(bgr)
            return np.array([[10, 20, 60, 80, 0.9],      # kept
                             [100, 50, 150, 100, 0.95],  # kept, best
                             [0, 0, 4, 4, 0.99],         # 16 px in the photo: too small
                             [150, 60, 200, 110, 0.2]])  # score below min_score
        return find

    cfg = PreprocessConfig(detector="insightface", detector_weights="model.onnx",
                           detect_max_side=250, min_score=0.5)
    rgb = np.zeros((500, 1000, 3), np.uint8)
    rgb[..., 0] = 255  # red
    faces = OptionalDetector(cfg, OptionalBackend("stub", "a file", "stub", load))(rgb)
    [bgr] = seen
    assert bgr.shape == (125, 250, 3)
    assert (bgr[..., 2] == 255).all() and (bgr[..., 0] == 0).all()
    assert [f.box for f in faces] == [(400, 200, 600, 400), (40, 80, 240, 320)]
    assert [f.score for f in faces] == [0.95, 0.9]


@pytest.mark.parametrize("name, package", [("face-alignment", "face_alignment"),
                                           ("insightface", "insightface")])
def test_optional_detectors_need_weights_and_their_package(name, package, monkeypatch):
    with pytest.raises(ValueError, match="preprocess.detector_weights"):
        make_detector(PreprocessConfig(detector=name))
    monkeypatch.setitem(sys.modules, package, None)  # not installed, whatever this machine has
    with pytest.raises(ImportError, match=rf"pip install 'wildface\[{name}\]'"):
        make_detector(PreprocessConfig(detector=name, detector_weights="weights.bin"))


def test_crop_transform_matches_warp_and_normalised_convention():
    rng = np.random.default_rng(1)
    lmk = rng.uniform((200, 200), (300, 260), (68, 2)).astype(np.float32)
    lmk[0] = (200, 200)
    lmk[1] = (300, 260)
    size, scale = 64, 1.8
    A = crop_transform(lmk, size, scale)
    # Box (200..300) -> side 180 centred at (250, 230): k = 64/180.
    k = size / 180.0
    assert np.allclose(A[:, :2], np.eye(2) * k)
    centre_crop = apply_affine(A, np.array([[250.0, 230.0]]))
    assert np.allclose(to_normalised(centre_crop, size), 0.0, atol=1e-6)
    # A bright pixel lands where the transform says, for both warp paths (area-averaged
    # downscale for 64 px, direct warp for 256 px).
    p = np.array([262.0, 241.0])
    img = np.zeros((600, 600), np.float32)
    img[241, 262] = 1000.0
    for out in (64, 256):
        crop = warp(img, lmk, out, scale)
        grid = np.arange(out, dtype=np.float64)
        com = np.array([(crop * grid[None, :]).sum(), (crop * grid[:, None]).sum()]) / crop.sum()
        target = apply_affine(crop_transform(lmk, out, scale), p[None])[0]
        assert np.allclose(com, target, atol=0.3), (out, com, target)
    uv = to_normalised(np.array([[-0.5, size - 0.5]]), size)
    assert np.allclose(uv, [[-1.0, 1.0]])
    assert np.allclose(from_normalised(uv, size), [[-0.5, size - 0.5]])


def test_pts_roundtrip_is_one_based():
    lmk = np.arange(136, dtype=np.float32).reshape(68, 2)
    data = annotations.write_pts(lmk)
    assert b"{\n1.000 2.000\n" in data
    assert np.allclose(annotations.read_pts(data), lmk)
    with pytest.raises(Rejected):
        annotations.read_pts(b"version: 1\n{\n1 2\n}\n")


def test_split_is_identity_disjoint_and_deterministic():
    ids = [f"id{i:03d}" for i in range(50)]
    a = split_identities(ids * 3, 0.2, seed=7)
    b = split_identities(list(reversed(ids)), 0.2, seed=7)
    assert a == b
    assert sum(v == "val" for v in a.values()) == 10
    c = split_identities(ids, 0.2, seed=8)
    assert c != a and sum(v == "val" for v in c.values()) == 10
    assert split_identities(["solo"], 0.2, 0) == {"solo": "train"}
    assert set(split_identities(["a", "b"], 0.2, 0).values()) == {"train", "val"}


def test_cluster_and_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.concatenate([c + rng.normal(scale=0.01, size=(4, 128)) for c in centres])
    labels = cluster(emb.astype(np.float32), 0.6)
    assert list(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert folder_identity(pa.array(["bob/x.jpg", "x.jpg", "ann/a/y.jpg"])).to_pylist() == [
        "bob", None, "ann"]
    assert read_labels(b"path,identity\na/x.jpg,7\n", "l.csv") == {"a/x.jpg": "7"}
