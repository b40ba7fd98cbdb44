"""Bad input gets one clear message: config files with YAML mistakes (every command that takes
--config), meshes with NaN/inf coordinates or malformed PLY bodies, `detect` with no readable
photo."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from flows.cli.main import app
from flows.config import ConfigError, load_config
from recon.formats.mesh_io import read_obj, read_ply, write_ply

# The mistake sits on line 3: a flow sequence that is never closed before the next key.
BAD_YAML = "train:\n  steps: 10\n  lr: [1, 2\nmodel: {}\n"


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)
    return path


def test_yaml_mistake_is_one_line_naming_file_and_line(bad_yaml, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(bad_yaml)
    msg = str(err.value)
    # PyYAML counts lines from 0 (problem_mark.line); editors and this message from 1. The
    # parser notices the unclosed '[' where the next mapping key starts.
    assert msg.startswith(f"{bad_yaml}: invalid YAML at line 4, column 6: ") and "\n" not in msg
    assert "expected ',' or ']'" in msg
    indented = tmp_path / "indent.yaml"
    indented.write_text("train:\n  steps: 10\n   lr: 3\n")
    with pytest.raises(ConfigError, match=r"indent\.yaml: invalid YAML at line 3, column 6: mapping values"):
        load_config(indented)
    with pytest.raises(ConfigError, match=r"override 'train\.steps=\[1': invalid YAML value at line 1"):
        load_config(None, ["train.steps=[1"])
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path)  # a folder


def _config_commands():
    """Every command with a --config option, with the required parameters it needs."""
    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        elif any("--config" in getattr(p, "opts", []) for p in cmd.params):
            yield path, [p for p in cmd.params if p.required]

    return list(walk(typer.main.get_command(app), []))


def test_every_config_command_prints_the_yaml_mistake_and_exits_2(bad_yaml, tmp_path):
    commands = _config_commands()
    names = {" ".join(path) for path, _ in commands}
    assert {"preprocess", "detect", "train", "synth", "demo", "reconstruct", "animate",
            "evaluate now", "services up"} <= names
    runner = CliRunner()
    for path, required in commands:
        args = list(path)
        for p in required:
            value = "coarse" if p.name == "stage" else str(tmp_path / f"{p.name}-arg")
            args += [value] if not p.opts[0].startswith("-") else [p.opts[0], value]
        res = runner.invoke(app, args + ["--config", str(bad_yaml)])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2, (path, res.output)
        assert lines == [f"error: {bad_yaml}: invalid YAML at line 4, column 6: expected ',' or ']', "
                         "but got ':' (while parsing a flow sequence)"], (path, res.output)


@pytest.mark.parametrize("command", [["detect", "photo.jpg"],
                                     ["preprocess", "--input", "in", "--output", "out"]])
def test_detect_and_preprocess_report_invalid_fields(command, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preprocess:\n  detectr: dlib-cnn\n")
    res = CliRunner().invoke(app, command + ["--config", str(cfg)])
    assert res.exit_code == 2 and "preprocess.detectr" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, command + ["--config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "config file not found" in res.output


def test_detect_exits_1_when_no_photo_could_be_read(tmp_path):
    empty, text = tmp_path / "empty.jpg", tmp_path / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("not a photo")
    res = CliRunner().invoke(app, ["detect", str(empty), str(text), str(tmp_path / "missing.jpg")])
    assert res.exit_code == 1
    assert "none of the 3 photo(s) could be read" in res.output and "empty file" in res.output


# ----------------------------------------------------------------------------- meshes
def test_obj_with_nan_or_inf_is_refused_naming_the_file(tmp_path):
    for bad in ("nan", "inf", "-inf", "1e999"):  # 1e999 overflows float to inf
        path = tmp_path / f"{bad}.obj"
        path.write_text(f"v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 {bad} 1\nf 1 2 3\nf 2 3 4\n")
        with pytest.raises(ValueError, match=rf"{path}: 1 of 4 vertices have NaN or infinite.*vertex 4"):
            read_obj(path)


def _triangle_ply(path, verts):
    return write_ply(path, np.asarray(verts, np.float32), np.array([[0, 1, 2]]))


def test_ply_with_nan_is_refused_naming_the_file(tmp_path):
    path = _triangle_ply(tmp_path / "nan.ply", [[0, 0, 0], [np.nan, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match=rf"{path}: 1 of 3 vertices have NaN"):
        read_ply(path)
    ascii_ply = tmp_path / "inf.ply"
    ascii_ply.write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                         "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                         "end_header\n0 0 0\n1 0 inf\n0 1 0\n3 0 1 2\n")
    with pytest.raises(ValueError, match=rf"{ascii_ply}: 1 of 3 vertices have NaN or infinite"):
        read_ply(ascii_ply)


def test_malformed_ply_is_a_value_error_naming_the_file(tmp_path):
    good = _triangle_ply(tmp_path / "good.ply", [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    data = good.read_bytes()
    verts, faces = read_ply(good)
    assert verts.shape == (3, 3) and faces.tolist() == [[0, 1, 2]]
    header_end = data.index(b"end_header\n") + len(b"end_header\n")
    variants = {
        "truncated": data[: header_end + 10],
        "unknown_type": data.replace(b"property float x", b"property quad x", 1),
        "more_vertices": data.replace(b"element vertex 3", b"element vertex 300000000", 1),
        "bad_count": data.replace(b"element vertex 3", b"element vertex three", 1),
        # the face list points past the 3 vertices
        "index_out_of_range": data[:-12] + struct.pack("<3i", 0, 1, 7),
    }
    for name, body in variants.items():
        path = tmp_path / f"{name}.ply"
        path.write_bytes(body)
        with pytest.raises(ValueError, match=rf"^{path}: ") as err:
            read_ply(path)
        assert "Traceback" not in str(err.value), name


def test_npz_that_inflates_far_beyond_its_size_is_refused_before_reading(tmp_path, monkeypatch):
    """A zip bomb as an .npz (a few KB declaring megabytes of zeros) is refused from the
    members' declared sizes, naming the file, before numpy reads an array; an ordinary
    archive reads back as saved. The floor is lowered so the bomb can stay small here."""
    import recon.face_model.face_assets as face_assets
    from recon.face_model.face_assets import FaceModelFormatError, read_npz

    monkeypatch.setattr(face_assets, "NPZ_FLOOR", 1 << 20)
    bomb = tmp_path / "FLAME_texture.npz"
    np.savez_compressed(bomb, mean=np.zeros((1024, 1024, 2), np.float32),
                        tex_dir=np.zeros(4, np.float32))  # 8 MiB of zeros in ~8 KB
    assert bomb.stat().st_size * face_assets.NPZ_INFLATION < 8 << 20
    read = []
    monkeypatch.setattr(np, "load", lambda *a, **k: read.append(a) or pytest.fail("read"))
    with pytest.raises(FaceModelFormatError, match=r"FLAME_texture\.npz: refusing an \.npz"):
        read_npz(bomb)
    assert read == []
    monkeypatch.undo()
    ok = tmp_path / "ok.npz"
    np.savez(ok, a=np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(read_npz(ok)["a"], np.arange(6.0).reshape(2, 3))
