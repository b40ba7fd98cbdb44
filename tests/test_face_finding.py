"""One face-finding path (preprocessing.faces) for the preprocessing and reconstruction, and
one iBUG 68-point layout (recon.landmarks), pinned from the iBUG 300-W definition."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from preprocessing.config import PreprocessConfig
from preprocessing.faces import FaceFinder
from recon import landmarks as L
from preprocess_assets import astronaut

# The iBUG 300-W mark-up as published (Sagonas et al., "300 Faces in-the-Wild Challenge",
# ICCV-W 2013, Fig. 1; ibug.doc.ic.ac.uk "Facial point annotations"), 1-based and inclusive.
# "Right" is the subject's right.
IBUG_300W = {
    "jaw": (1, 17), "right_brow": (18, 22), "left_brow": (23, 27), "nose": (28, 36),
    "right_eye": (37, 42), "left_eye": (43, 48), "outer_lips": (49, 60), "inner_lips": (61, 68),
}


def _from_definition(name: str) -> tuple[int, ...]:
    first, last = IBUG_300W[name]
    return tuple(range(first - 1, last))


def test_layout_is_the_300w_definition():
    assert L.GROUPS == {name: _from_definition(name) for name in IBUG_300W}
    assert (L.JAW, L.RIGHT_BROW, L.LEFT_BROW, L.NOSE, L.RIGHT_EYE, L.LEFT_EYE) == tuple(
        _from_definition(n) for n in ("jaw", "right_brow", "left_brow", "nose", "right_eye",
                                      "left_eye"))
    assert L.MOUTH == tuple(range(48, 68)) == _from_definition("outer_lips") + \
        _from_definition("inner_lips")
    assert L.N_LANDMARKS == IBUG_300W["inner_lips"][1]


@pytest.fixture(scope="module")
def main_face():
    rgb = astronaut()
    return rgb, FaceFinder(PreprocessConfig(embedding="none")).main_face(rgb)


def test_layout_on_a_real_face(main_face):
    """dlib's predictor (trained on 300-W) on a real photo of a face turned to the camera:
    the groups lie where the definition puts them."""
    _, face = main_face
    p = face.landmarks

    def centre(group):
        return p[list(group)].mean(axis=0)

    # Subject's right is the image's left.
    assert centre(L.RIGHT_BROW)[0] < centre(L.LEFT_BROW)[0]
    assert centre(L.RIGHT_EYE)[0] < centre(L.NOSE)[0] < centre(L.LEFT_EYE)[0]
    assert p[L.JAW[0], 0] < p[L.JAW[-1], 0]
    # Top to bottom: brows, eyes, nose tip, mouth, chin (jaw point 9 of 17).
    assert centre(L.RIGHT_BROW)[1] < centre(L.RIGHT_EYE)[1] < p[L.NOSE_TIP, 1] \
        < centre(L.MOUTH)[1] < p[L.JAW[8], 1]
    assert p[L.JAW[8], 1] == p[list(L.JAW), 1].max()
    assert face.source == "dlib-68 on dlib-hog" and face.score is not None


def test_landmark_box_numpy_and_torch():
    pts = np.array([[1.0, 5.0], [3.0, 2.0], [7.0, 4.0]])
    np.testing.assert_array_equal(L.landmark_box(pts), [1, 2, 7, 5])
    centre, size = L.landmark_square(pts)
    np.testing.assert_array_equal(centre, [4.0, 3.5])
    assert size == 6.0
    batch = torch.tensor(np.stack([pts, pts * 2]))
    torch.testing.assert_close(L.landmark_box(batch), torch.tensor([[1, 2, 7, 5], [2, 4, 14, 10.0]],
                                                                  dtype=torch.float64))
    centre, size = L.landmark_square(batch)
    torch.testing.assert_close(centre, torch.tensor([[4.0, 3.5], [8.0, 7.0]], dtype=torch.float64))
    torch.testing.assert_close(size, torch.tensor([6.0, 12.0], dtype=torch.float64))


def test_reconstruct_and_preprocess_crop_a_photo_alike(main_face, tmp_path):
    """Reconstructing the astronaut and preprocessing her give the same landmarks and the same
    crop box (transform) at the same crop size and scale."""
    from flows.reconstruct import InputItem, InputReconstructor
    from preprocessing.sample import SampleMaker
    from recon.inference.reconstruct import load_model
    from reconstruct_fixtures import tiny_config, untrained_checkpoint

    rgb, face = main_face
    photo = tmp_path / "astronaut.png"
    Image.fromarray(rgb).save(photo)
    cfg = tiny_config()
    recon = load_model(untrained_checkpoint(tmp_path / "model.pt", cfg))
    run = InputReconstructor(recon, FaceFinder(cfg.preprocess), str(tmp_path / "out"))
    result = run(InputItem(uri=str(photo), name="astronaut", kind="image"))
    assert result["status"] == "ok", result
    params = json.loads((tmp_path / "out" / "astronaut" / "face_00" / "params.json").read_text())

    pre = cfg.preprocess.model_copy(update={"embedding": "none", "crop_size": recon.image_size,
                                            "crop_scale": recon.crop_scale})
    record = SampleMaker(pre).make({"uri": str(photo), "rid": "r", "sha256": "s"})
    assert record["status"] == "ok", record["reason"]
    meta = json.loads(record["meta"])
    np.testing.assert_array_equal(meta["landmarks_photo"], params["landmarks_photo"])
    np.testing.assert_array_equal(meta["landmarks_photo"], np.round(face.landmarks, 2))
    np.testing.assert_array_equal(meta["transform"], params["crop_transform"])
    assert meta["detector_score"] == params["detection"]["score"]
    # The transform maps the landmark square's centre to the crop's centre, its side to
    # size / scale: the crop box is the one the model's test-time crop asks for.
    centre, side = L.landmark_square(face.landmarks.astype(np.float64))
    A = np.array(meta["transform"])
    np.testing.assert_allclose(A[:, :2] @ centre + A[:, 2], [(recon.image_size - 1) / 2] * 2,
                               atol=1e-3)  # the transform is recorded to 6 decimals
    np.testing.assert_allclose(A[0, 0], recon.image_size / (recon.crop_scale * side), rtol=1e-5)
    crop = np.asarray(Image.open(io.BytesIO(record["jpg"])))
    assert crop.shape == (recon.image_size, recon.image_size, 3)
