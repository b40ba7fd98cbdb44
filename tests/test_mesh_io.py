"""OBJ / PLY writing and reading; the atomic writer behind every file write."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recon.formats.files import atomic_write_bytes, atomic_writer
from recon.formats.mesh_io import read_obj, read_ply, write_obj, write_ply

V = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0.5]], dtype=np.float32)
F = np.array([[0, 1, 2], [0, 2, 3]])
UV = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float32)


def test_obj_round_trip_with_texture_and_normal_map(tmp_path):
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[..., 0] = 200
    nmap = np.full((8, 8, 3), 128, np.uint8)
    p = write_obj(tmp_path / "m.obj", V, F, uvs=UV, uv_faces=F, texture=tex, normal_map=nmap)
    v, f, uv, ft = read_obj(p)
    np.testing.assert_allclose(v, V, atol=1e-6)
    np.testing.assert_array_equal(f, F)
    np.testing.assert_allclose(uv, UV, atol=1e-6)
    np.testing.assert_array_equal(ft, F)
    mtl = (tmp_path / "m.mtl").read_text()
    assert "map_Kd m.png" in mtl and "map_Bump m_normals.png" in mtl
    assert "mtllib m.mtl" in p.read_text()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), tex)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.mtl", "m.obj", "m.png", "m_normals.png"]


def test_read_obj_quads_negative_indices_and_normals(tmp_path):
    p = tmp_path / "q.obj"
    p.write_text(
        "# quad with normals and relative indices\n"
        "o thing\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\n"
        "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nvn 0 0 1\n"
        "usemtl x\ns off\nf -4/-4/1 -3/-3/1 -2/-2/1 -1/-1/1\n"
        "f 1//1 2//1 3//1\n"
    )
    v, f, uv, ft = read_obj(p)
    assert v.shape == (4, 3)
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3], [0, 1, 2]])
    assert uv is None and ft is None  # the last face has no UVs


def test_read_obj_errors(tmp_path):
    p = tmp_path / "bad.obj"
    p.write_text("v 0 0 0\nf 1 2 3\n")
    with pytest.raises(ValueError, match="out of range"):
        read_obj(p)
    p.write_text("v 0 0 zero\n")
    with pytest.raises(ValueError, match="bad OBJ line"):
        read_obj(p)


def test_ply_round_trip(tmp_path):
    colors = np.arange(12, dtype=np.uint8).reshape(4, 3)
    p = write_ply(tmp_path / "m.ply", V, F, colors=colors)
    v, f = read_ply(p)
    np.testing.assert_allclose(v, V)
    np.testing.assert_array_equal(f, F)
    v2, f2 = read_ply(write_ply(tmp_path / "n.ply", V, F))
    np.testing.assert_array_equal(f2, F)


def test_texture_requires_uvs(tmp_path):
    with pytest.raises(ValueError, match="needs uvs"):
        write_obj(tmp_path / "x.obj", V, F, texture=np.zeros((2, 2, 3), np.uint8))
    assert not (tmp_path / "x.obj").exists()


def test_atomic_writer_replaces_the_file_whole_or_not_at_all(tmp_path):
    target = tmp_path / "new" / "f.bin"
    atomic_write_bytes(target, b"old")  # creates the folder
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_writer(target) as fh:
            fh.write(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]  # no temporary left
    with atomic_writer(target, fsync=True) as fh:
        fh.write(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the block ends
        [tmp] = [p for p in target.parent.iterdir() if p.name != "f.bin"]
        assert tmp.name.startswith(".f.bin.") and tmp.name.endswith(".tmp")  # hidden
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
