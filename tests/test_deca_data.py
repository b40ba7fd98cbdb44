"""DECA's ``data/`` folder (``wildface model convert --deca-data``): each file lands in the
converted model as DECA's code reads it (decalib/deca.py ``_setup_renderer``,
``displacement2normal``; decalib/utils/util.py ``upsample_mesh``; models/FLAME.py
``FLAMETex``), missing files fall back with a note, bad files are refused by name, and the
detail step uses DECA's face/eye mask and fixed displacement.

The folder is built here on the tiny test model, with the files' structures: RGBA PNG masks
(channel 0 read), ``np.save``d arrays and pickled dicts, an OBJ with ``vt``/``ft``, either
albedo space."""
from __future__ import annotations

import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from flows.cli.main import app
from recon.config import FaceModelConfig, NetworkConfig
from recon.deca import DECA, Codes
from recon.face_model.deca_data import load_flame_with_deca_data
from recon.face_model.face_assets import FaceModelAssets, FaceModelFormatError
from recon.render import vertex_normals
from recon.formats.safe_pickle import UnsafePickleError
from test_deca_conventions import deca_dense_faces, deca_vertex_normals
from tiny_face_model import tiny_face_assets

runner = CliRunner()
S = 32  # the maps' side here (DECA's: 256)
K = 3   # albedo components


