"""``wildface render``: OBJ in, pix_to_face / bary / zbuf (+ PNG) out, conventions kept."""
from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from flows.cli.main import app
from render_reference import reference_zbuffer, rotation_y, uv_sphere


def _write_obj(path, v, f):
    lines = [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in v]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in f]
    path.write_text("\n".join(lines) + "\n")


def test_render_command_ortho_and_persp(tmp_path):
    v, f = uv_sphere(10, 20)
    v = (v @ rotation_y(0.3).T * 0.5 + [0.2, 0.1, 0.0]).astype(np.float32)
    mesh = tmp_path / "s.obj"
    _write_obj(mesh, v, f)
    runner = CliRunner()
    res = runner.invoke(app, ["render", str(mesh), "--size", "32", "--camera", "ortho:1.5,-0.2,0.1",
                              "--out", str(tmp_path / "o.npz"), "--png", str(tmp_path / "o.png")])
    assert res.exit_code == 0, res.output
    out = np.load(tmp_path / "o.npz")
    assert out["pix_to_face"].dtype == np.int64 and out["pix_to_face"].shape == (32, 32)
    assert out["bary"].shape == (32, 32, 3) and out["zbuf"].shape == (32, 32)
    ndc = np.asarray(v, np.float64)
    ndc = 1.5 * (ndc + [-0.2, 0.1, 0.0])
    ndc[:, 2] = 1.5 * np.asarray(v, np.float64)[:, 2]
    p2f, _, zbuf = reference_zbuffer(ndc, f, 32, 32)
    assert (out["pix_to_face"] != p2f).sum() <= 2
    same = (out["pix_to_face"] == p2f) & (p2f >= 0)
    assert same.sum() > 100 and np.abs(out["zbuf"][same] - zbuf[same]).max() < 1e-5
    assert np.isneginf(out["zbuf"][p2f < 0]).all()
    from PIL import Image
    img = np.asarray(Image.open(tmp_path / "o.png"))
    assert img.shape == (32, 32, 3) and img[p2f < 0].max() == 0 and img[same].mean() > 50

    res = runner.invoke(app, ["render", str(mesh), "--size", "24", "--camera",
                              "persp:1.2,0,0,3", "--out", str(tmp_path / "p.npz")])
    assert res.exit_code == 0, res.output
    d = 3.0 - np.asarray(v, np.float64)[:, 2:3]
    pp = np.concatenate([1.2 * np.asarray(v, np.float64)[:, :2] / d, 1.0 / d], 1)
    p2f, _, _ = reference_zbuffer(pp, f, 24, 24)
    assert (np.load(tmp_path / "p.npz")["pix_to_face"] != p2f).sum() <= 2


def test_render_command_rejects_bad_input(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["render", str(tmp_path / "missing.obj"), "--size", "8", "--out",
                              str(tmp_path / "x.npz")])
    assert res.exit_code == 2 and "not found" in res.output
    mesh = tmp_path / "t.obj"
    _write_obj(mesh, [[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
    res = runner.invoke(app, ["render", str(mesh), "--size", "8", "--camera", "ortho:1,2",
                              "--out", str(tmp_path / "x.npz")])
    assert res.exit_code == 2 and "3 comma-separated" in res.output
    assert not (tmp_path / "x.npz").exists()


def test_render_refuses_non_finite_mesh_and_camera(tmp_path):
    """A NaN vertex used to render a blank image with exit 0."""
    runner = CliRunner()
    mesh = tmp_path / "head.obj"
    mesh.write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n")
    res = runner.invoke(app, ["render", str(mesh), "--size", "8", "--out", str(tmp_path / "x.npz")])
    assert res.exit_code == 2
    assert str(mesh) in res.output and "NaN or infinite" in res.output and "vertex 3" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.npz").exists()
    good = tmp_path / "t.obj"
    _write_obj(good, [[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
    res = runner.invoke(app, ["render", str(good), "--size", "8", "--camera", "ortho:nan,0,0",
                              "--out", str(tmp_path / "x.npz")])
    assert res.exit_code == 2 and "finite" in res.output and not (tmp_path / "x.npz").exists()
