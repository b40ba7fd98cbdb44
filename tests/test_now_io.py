"""NoW layout I/O: picked-points XML, image path lists, landmarks, prediction lookup."""
from __future__ import annotations

import numpy as np
import pytest

from recon.evaluation.now_io import (
    NowFormatError,
    NowImage,
    find_prediction,
    find_scan,
    image_list_path,
    read_image_list,
    read_landmarks,
    read_mesh,
    read_pp,
    write_image_list,
    write_pp,
    write_prediction,
)

# As MeshLab writes it (and the NoW release ships it): attribute order varies.
REAL_PP = """<!DOCTYPE PickedPoints>
<PickedPoints>
 <DocumentData>
  <DateTime time="16:46:05" date="2018-10-19"/>
  <User name="annotator"/>
  <DataFileName name="natural_head_rotation.000001.obj"/>
  <templateName name=""/>
 </DocumentData>
 <point x="-40.8195" y="31.4277" z="-47.8852" name="0" active="1"/>
 <point y="33.0912" x="-14.3302" z="-36.7081" active="1" name="1"/>
 <point x="14.5131" y="32.4417" z="-36.2659" name="2" active="1"/>
 <point x="40.5573" z="-46.2601" y="31.0145" name="3" active="1"/>
 <point x="0.184711" y="-5.35372" z="-17.2716" name="4" active="1"/>
 <point x="-23.1283" y="-26.2045" z="-34.3337" name="5" active="1"/>
 <point x="24.2105" y="-26.8331" z="-32.5906" name="6" active="1"/>
</PickedPoints>
"""


def test_read_real_format_pp(tmp_path):
    p = tmp_path / "scan_picked_points.pp"
    p.write_text(REAL_PP)
    lmk = read_pp(p)
    assert lmk.shape == (7, 3)
    np.testing.assert_allclose(lmk[0], [-40.8195, 31.4277, -47.8852])
    np.testing.assert_allclose(lmk[1], [-14.3302, 33.0912, -36.7081])
    np.testing.assert_allclose(lmk[4], [0.184711, -5.35372, -17.2716])
    # our writer produces the same format back
    q = write_pp(tmp_path / "again.pp", lmk)
    np.testing.assert_allclose(read_pp(q), lmk, atol=1e-6)
    assert q.read_text().startswith("<!DOCTYPE PickedPoints>")


def test_bad_pp_files_are_rejected(tmp_path):
    six = "\n".join(line for line in REAL_PP.splitlines() if 'name="6"' not in line)
    (tmp_path / "six.pp").write_text(six)
    with pytest.raises(NowFormatError, match="7x3"):
        read_pp(tmp_path / "six.pp")
    (tmp_path / "junk.pp").write_text("<PickedPoints><point x='a' y='1' z='2'/>")
    with pytest.raises(NowFormatError):
        read_pp(tmp_path / "junk.pp")


def test_image_list_parsing(tmp_path):
    p = tmp_path / "imagepathsvalidation.txt"
    p.write_text(
        "FaMoS_180424_03335_TA/multiview_neutral/IMG_0101.jpg\n"
        "\n"
        "FaMoS_180424_03335_TA/multiview_expressions/IMG_0072.jpg\n"
        "iphone_pictures/FaMoS_180704_03355_TA/multiview_occlusions/IMG_0233.jpg\r\n"
        "FaMoS_180704_03355_TA/selfie/IMG_0250.JPG\n"
    )
    images = read_image_list(p)
    assert [im.challenge for im in images] == ["neutral", "expression", "occlusion", "selfie"]
    assert images[2] == NowImage("FaMoS_180704_03355_TA", "multiview_occlusions", "IMG_0233", ".jpg")
    assert images[3].suffix == ".JPG"
    assert images[0].rel_path == "FaMoS_180424_03335_TA/multiview_neutral/IMG_0101.jpg"
    assert image_list_path(tmp_path, "val") == p
    out = write_image_list(tmp_path / "copy.txt", images)
    assert read_image_list(out) == images


@pytest.mark.parametrize("line,match", [
    ("subj/unknown_challenge/IMG_1.jpg", "unknown challenge"),
    ("subj/../IMG_1.jpg", "bad path component"),
    ("subj/multiview_neutral/IMG_1;touch${IFS}x.jpg", "bad path component"),
    ("IMG_1.jpg", "not <subject>"),
])
def test_image_list_errors(tmp_path, line, match):
    p = tmp_path / "list.txt"
    p.write_text(line + "\n")
    with pytest.raises(NowFormatError, match=match):
        read_image_list(p)


def test_unknown_split_and_missing_list(tmp_path):
    with pytest.raises(NowFormatError, match="split"):
        image_list_path(tmp_path, "train")
    with pytest.raises(NowFormatError, match="not found"):
        read_image_list(tmp_path / "imagepathstest.txt")


def test_landmarks_npy_txt_and_prediction_lookup(tmp_path):
    im = NowImage("S1", "selfie", "IMG_0001")
    lmk = np.arange(21, dtype=np.float64).reshape(7, 3) / 7
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.0]])
    files = write_prediction(tmp_path, im, verts, np.array([[0, 1, 2]]), lmk)
    assert files.mesh == tmp_path / "S1" / "selfie" / "IMG_0001.obj"
    np.testing.assert_allclose(read_landmarks(files.landmarks), lmk)
    v, f = read_mesh(files.mesh)
    np.testing.assert_allclose(v, verts, atol=1e-6)
    assert f.tolist() == [[0, 1, 2]]
    # .txt landmarks are found when there is no .npy
    files.landmarks.unlink()
    np.savetxt(tmp_path / "S1" / "selfie" / "IMG_0001.txt", lmk)
    found = find_prediction(tmp_path, im)
    assert found.landmarks.suffix == ".txt"
    np.testing.assert_allclose(read_landmarks(found.landmarks), lmk)
    # missing files are None; wrong shapes are errors
    assert find_prediction(tmp_path, NowImage("S2", "selfie", "IMG_0001")).mesh is None
    np.save(tmp_path / "bad.npy", np.zeros((68, 3)))
    with pytest.raises(NowFormatError, match="7x3"):
        read_landmarks(tmp_path / "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(NowFormatError):
        read_landmarks(tmp_path / "obj.npy")  # pickles are never loaded


def test_find_scan(tmp_path):
    with pytest.raises(NowFormatError, match="no scan"):
        find_scan(tmp_path, "S1")
    (tmp_path / "scans" / "S1").mkdir(parents=True)
    (tmp_path / "scans" / "S1" / "a.obj").write_text("v 0 0 0\n")
    with pytest.raises(NowFormatError, match="picked points"):
        find_scan(tmp_path, "S1")
    (tmp_path / "scans_lmks_onlypp" / "S1").mkdir(parents=True)
    (tmp_path / "scans_lmks_onlypp" / "S1" / "a.pp").write_text(REAL_PP)
    s = find_scan(tmp_path, "S1")
    assert s.mesh.name == "a.obj" and s.landmarks.name == "a.pp"
