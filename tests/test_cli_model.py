"""``wildface model info|convert|export`` through the typer app (in-process)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from recon.face_model.flame_io import load_face_model
from recon.formats.mesh_io import read_obj

runner = CliRunner()


@pytest.fixture(scope="module")
def demo():
    return load_face_model("demo-head")


def test_help_on_every_command():
    for args in (["model", "--help"], ["model", "info", "--help"], ["model", "convert", "--help"], ["model", "export", "--help"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert "Usage" in r.output


def test_info_json(demo):
    r = runner.invoke(app, ["model", "info", "--model", "demo-head", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["name"] == "demo-head"
    assert info["vertices"] == demo.n_vertices and info["faces"] == demo.n_faces
    assert info["shape_components"] == demo.n_shape_total and info["expression_components"] == demo.n_exp_total
    assert info["joints"] == 5 and info["landmarks"]["landmarks2d"] == 68 and info["landmarks"]["now"] == 7


def test_info_npz_and_missing(tmp_path, demo):
    path = demo.save_npz(tmp_path / "demo.npz")
    r = runner.invoke(app, ["model", "info", "--model", str(path), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["vertices"] == demo.n_vertices
    r = runner.invoke(app, ["model", "info", "--model", str(tmp_path / "nope.npz")])
    assert r.exit_code != 0 and "not found" in r.output


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_convert_refuses_malicious_pickle(tmp_path):
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"v_template": _Evil()}, protocol=2))
    dst = tmp_path / "out.npz"
    r = runner.invoke(app, ["model", "convert", str(src), str(dst)])
    assert r.exit_code != 0
    assert "refus" in r.output and "system" in r.output
    assert "pwned" not in r.output
    assert not dst.exists()


def test_export_mesh_and_landmarks(tmp_path, demo):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"expression": [0.0, 1.0], "pose": [0, 0.2, 0, 0.15, 0, 0]}))
    out = tmp_path / "mesh.obj"
    r = runner.invoke(app, ["model", "export", "--params", str(params), "--out", str(out)])
    assert r.exit_code == 0, r.output
    v, f, uv, ft = read_obj(out)
    assert v.shape == (demo.n_vertices, 3) and f.shape == (demo.n_faces, 3) and uv is not None
    lm = json.loads((tmp_path / "mesh.landmarks.json").read_text())
    assert np.asarray(lm["landmarks3d"]).shape == (68, 3) and np.asarray(lm["now7"]).shape == (7, 3)
    # Empty params = template.
    params.write_text("{}")
    r = runner.invoke(app, ["model", "export", "--params", str(params), "--out", str(tmp_path / "t.ply")])
    assert r.exit_code == 0, r.output
    from recon.formats.mesh_io import read_ply

    v0, _ = read_ply(tmp_path / "t.ply")
    np.testing.assert_allclose(v0, demo.v_template, atol=1e-6)


def test_export_rejects_bad_params(tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"pose": [0, 0, 0, 0, 0, 0, 0]}))
    r = runner.invoke(app, ["model", "export", "--params", str(params), "--out", str(tmp_path / "m.obj")])
    assert r.exit_code != 0 and "pose" in r.output
    params.write_text(json.dumps({"shapes": [1]}))
    r = runner.invoke(app, ["model", "export", "--params", str(params), "--out", str(tmp_path / "m.obj")])
    assert r.exit_code != 0 and "unknown keys" in r.output
    assert not (tmp_path / "m.obj").exists()
