"""``wildface synth``: deterministic, consistent annotations, NoW layout with ground truth."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from recon.config import FaceModelConfig, SynthConfig
from recon.synth import generate, iter_samples, load_params

CFG = SynthConfig(identities=3, images_per_identity=4, image_size=96, seed=5,
                  occluder_probability=0.4, selfie_probability=0.3, batch_size=5)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, CFG)
    return root


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_from_the_seed(synth_dir, tmp_path):
    generate(tmp_path / "again", CFG)
    assert _files(synth_dir) == _files(tmp_path / "again")  # the very same bytes
    # another batch size: the same scenes, up to float rounding in batched maths
    generate(tmp_path / "batch7", CFG.model_copy(update={"batch_size": 7}))
    pa, pb = load_params(synth_dir), load_params(tmp_path / "batch7")
    assert pa["identities"] == pb["identities"]
    for key, a in pa["images"].items():
        b = pb["images"][key]
        assert (a["challenge"], a["background"], a["pose"]) == (b["challenge"], b["background"],
                                                                b["pose"])
        assert np.allclose(a["landmarks_px"], b["landmarks_px"], atol=1e-3)
    for p in (synth_dir / "images").rglob("*.jpg"):
        a = np.asarray(Image.open(p), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "batch7" / p.relative_to(synth_dir)), dtype=np.int16)
        assert np.abs(a - b).mean() < 0.5
    generate(tmp_path / "other", CFG.model_copy(update={"seed": 6, "identities": 1, "images_per_identity": 1}))
    a = (synth_dir / "images/id0000/img000.jpg").read_bytes()
    assert (tmp_path / "other/images/id0000/img000.jpg").read_bytes() != a


def test_annotated_input_layout(synth_dir):
    from preprocessing.annotations import read_mask, read_pts

    params = load_params(synth_dir)
    with open(synth_dir / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {r["identity"] for r in rows} == {"id0000", "id0001", "id0002"}
    for row in rows:
        img_path = synth_dir / "images" / row["path"]
        assert img_path.parent.name == row["identity"]
        image = Image.open(img_path)
        assert image.size == (96, 96) and image.mode == "RGB"
        stem = img_path.with_suffix("")
        pts = read_pts((stem.parent / f"{stem.name}.pts").read_bytes())
        truth = np.asarray(params["images"][f"{row['identity']}/{stem.name}"]["landmarks_px"])
        assert np.abs(pts - truth).max() < 1e-3
        mask = read_mask((stem.parent / f"{stem.name}.mask.png").read_bytes(), 96, 96)
        assert 0.03 < (mask > 0).mean() < 0.8


def test_landmarks_lie_on_the_rendered_face(synth_dir):
    params = load_params(synth_dir)
    inside = []
    for sample in iter_samples(synth_dir):
        p = params["images"][sample["key"]]
        skin = sample["mask"] > 127
        # dilate by 2 px: landmarks on eyelids / lips sit at the skin's edge
        grown = skin.copy()
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                grown |= np.roll(np.roll(skin, dy, 0), dx, 1)
        px = np.rint(np.asarray(p["landmarks_px"])).astype(int).clip(0, 95)
        occluded = np.zeros(68, bool)
        if p["occluder"] is not None:
            from recon.synth.occluders import Occluder

            o = p["occluder"]
            cover = Occluder(o["shape"], o["target"], tuple(o["centre"]), tuple(o["half_size"]),
                             o["angle"], tuple(o["colour"])).coverage(96)
            occluded = cover[px[:, 1], px[:, 0]]
            # the occluder is painted: its pixels are out of the skin mask
            assert not skin[cover].any()
        hit = grown[px[:, 1], px[:, 0]]
        inside.append(hit[17:][~occluded[17:]].mean())  # the 51 inner points
        # landmarks in image convention match the pixel ones
        assert np.allclose((sample["landmarks"] + 1) * 48 - 0.5, p["landmarks_px"], atol=1e-4)
    assert min(inside) > 0.85, inside


def test_now_layout_holds_the_neutral_ground_truth(synth_dir):
    from recon.evaluation.now_io import find_scan, read_image_list, read_mesh, read_pp
    from recon.face_model.flame import build_flame

    params = load_params(synth_dir)
    now = synth_dir / "now"
    images = read_image_list(now / "imagepathsvalidation.txt")
    assert len(images) == 12
    for im in images:
        key = f"{im.subject}/{im.stem}"
        assert im.challenge_dir == params["images"][key]["challenge"]
        assert (now / "NoW_Dataset/final_release_version/iphone_pictures" / im.rel_path).is_file()
        if params["images"][key]["camera"]["type"] == "perspective":
            assert im.challenge == "selfie"
        elif params["images"][key]["occluder"] is not None:
            assert im.challenge == "occlusion"
    flame = build_flame(FaceModelConfig(n_shape=params["n_shape"], n_exp=params["n_exp"]))
    for subject, ident in params["identities"].items():
        scan = find_scan(now, subject)
        verts, faces = read_mesh(scan.mesh)
        lmk = read_pp(scan.landmarks)
        out = flame(torch.tensor([ident["shape"]]), torch.zeros(1, flame.n_exp),
                    torch.zeros(1, 6))
        assert np.allclose(verts, out.vertices[0].double().numpy() * 1000, atol=1e-2)  # mm
        assert np.allclose(lmk, out.now7[0].double().numpy() * 1000, atol=1e-2)
        assert faces.shape[0] == flame.faces.shape[0]
