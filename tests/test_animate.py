"""Animation: the source's identity and detail code stay bit-identical across frames, the
displacement map follows the driver's expression, the video decodes back frame for frame."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def recon(checkpoint):
    from recon.inference.reconstruct import load_model

    # Random networks: the detail decoder's output still depends on (jaw, exp, detail),
    # which is what these tests check.
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def source(recon):
    g = torch.Generator().manual_seed(0)
    crop = (torch.rand(1, 64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    return recon.encode(crop)


def _drive(n_exp: int, T: int = 4):
    from recon.inference.animate import Drive

    g = torch.Generator().manual_seed(1)
    exp = torch.randn(T, n_exp, generator=g)
    exp[1] = exp[0]  # frames 0 and 1 share the expression
    jaw = torch.zeros(T, 3)
    jaw[:, 0] = torch.linspace(0, 0.3, T)
    jaw[1] = jaw[0]
    return Drive(exp=exp, jaw=jaw)


def test_identity_albedo_light_and_detail_are_bit_identical(recon, source):
    from recon.inference.animate import animate_codes

    drive = _drive(recon.model.flame.n_exp)
    codes = animate_codes(source, drive)
    for name in ("shape", "tex", "light", "cam", "detail"):
        frames = getattr(codes, name)
        ref = getattr(source, name)[0]
        assert all(torch.equal(frames[t], ref) for t in range(len(drive))), name
    assert all(torch.equal(codes.pose[t, :3], source.pose[0, :3]) for t in range(len(drive)))
    assert torch.equal(codes.exp, drive.exp) and torch.equal(codes.pose[:, 3:], drive.jaw)


def test_displacement_follows_the_expression(recon, source):
    from recon.inference.animate import animate_codes, render_frames

    codes = animate_codes(source, _drive(recon.model.flame.n_exp))
    (_, rec), = list(render_frames(recon.model, codes, batch_size=8))
    disp = rec.uv_displacement
    assert torch.equal(disp[0], disp[1])  # same expression, same detail: same wrinkles
    assert not torch.allclose(disp[0], disp[2]) and not torch.allclose(disp[2], disp[3])
    # the shape render with detail changes with it
    assert not torch.equal(rec.shape_detail_images[0], rec.shape_detail_images[3])


def test_animation_files_and_playable_video(recon, source, tmp_path):
    from recon.inference.animate import animate_codes, write_animation
    from recon.inference.video import count_frames

    drive = _drive(recon.model.flame.n_exp, T=5)
    result = write_animation(recon, animate_codes(source, drive), tmp_path, fps=10,
                             obj_sequence=True)
    assert result["frames"] == 5
    assert count_frames(tmp_path / "animation.mp4") == 5
    assert count_frames(tmp_path / "animation.gif") >= 2
    assert len(list((tmp_path / "frames").glob("shape_*.png"))) == 5
    assert len(list((tmp_path / "obj").glob("frame_*.obj"))) == 5
    saved = json.loads((tmp_path / "codes.json").read_text())
    assert saved["fixed"]["detail"] == source.detail[0].tolist()
    assert len(set(np.round(saved["mean_abs_displacement"], 12))) > 1


def test_named_controls_and_tables(recon, tmp_path):
    import pandas as pd

    from recon.inference.animate import controls_to_codes, parse_controls, ramp, read_table

    names, n_exp = recon.expression_names, recon.model.flame.n_exp
    exp, jaw = controls_to_codes(parse_controls("smile=1.5, jaw_open=0.3,exp_9=-1"), names, n_exp)
    assert exp[names.index("smile")] == 1.5 and exp[9] == -1 and jaw.tolist() == pytest.approx([0.3, 0, 0])
    with pytest.raises(ValueError, match="unknown expression control 'grin'.*smile"):
        controls_to_codes({"grin": 1.0}, names, n_exp)
    with pytest.raises(ValueError, match="name=number"):
        parse_controls("smile")
    drive = ramp(exp, jaw, 9)
    assert torch.allclose(drive.exp[4], exp) and torch.equal(drive.exp[0], torch.zeros(n_exp))
    # the per-frame table `wildface reconstruct` writes for a video drives an animation
    pd.DataFrame({"frame": [0, 1], "exp": [list(range(n_exp)), [0.5] * n_exp],
                  "pose": [[0, 0, 0, 0.1, 0, 0], [0, 0, 0, 0.2, 0, 0]]}).to_parquet(tmp_path / "t.parquet")
    table = read_table(tmp_path / "t.parquet", n_exp)
    assert table.exp[0].tolist() == list(range(n_exp)) and table.jaw[:, 0].tolist() == pytest.approx([0.1, 0.2])
    pd.DataFrame({"exp_0": [1.0], "jaw_0": [0.2], "jaw_1": [0.0], "jaw_2": [0.0]}).to_csv(
        tmp_path / "t.csv", index=False)
    assert read_table(tmp_path / "t.csv", n_exp).exp[0, 0] == 1.0


def test_animate_command(synth, checkpoint, tmp_path):
    """`wildface animate SOURCE --expression ...` and `--driver TABLE` end to end."""
    from typer.testing import CliRunner

    from flows.cli.main import app
    from recon.inference.video import count_frames

    src = tmp_path / "face.jpg"
    shutil.copy(synth / "images" / "id0000" / "img000.jpg", src)
    shutil.copy(synth / "images" / "id0000" / "img000.pts", src.with_suffix(".pts"))
    runner = CliRunner()
    res = runner.invoke(app, ["animate", str(src), "--model", str(checkpoint), "--out",
                              str(tmp_path / "a"), "--expression", "smile=1.5,jaw_open=0.3",
                              "--frames", "6", "--no-gif"])
    assert res.exit_code == 0, res.output
    assert count_frames(tmp_path / "a" / "animation.mp4") == 6
    import pandas as pd

    pd.DataFrame({"exp": [[0.0] * 10, [1.0] * 10, [2.0] * 10],
                  "jaw": [[0, 0, 0], [0.1, 0, 0], [0.2, 0, 0]]}).to_parquet(tmp_path / "d.parquet")
    res = runner.invoke(app, ["animate", str(src), "--model", str(checkpoint), "--out",
                              str(tmp_path / "b"), "--driver", str(tmp_path / "d.parquet"),
                              "--obj-sequence"])
    assert res.exit_code == 0, res.output
    assert count_frames(tmp_path / "b" / "animation.mp4") == 3
    res = runner.invoke(app, ["animate", str(src), "--model", str(checkpoint), "--out",
                              str(tmp_path / "c"), "--expression", "grin=1"])
    assert res.exit_code == 1 and "unknown expression control" in res.output
    # reconstruct.refine reaches the loader: DECA's head has no keypoints to refine on
    res = runner.invoke(app, ["animate", str(src), "--model", str(checkpoint), "--out",
                              str(tmp_path / "d"), "--expression", "smile=1",
                              "--set", "reconstruct.refine.steps=5"])
    assert res.exit_code == 1 and "needs head 'keypoints'" in res.output
