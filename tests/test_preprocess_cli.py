"""`wildface detect` on a real photo, and (slow) `wildface preprocess` running the Prefect
flow in ephemeral mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from preprocess_assets import astronaut


def test_detect_json_reports_faces_in_photo_pixels(tmp_path):
    from flows.cli.main import app

    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    # The same photo stored sideways with an EXIF orientation tag: same coordinates.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.jpg"
    Image.fromarray(astronaut()).rotate(90, expand=True).save(rotated, exif=exif.tobytes(),
                                                              quality=95)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    res = CliRunner().invoke(app, ["detect", str(photo), str(rotated), str(empty), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    faces = out[0]["faces"]
    assert len(faces) >= 1
    lmk = np.array(faces[0]["landmarks"])
    assert lmk.shape == (68, 2)
    x0, y0, x1, y1 = faces[0]["box"]
    assert x0 < lmk[30, 0] < x1 and y0 < lmk[30, 1] < y1  # nose tip inside the box
    lmk_rot = np.array(out[1]["faces"][0]["landmarks"])
    assert np.abs(lmk_rot - lmk).mean() < 3.0
    assert out[2]["error"] == "empty file"


@pytest.mark.slow
def test_preprocess_command_runs_the_flow(tmp_path):
    """The real `wildface preprocess` in a subprocess (Prefect's ephemeral mode)."""
    (tmp_path / "in" / "eileen").mkdir(parents=True)
    Image.fromarray(astronaut()).save(tmp_path / "in" / "eileen" / "a.jpg")
    (tmp_path / "in" / "eileen" / "b.jpg").write_bytes(b"nope")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # A loaded 2-core machine can take longer than Prefect's default 20 s to start it.
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    res = subprocess.run(
        [str(Path(sys.executable).parent / "wildface"), "preprocess", "--input",
         str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-ray",
         "--set", "preprocess.shard_size=10"],
        env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    summary, _ = json.JSONDecoder().raw_decode(res.stdout[res.stdout.rindex('{\n "inputs"'):])
    assert summary["ok"] == 1 and summary["rejected"] == 1
    assert (tmp_path / "out" / "shards" / "train-000000.tar").exists()
