"""`wildface reconstruct --aligned`: ready face crops in, DECA's outputs (codes by group,
68 landmarks in the input's pixels, the raw displacement map) out.

The landmark pixels are checked against DECA's code as read (yfeng95/DECA, decalib/):
``deca.decode`` projects FLAME's 68 landmarks with ``util.batch_orth_proj``
(``s * (X[:, :2] + [tx, ty])``), negates y, and ``util.tensor_vis_landmarks`` draws them at
``u * size / 2 + size / 2``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from reconstruct_fixtures import tiny_config


def _face(size: int, width: int | None = None) -> np.ndarray:
    """A (size, width or size, 3) uint8 face photo (skimage's astronaut, head region)."""
    from PIL import Image
    from skimage import data

    head = data.astronaut()[20:220, 120:320]
    return np.array(Image.fromarray(head).resize((width or size, size)))


def _crops(root: Path) -> Path:
    """The model's input size (64), a larger square crop, a non-square one and an input whose
    name cannot be an output folder."""
    from PIL import Image

    root.mkdir(parents=True)
    Image.fromarray(_face(64)).save(root / "same.png")
    Image.fromarray(_face(96)).save(root / "larger.png")
    Image.fromarray(_face(64, 80)).save(root / "wide.png")
    Image.fromarray(_face(64)).save(root / "bad;name.png")
    return root


def deca_landmark_pixels(flame, params: dict, size: int) -> np.ndarray:
    """DECA's 68 landmark pixels for a ``size`` x ``size`` input from the written codes:
    FLAME's landmarks2d (dynamic contour), ``batch_orth_proj``, y negated, then
    ``(u + 1) * size / 2``."""
    c = {k: torch.tensor(params["codes"][k], dtype=torch.float32)[None]
         for k in ("shape", "exp", "pose")}
    lmk3d = flame(c["shape"], c["exp"], c["pose"]).landmarks2d[0].double().numpy()  # (68, 3)
    s, tx, ty = params["codes"]["cam"]
    u = s * (lmk3d[:, :2] + np.array([tx, ty]))
    u[:, 1] = -u[:, 1]
    return u * size / 2 + size / 2


def _check_face(face: Path, recon, size: int, half_pixel: float) -> dict:
    params = json.loads((face / "params.json").read_text())
    codes = params["codes"]
    cfg = tiny_config()
    sizes = {"shape": (cfg.face_model.n_shape,), "tex": (cfg.face_model.n_tex,),
             "exp": (cfg.face_model.n_exp,), "pose": (6,), "cam": (3,), "light": (9, 3),
             "detail": (cfg.model.n_detail,)}
    assert {k: np.shape(codes[k]) for k in sizes} == sizes
    assert params["input_size"] == size and params["aligned"] is True
    lmk = np.asarray(params["landmarks2d"])
    assert lmk.shape == (68, 2)
    expected = deca_landmark_pixels(recon.model.flame, params, size) - half_pixel
    np.testing.assert_allclose(lmk, expected, rtol=0, atol=0.05)
    disp = np.load(face / "displacement.npy", allow_pickle=False)
    assert disp.dtype == np.float32 and disp.shape == (cfg.model.uv_size, cfg.model.uv_size)
    t = {k: torch.tensor(codes[k], dtype=torch.float32)[None] for k in ("pose", "exp", "detail")}
    with torch.no_grad():
        decoded = recon.model.detail_decoder(t["pose"][:, 3:], t["exp"], t["detail"])
    np.testing.assert_allclose(disp, decoded[0, 0].numpy(), rtol=0, atol=1e-7)
    assert "displacement.npy" in params["files"]
    return params


def test_aligned_crops_give_codes_pixels_and_displacement(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from flows.cli.main import app
    from recon.inference.reconstruct import load_model

    crops = _crops(tmp_path / "crops")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["reconstruct", str(crops), "--model", str(checkpoint),
                                   "--aligned", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "rejected": 2}
    reasons = {f["input"].rsplit("/", 1)[-1]: f["reason"] for f in summary["failures"]}
    assert "must be a square face crop, got 80 x 64" in reasons["wide.png"]
    assert "unsafe name" in reasons["bad;name.png"]
    assert not (out / "wide" / "face_00").exists() and not (out / "bad;name").exists()
    recon = load_model(checkpoint)
    # wildface's own architecture: pixel centres at integers, half a pixel from DECA's.
    same = _check_face(out / "same" / "face_00", recon, 64, half_pixel=0.5)
    _check_face(out / "larger" / "face_00", recon, 96, half_pixel=0.5)
    # An input of the model's size is the crop itself: the codes are the encoder's.
    direct = recon.encode(_face(64)[None])
    torch.testing.assert_close(torch.tensor(same["codes"]["shape"]), direct.shape[0])


def test_imported_deca_models_report_decas_pixels(checkpoint, tmp_path):
    """A model of ``model.architecture: deca`` writes DECA's own mapping (no half pixel)."""
    from flows.reconstruct import InputItem, InputReconstructor
    from preprocessing.faces import FaceFinder
    from recon.inference.reconstruct import load_model

    crops = _crops(tmp_path / "crops")
    recon = load_model(checkpoint)
    recon.model.network_config = recon.model.network_config.model_copy(
        update={"architecture": "deca"})
    run = InputReconstructor(recon, FaceFinder(tiny_config().preprocess), str(tmp_path / "out"),
                             aligned=True)
    result = run(InputItem(uri=str(crops / "larger.png"), name="larger", kind="image"))
    assert result["status"] == "ok", result
    params = _check_face(tmp_path / "out" / "larger" / "face_00", recon, 96, half_pixel=0.0)
    assert params["landmarks2d_pixels"].startswith("deca")


def test_ray_actor_takes_the_aligned_mode(checkpoint, tmp_path):
    """The Ray job's actor (run here in-process) reconstructs aligned inputs too, from the
    model packed by the driver: it reads nothing of the driver's model files (a node of a
    cluster may not see them)."""
    from flows.reconstruct import _RayReconstructor
    from flows.registry import ModelFiles, pack_model_files

    crops = _crops(tmp_path / "crops")
    driver_copy = tmp_path / "driver" / "model.pt"
    driver_copy.parent.mkdir()
    driver_copy.write_bytes(Path(checkpoint).read_bytes())
    packed = pack_model_files(ModelFiles(checkpoint=driver_copy))
    driver_copy.unlink()
    with mock.patch.dict(os.environ):  # the actor sets the offline variables of its process
        actor = _RayReconstructor(packed, "", tiny_config().model_dump_json(),
                                  str(tmp_path / "out"), True)
        got = actor({"uri": np.array([str(crops / "wide.png"), str(crops / "larger.png")]),
                     "name": np.array(["wide", "larger"]), "kind": np.array(["image"] * 2)})
    assert list(got["status"]) == ["rejected", "ok"]
    assert "square face crop" in got["reason"][0]
    assert (tmp_path / "out" / "larger" / "face_00" / "displacement.npy").is_file()


def test_aligned_video_frames_are_crops(checkpoint, tmp_path):
    """A video of square face crops: every frame is reconstructed without detection."""
    import pandas as pd

    from flows.reconstruct import run_batch
    from recon.inference.reconstruct import load_model
    from recon.inference.video import write_video

    face = _face(96)
    write_video(tmp_path / "clip.mp4", [face, face[:, ::-1], face], fps=5)
    out = tmp_path / "out"
    summary = run_batch([str(tmp_path / "clip.mp4")], str(out), str(checkpoint), tiny_config(),
                        aligned=True)
    assert summary["counts"] == {"ok": 1}, summary
    table = pd.read_parquet(out / "clip" / "frames.parquet")
    assert table["frame"].tolist() == [0, 1, 2] and (table["status"] == "ok").all()
    params = _check_face(out / "clip" / "face_00", load_model(checkpoint), 96, half_pixel=0.5)
    np.testing.assert_allclose(table["shape"][0], params["codes"]["shape"], rtol=0, atol=1e-6)


def test_a_non_finite_aligned_face_is_rejected_with_nothing_written(
        checkpoint, tmp_path, monkeypatch):
    from flows.reconstruct import InputItem, InputReconstructor
    from preprocessing.faces import FaceFinder
    from recon.inference.reconstruct import FaceReconstructor, load_model

    crops = _crops(tmp_path / "crops")
    encode = FaceReconstructor.encode

    def diverging(self, batch):
        codes = encode(self, batch)
        return codes.replace(shape=torch.full_like(codes.shape, float("nan")))

    monkeypatch.setattr(FaceReconstructor, "encode", diverging)
    run = InputReconstructor(load_model(checkpoint), FaceFinder(tiny_config().preprocess),
                             str(tmp_path / "out"), aligned=True)
    result = run(InputItem(uri=str(crops / "same.png"), name="same", kind="image"))
    assert result["status"] == "rejected"
    assert "non-finite values (inf or nan) in codes.shape" in result["reason"]
    assert result["failed_faces"][0]["face"] == "face 0"
    assert sorted(p.name for p in (tmp_path / "out" / "same").iterdir()) == ["result.json"]