@pytest.fixture(scope="module")
def tiny() -> FaceModelAssets:
    return tiny_face_assets()


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _write_flame(path, a: FaceModelAssets) -> None:
    """FLAME's pickle keys with the tiny model's arrays (plain numpy)."""
    data = {"v_template": a.v_template.astype(np.float64), "f": a.faces.astype(np.uint32),
            "shapedirs": a.shapedirs.astype(np.float64), "posedirs": a.posedirs.astype(np.float64),
            "J_regressor": a.J_regressor.astype(np.float64), "weights": a.weights.astype(np.float64),
            "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)}
    path.write_bytes(pickle.dumps(data, protocol=2))


def _obj_uvs(a: FaceModelAssets) -> np.ndarray:
    """A UV layout different from the tiny model's own (so the OBJ's is seen to land)."""
    return (0.1 + 0.8 * a.vt[:, ::-1]).astype(np.float32)


def _write_obj(path, a: FaceModelAssets) -> None:
    """Wavefront OBJ text: v, vt, then 1-based ``f v/vt`` triangles."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in a.v_template]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in _obj_uvs(a)]
    lines += ["f " + " ".join(f"{v + 1}/{t + 1}" for v, t in zip(fv, ft)) for fv, ft in zip(a.faces, a.ft)]
    path.write_text("\n".join(lines) + "\n")


def _mask_rgba(seed: int) -> np.ndarray:
    """(S, S, 4) uint8 with soft values; channels 1-3 differ from channel 0, the one DECA reads."""
    r = _rng(seed)
    rgba = r.integers(0, 256, (S, S, 4), dtype=np.uint8)
    rgba[..., 0] = 0
    rgba[8:S - 8, 4:S - 4, 0] = r.integers(1, 256, (S - 16, S - 8), dtype=np.uint8)
    return rgba


def _dense_template(a: FaceModelAssets) -> dict:
    """DECA's dense template structure: texel coordinates of every texel (float, as stored),
    the valid ones, the coarse triangle and barycentrics under each, dense triangles."""
    r = _rng(3)
    ys, xs = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    ids = np.flatnonzero((ys.ravel() % 2 == 0))  # N = S * S / 2
    N = ids.size
    tri = a.faces[r.integers(0, a.n_faces, N)]
    bary = r.dirichlet(np.ones(3), N)
    f = np.stack([np.arange(N - 2), np.arange(1, N - 1), np.arange(2, N)], 1)
    return {"img_size": S, "f": f, "x_coords": xs.ravel().astype(np.float64) + 0.25,
            "y_coords": ys.ravel().astype(np.float64), "valid_pixel_ids": ids,
            "valid_pixel_3d_faces": tri, "valid_pixel_b_coords": bary, "uv_coords": np.zeros(3)}


def _albedo(kind: str) -> dict:
    r = _rng(4)
    if kind == "bfm":  # FLAME_albedo_from_BFM.npz: 0..1, MU flat
        return {"MU": r.uniform(0.2, 0.8, S * S * 3), "PC": 0.05 * r.standard_normal((S * S * 3, K))}
    return {"mean": r.uniform(50, 200, (S, S, 3)), "tex_dir": 5 * r.standard_normal((S, S, 3, K))}


def make_deca_folder(root, a: FaceModelAssets, albedo: tuple[str, ...] = ("bfm",)):
    """(pkl, data folder) as a user has them: FLAME's pickle apart, DECA's data/ folder."""
    (root / "flame").mkdir()
    data = root / "data"
    data.mkdir()
    pkl = root / "flame" / "generic_model.pkl"
    _write_flame(pkl, a)
    np.save(data / "landmark_embedding.npy", {  # as DECA's: a pickled dict, torch tensors in it
        "static_lmk_faces_idx": torch.tensor(a.static_lmk_faces_idx),
        "static_lmk_bary_coords": torch.tensor(a.static_lmk_bary_coords),
        "dynamic_lmk_faces_idx": torch.tensor(a.dynamic_lmk_faces_idx),
        "dynamic_lmk_bary_coords": torch.tensor(a.dynamic_lmk_bary_coords),
        "full_lmk_faces_idx": a.full_lmk_faces_idx[None], "full_lmk_bary_coords": a.full_lmk_bary_coords[None]},
        allow_pickle=True)
    _write_obj(data / "head_template.obj", a)
    Image.fromarray(_mask_rgba(1), "RGBA").save(data / "uv_face_eye_mask.png")
    Image.fromarray(_mask_rgba(2)[..., 0], "L").save(data / "uv_face_mask.png")  # a grey PNG
    np.save(data / "fixed_displacement_256.npy", 0.002 * _rng(5).standard_normal((S, S)))
    tex = np.zeros((2 * S, 2 * S, 3), np.uint8)
    tex[:S, :, 0], tex[S:, :, 1] = 220, 200  # red top half, green bottom half
    Image.fromarray(tex).save(data / "mean_texture.jpg", quality=95)
    np.save(data / "texture_data_256.npy", _dense_template(a), allow_pickle=True)
    names = {"bfm": "FLAME_albedo_from_BFM.npz", "flame": "FLAME_texture.npz"}
    for kind in albedo:
        np.savez(data / names[kind], **_albedo(kind))
    return pkl, data


def _convert(pkl, data, dst):
    return runner.invoke(app, ["model", "convert", str(pkl), str(dst), "--deca-data", str(data)])


def test_every_file_lands_as_deca_reads_it(tmp_path, tiny):
    pkl, data = make_deca_folder(tmp_path, tiny)
    r = _convert(pkl, data, tmp_path / "flame.npz")
    assert r.exit_code == 0, r.output
    m = FaceModelAssets.load_npz(tmp_path / "flame.npz")

    np.testing.assert_array_equal(m.dynamic_lmk_faces_idx, tiny.dynamic_lmk_faces_idx)  # from data/
    np.testing.assert_array_equal(m.full_lmk_faces_idx, tiny.full_lmk_faces_idx)
    np.testing.assert_allclose(m.vt, _obj_uvs(tiny), atol=1e-6)  # head_template.obj's vt / ft
    np.testing.assert_array_equal(m.ft, tiny.ft)
    # Masks: imread(...)/255., channel 0 (a grey image is its own channel 0); no threshold.
    np.testing.assert_array_equal(m.uv_face_eye_mask, _mask_rgba(1)[..., 0].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(m.uv_face_mask, _mask_rgba(2)[..., 0].astype(np.float32) / 255.0)
    assert np.unique(m.uv_face_eye_mask).size > 10  # soft values kept
    # The fixed displacement as stored: same orientation, no scaling.
    fixed = 0.002 * _rng(5).standard_normal((S, S))
    np.testing.assert_allclose(m.fixed_displacement, fixed, rtol=1e-6, atol=0)
    # mean_texture.jpg: RGB / 255, row 0 = the image's top.
    decoded = np.asarray(Image.open(data / "mean_texture.jpg"), np.float32) / 255.0
    np.testing.assert_array_equal(m.mean_texture, decoded)
    assert m.mean_texture[:S - 4, :, 0].mean() > 0.8 and m.mean_texture[S + 4:, :, 1].mean() > 0.7
    # Dense template: the entries DECA's upsample_mesh reads, coordinates truncated as its astype(int).
    dt = _dense_template(tiny)
    assert int(m.dense_template["img_size"]) == S and "uv_coords" not in m.dense_template
    np.testing.assert_array_equal(m.dense_template["x_coords"], dt["x_coords"].astype(int))
    for k in ("f", "valid_pixel_ids", "valid_pixel_3d_faces"):
        np.testing.assert_array_equal(m.dense_template[k], dt[k])
    np.testing.assert_allclose(m.dense_template["valid_pixel_b_coords"], dt["valid_pixel_b_coords"], rtol=1e-6)
    # FLAME_albedo_from_BFM.npz: FLAMETex reads MU as (S, S, 3) BGR, 0..1; nearest 32 -> 256.
    mu = _albedo("bfm")["MU"].reshape(S, S, 3)[..., ::-1]
    np.testing.assert_allclose(m.albedo_mean, np.repeat(np.repeat(mu, 8, 0), 8, 1), atol=1e-6)
    assert m.albedo_basis.shape == (256, 256, 3, K)

    info = json.loads(runner.invoke(app, ["model", "info", "--model", str(tmp_path / "flame.npz"),
                                          "--json"]).output)
    assert info["deca_data"] == {"uv_face_eye_mask": [S, S], "uv_face_mask": [S, S],
                                 "fixed_displacement": [S, S], "mean_texture": [2 * S, 2 * S, 3],
                                 "dense_template": {"vertices": S * S // 2, "faces": S * S // 2 - 2}}


def test_flame_texture_space_when_no_bfm_and_bfm_preferred(tmp_path, tiny):
    (tmp_path / "a").mkdir()
    pkl, data = make_deca_folder(tmp_path / "a", tiny, albedo=("flame",))
    m = load_flame_with_deca_data(pkl, data)
    mean = _albedo("flame")["mean"][..., ::-1] / 255.0  # FLAME_texture.npz: /255, BGR
    np.testing.assert_allclose(m.albedo_mean, np.repeat(np.repeat(mean, 8, 0), 8, 1), atol=1e-6)
    (tmp_path / "b").mkdir()
    pkl, data = make_deca_folder(tmp_path / "b", tiny, albedo=("flame", "bfm"))
    m = load_flame_with_deca_data(pkl, data)  # DECA's default tex_type: BFM
    mu = _albedo("bfm")["MU"].reshape(S, S, 3)[..., ::-1]
    np.testing.assert_allclose(m.albedo_mean[::8, ::8], mu, atol=1e-6)


def test_missing_optional_files_fall_back_with_a_note(tmp_path, tiny, caplog):
    pkl, data = make_deca_folder(tmp_path, tiny, albedo=())
    gone = ["head_template.obj", "uv_face_mask.png", "fixed_displacement_256.npy",
            "mean_texture.jpg", "texture_data_256.npy"]
    for name in gone:
        (data / name).unlink()
    with caplog.at_level(logging.WARNING, logger="recon.face_model.deca_data"):
        m = load_flame_with_deca_data(pkl, data)
    notes = " ".join(rec.getMessage() for rec in caplog.records)
    for name in gone + ["FLAME_texture.npz", "FLAME_albedo_from_BFM.npz"]:
        assert name in notes, name
    assert "cylindrical" in notes and "flat mean skin" in notes
    assert m.uv_face_mask is None and m.fixed_displacement is None and m.mean_texture is None
    assert m.dense_template == {} and m.uv_face_eye_mask is not None
    assert np.ptp(m.albedo_mean.reshape(-1, 3), axis=0).max() < 1e-6  # the flat fallback
    # Saved without those arrays, loaded back the same.
    back = FaceModelAssets.load_npz(m.save_npz(tmp_path / "m.npz"))
    assert back.fixed_displacement is None and back.deca_data_summary() == {"uv_face_eye_mask": [S, S]}


def test_file_without_deca_arrays_still_loads(tmp_path, tiny):
    """A face-model file written before DECA's maps were stored (format version 1)."""
    path = tmp_path / "old.npz"
    with np.load(tiny.save_npz(path)) as z:
        arrays = {k: z[k] for k in z.files}
    assert int(arrays["format_version"]) == 1
    assert not {"uv_face_eye_mask", "fixed_displacement"} & set(arrays)
    m = FaceModelAssets.load_npz(path)
    assert m.uv_face_eye_mask is None and m.dense_template == {} and m.deca_data_summary() == {}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncated_png(path, marker):
    Image.fromarray(_mask_rgba(1), "RGBA").save(path)
    path.write_bytes(path.read_bytes()[:200])


def _wrong_shape_npy(path, marker):
    np.save(path, np.zeros((S, S, 3)))


def _evil_dense_template(path, marker):
    np.save(path, {"f": _Evil(marker), "img_size": S}, allow_pickle=True)


def _bad_obj(path, marker):
    path.write_text("v 0 0 0\nvt 0.5\nf 1/1 x 2\n")


def _evil_landmarks(path, marker):
    np.save(path, {"static_lmk_faces_idx": _Evil(marker)}, allow_pickle=True)


def _truncated_npz(path, marker):
    path.write_bytes(path.read_bytes()[:300])


def _nan_displacement(path, marker):
    d = np.zeros((S, S))
    d[3, 4] = np.nan
    np.save(path, d)


def _dense_template_off_the_model(path, marker):
    dt = _dense_template(tiny_face_assets())
    dt["valid_pixel_3d_faces"] = dt["valid_pixel_3d_faces"] + 10_000
    np.save(path, dt, allow_pickle=True)


@pytest.mark.parametrize("name, spoil, error", [
    ("uv_face_eye_mask.png", _truncated_png, FaceModelFormatError),
    ("fixed_displacement_256.npy", _wrong_shape_npy, FaceModelFormatError),
    ("fixed_displacement_256.npy", _nan_displacement, FaceModelFormatError),
    ("texture_data_256.npy", _evil_dense_template, UnsafePickleError),
    ("texture_data_256.npy", _dense_template_off_the_model, FaceModelFormatError),
    ("head_template.obj", _bad_obj, FaceModelFormatError),
    ("landmark_embedding.npy", _evil_landmarks, UnsafePickleError),
    ("FLAME_albedo_from_BFM.npz", _truncated_npz, FaceModelFormatError),
], ids=["truncated-png", "wrong-shape-npy", "nan-npy", "forbidden-global", "dense-off-model",
        "bad-obj", "landmarks-forbidden-global", "truncated-albedo"])
def test_bad_file_is_refused_by_name_and_nothing_written(tmp_path, tiny, name, spoil, error):
    pkl, data = make_deca_folder(tmp_path, tiny)
    marker = tmp_path / "pwned"
    spoil(data / name, marker)
    with pytest.raises(error, match=name):
        load_flame_with_deca_data(pkl, data)
    dst = tmp_path / "out" / "flame.npz"
    r = _convert(pkl, data, dst)
    assert r.exit_code == 2 and name in r.output, r.output
    assert not dst.exists() and not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


NET = NetworkConfig(backbone="mobilenet_v3_small", hidden=16, n_detail=4, image_size=32, uv_size=S)


def _with_deca_maps(a: FaceModelAssets, mask: np.ndarray, fixed: np.ndarray) -> FaceModelAssets:
    import dataclasses

    return dataclasses.replace(a, uv_face_eye_mask=mask, fixed_displacement=fixed)


def test_detail_step_uses_decas_mask_and_fixed_displacement(tiny):
    """DECA's displacement2normal on the model's own maps, by hand: positions
    ``P + uv_z * mask * n + fixed * n``, normals of DECA's dense triangles, blended with the
    coarse normals by the mask. The mask also becomes the photometric face region."""
    r = _rng(7)
    mask64 = np.zeros((2 * S, 2 * S), np.float32)  # at twice the UV size
    # soft inside DECA's dense-triangle margins (its own mask is 0 at the layout's border)
    mask64[14:2 * S - 14, 8:2 * S - 8] = r.uniform(0.3, 1.0, (2 * S - 28, 2 * S - 16))
    fixed = (0.002 * r.standard_normal((S, S))).astype(np.float32)
    torch.manual_seed(0)
    model = DECA(FaceModelConfig(), NET, assets=_with_deca_maps(tiny, mask64, fixed)).eval()
    plain = DECA(FaceModelConfig(), NET, assets=tiny).eval()
    mask = torch.from_numpy(mask64[::2, ::2].copy())[None, None]  # nearest: every other texel
    torch.testing.assert_close(model.uv_face_mask, mask, rtol=0, atol=0)
    assert not torch.equal(plain.uv_face_mask, model.uv_face_mask)

    g = torch.Generator().manual_seed(0)
    L = model.layout
    codes = Codes(shape=torch.randn(1, L.n_shape, generator=g), tex=torch.zeros(1, L.n_tex),
                  exp=torch.randn(1, L.n_exp, generator=g), pose=0.1 * torch.randn(1, 6, generator=g),
                  cam=torch.tensor([[7.0, 0.0, 0.0]]), light=torch.zeros(1, 9, 3))
    with torch.no_grad():
        rec = model.decode(codes, with_detail=False, render=False)
        uv_z = 0.004 * torch.randn(1, 1, S, S, generator=g)
        model._add_detail(rec, uv_z, codes.light, render=False)

    verts = rec.vertices
    pos = model.renderer.world2uv(verts)
    n = F.normalize(model.renderer.world2uv(vertex_normals(verts, model.renderer.faces)), dim=1)
    keep = mask * model.renderer.uv.interior
    detail = pos + uv_z * keep * n + torch.from_numpy(fixed)[None, None] * n
    dense = deca_vertex_normals(detail[0].permute(1, 2, 0).reshape(-1, 3), deca_dense_faces(S, S))
    ref = dense.reshape(S, S, 3).permute(2, 0, 1)[None] * keep + n * (1 - keep)
    covered = model.renderer.uv.covered.bool().expand_as(ref)
    torch.testing.assert_close(rec.uv_detail_normals[covered], ref[covered], rtol=0, atol=1e-5)
    torch.testing.assert_close(rec.uv_detail_vertices, detail, rtol=0, atol=1e-7)
    torch.testing.assert_close(rec.uv_displacement, uv_z)  # the decoder's raw map, no fixed part
    assert (keep > 0).sum() > 100
