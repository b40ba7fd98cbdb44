"""Dataset readers on tiny trees laid out as each dataset is distributed (file names, csv/txt
headers, the AFLW SQLite schema, VoxCeleb2's folders of mp4 clips): identities namespaced by
source, the dataset's boxes and landmarks in its own order, listed-but-missing files and
names leading outside the root refused, and a mixed run through the pipeline and the CLI."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from preprocess_assets import astronaut
from preprocessing.annotations import DatasetGuide, match_face
from preprocessing.config import PreprocessConfig
from preprocessing.datasets import (AFLW_POINTS, LayoutError, frame_indices, list_inputs,
                                    parse_inputs)
from preprocessing.manifest import read_manifest
from preprocessing.pipeline import run
from preprocessing.shards import iter_samples, shard_urls

CFG = PreprocessConfig(embedding="none", shard_size=50, video_fps=2.0,
                       ray={"batch_size": 4, "workers": 1, "num_cpus": 1})
FACE = (179.0, 83.0, 267.0, 171.0)  # where dlib's HOG detector finds the astronaut's face


def photo(i: int, flip: bool = False) -> Image.Image:
    """A distinct 256 x 256 photo of the astronaut (face at FACE shifted by the crop)."""
    dx, dy = 100 + 3 * i, 20 + 2 * i
    rgb = astronaut()[dy:dy + 256, dx:dx + 256]
    return Image.fromarray(np.ascontiguousarray(rgb[:, ::-1] if flip else rgb))


def face_in(i: int) -> tuple[float, float, float, float]:
    dx, dy = 100 + 3 * i, 20 + 2 * i
    return (FACE[0] - dx, FACE[1] - dy, FACE[2] - dx, FACE[3] - dy)


def save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)


# ------------------------------------------------------------------------------- trees
def vggface2_tree(root: Path) -> Path:
    save(root / "train/n000002/0001_01.jpg", photo(0))
    save(root / "train/n000002/0002_01.jpg", photo(1))
    save(root / "train/n000003/0001_01.jpg", photo(2))
    save(root / "test/n000010/0001_01.jpg", photo(3))
    x0, y0, x1, y1 = face_in(0)
    bb = root / "bb_landmark"
    bb.mkdir()
    # As distributed: quoted header and NAME_ID, the image path without its extension.
    (bb / "loose_bb_train.csv").write_text(
        '"NAME_ID","X","Y","W","H"\n'
        f'"n000002/0001_01",{x0 - 20:.0f},{y0 - 30:.0f},{x1 - x0 + 40:.0f},{y1 - y0 + 50:.0f}\n'
        '"n000003/0001_01",40,30,150,170\n'
        '"n000004/0001_01",10,10,50,50\n'  # listed, not on disk
        '"../../etc/passwd",1,1,5,5\n')  # leads outside the root
    (bb / "loose_landmark_train.csv").write_text(
        '"NAME_ID","P1X","P1Y","P2X","P2Y","P3X","P3Y","P4X","P4Y","P5X","P5Y"\n'
        '"n000002/0001_01",100.5,101,140,102,120,125,105,145,138,146\n')
    (bb / "loose_bb_test.csv").write_text('"NAME_ID","X","Y","W","H"\n'
                                          '"n000010/0001_01",60,40,120,140\n')
    return root


def celeba_tree(root: Path, aligned: bool = False) -> Path:
    folder = "img_align_celeba" if aligned else "img_celeba"
    for i in range(3):
        save(root / folder / f"00000{i + 1}.jpg", photo(4 + i))
    save(root / folder / "000009.jpg", photo(7))  # on disk, but no identity listed
    (root / "identity_CelebA.txt").write_text(
        "000001.jpg 2880\n000002.jpg 2937\n000003.jpg 2880\n000005.jpg 12\n../x.jpg 7\n")
    x0, y0, x1, y1 = face_in(4)
    (root / "list_bbox_celeba.txt").write_text(
        "3\nimage_id x_1 y_1 width height\n"
        f"000001.jpg    {x0:.0f}  {y0:.0f} {x1 - x0:.0f} {y1 - y0:.0f}\n"
        "000002.jpg    40  35 160 180\n000003.jpg    45  30 150 170\n")
    name = "list_landmarks_align_celeba.txt" if aligned else "list_landmarks_celeba.txt"
    (root / name).write_text(
        "3\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
        "rightmouth_x rightmouth_y\n"
        "000001.jpg 69  109  106  113   77  142   73  152  108  154\n"
        "000002.jpg 69  110  107  112   81  135   70  151  108  153\n")
    return root


AFLW_SCHEMA = """
CREATE TABLE FaceImages (image_id INTEGER PRIMARY KEY, db_id TEXT, file_id TEXT, filepath TEXT,
                         bw INTEGER, width INTEGER, height INTEGER);
CREATE TABLE Faces (face_id INTEGER PRIMARY KEY, file_id TEXT, db_id TEXT);
CREATE TABLE FaceRect (face_id INTEGER, x INTEGER, y INTEGER, w INTEGER, h INTEGER,
                       annot_type_id INTEGER);
CREATE TABLE FeatureCoords (face_id INTEGER, feature_id INTEGER, x REAL, y REAL,
                            annot_type_id INTEGER);
CREATE TABLE FacePose (face_id INTEGER, roll REAL, pitch REAL, yaw REAL, annot_type_id INTEGER);
"""


def aflw_tree(root: Path) -> Path:
    """A group photo (two faces side by side, the right one labelled), a single face, a
    listed file that is missing and a path leading outside the root."""
    group = Image.new("RGB", (512, 256))
    group.paste(photo(8), (0, 0))
    group.paste(photo(9, flip=True), (256, 0))
    save(root / "data/flickr/0/image00002.jpg", group)
    save(root / "data/flickr/2/image00013.jpg", photo(10))
    db = sqlite3.connect(root / "data/aflw.sqlite")
    db.executescript(AFLW_SCHEMA)
    images = [(1, "image00002.jpg", "0/image00002.jpg"), (2, "image00013.jpg", "2/image00013.jpg"),
              (3, "image00040.jpg", "3/image00040.jpg"), (4, "evil.jpg", "../../etc/passwd")]
    db.executemany("INSERT INTO FaceImages VALUES (?, 'flickr', ?, ?, 0, 0, 0)", images)
    # The right face of the group photo: the flipped crop's face, moved right by 256.
    x0, y0, x1, y1 = face_in(9)
    right = (256 + 256 - x1, y0, x1 - x0, y1 - y0)
    faces = [(39341, "image00002.jpg", right), (39342, "image00013.jpg", (60, 50, 110, 110)),
             (39343, "image00040.jpg", (1, 1, 5, 5)), (39344, "evil.jpg", (1, 1, 5, 5))]
    for face_id, file_id, (x, y, w, h) in faces:
        db.execute("INSERT INTO Faces VALUES (?, ?, 'flickr')", (face_id, file_id))
        db.execute("INSERT INTO FaceRect VALUES (?, ?, ?, ?, ?, 1)", (face_id, x, y, w, h))
        db.execute("INSERT INTO FacePose VALUES (?, 0, 0, 0, 1)", (face_id,))
    # Points 8 (LeftEyeCenter), 11 (RightEyeCenter) and 15 (NoseCenter), stored out of order;
    # the others not annotated.
    db.executemany("INSERT INTO FeatureCoords VALUES (39342, ?, ?, ?, 1)",
                   [(15, 85.0, 95.0), (8, 75.5, 80.0), (11, 100.0, 80.5)])
    cx = 256 + 256 - (x0 + x1) / 2
    db.executemany("INSERT INTO FeatureCoords VALUES (39341, ?, ?, ?, 1)",
                   [(8, cx - 15, y0 + 35), (11, cx + 15, y0 + 35), (15, cx, y0 + 55)])
    db.commit()
    db.close()
    return root


def bupt_tree(root: Path) -> Path:
    save(root / "African/m.0abc12/m.0abc12_0001.jpg", photo(11))
    save(root / "Indian/m.0xyz99/m.0xyz99_0003.jpg", photo(12))
    save(root / "Martian/m.0q/1.jpg", photo(13))
    return root


def voxceleb2_tree(root: Path) -> Path:
    from recon.inference.video import write_video

    clip = root / "dev/mp4/id00012/21Uxsk56VDQ/00001.mp4"
    clip.parent.mkdir(parents=True)
    frames = [np.asarray(photo(14 + (i // 5))) for i in range(10)]  # 1 s at 10 fps
    write_video(clip, frames, fps=10)
    (root / "dev/mp4/stray.mp4").write_bytes(clip.read_bytes())
    return root


def by_path(listing) -> dict:
    """{path: entry} of a listing table, its columns as attributes (box, points as tuples)."""
    out = {}
    for row in listing.to_pylist():
        box, pts = row["box"], row["points"]
        row.update(box=None if box is None else tuple(box),
                   points=None if pts is None else tuple(map(tuple, pts)))
        out[row["path"]] = SimpleNamespace(**row)
    return out


# ----------------------------------------------------------------------------- listing
def test_vggface2_listing(tmp_path):
    root = vggface2_tree(tmp_path / "vgg")
    got = by_path(list_inputs([f"vggface2={root}"], CFG))
    ok = {p: f for p, f in got.items() if not f.reason}
    assert sorted(ok) == ["vggface2/test/n000010/0001_01.jpg",
                          "vggface2/train/n000002/0001_01.jpg",
                          "vggface2/train/n000002/0002_01.jpg",
                          "vggface2/train/n000003/0001_01.jpg"]
    a = ok["vggface2/train/n000002/0001_01.jpg"]
    assert a.source == "vggface2" and a.label == "n000002"
    assert face_in(0) == (79, 63, 167, 151)
    assert a.box == (59, 33, 59 + 128, 33 + 138)  # X, Y, W, H -> x0, y0, x1, y1
    # P1..P5 in the file's order: left eye, right eye, nose, left and right mouth corners.
    assert a.points == ((100.5, 101), (140, 102), (120, 125), (105, 145), (138, 146))
    assert ok["vggface2/train/n000002/0002_01.jpg"].box is None  # not in the csv: unguided
    assert ok["vggface2/test/n000010/0001_01.jpg"].box == (60, 40, 180, 180)
    assert got["vggface2/train/n000004/0001_01.jpg"].reason == "listed in bb_landmark but missing"
    evil = [f for f in got.values() if "passwd" in f.path]
    assert len(evil) == 1 and evil[0].reason == "unsafe name in bb_landmark" and evil[0].uri == ""
    assert a.rid != a.sha256  # the box and points shape the record: part of its id


def test_celeba_listing_in_the_wild_and_aligned(tmp_path):
    got = by_path(list_inputs(f"{celeba_tree(tmp_path / 'c')}", CFG, fmt="celeba"))
    one = got["celeba/img_celeba/000001.jpg"]
    assert (one.label, one.reason) == ("2880", "")
    assert one.box == face_in(4) == (67, 55, 155, 143)  # from x_1 y_1 width height
    assert one.points == ((69, 109), (106, 113), (77, 142), (73, 152), (108, 154))
    assert got["celeba/img_celeba/000003.jpg"].points is None
    assert got["celeba/img_celeba/000005.jpg"].reason == "listed in identity_CelebA.txt but missing"
    assert got["celeba/img_celeba/000009.jpg"].reason == "no identity in identity_CelebA.txt"
    assert got["celeba/img_celeba/../x.jpg"].reason == "unsafe name in identity_CelebA.txt"

    aligned = by_path(list_inputs(str(celeba_tree(tmp_path / "a", aligned=True)), CFG,
                                  fmt="celeba"))
    one = aligned["celeba/img_align_celeba/000001.jpg"]
    # list_bbox_celeba.txt is in the in-the-wild photos' pixels: never applied to aligned ones.
    assert one.box is None and one.points[0] == (69, 109)


def test_aflw_listing_reads_the_sqlite_read_only(tmp_path):
    root = aflw_tree(tmp_path / "aflw")
    db = root / "data/aflw.sqlite"
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    got = by_path(list_inputs(f"aflw={root}", CFG))
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    assert not any(p.name.startswith("aflw.sqlite-") for p in db.parent.iterdir())
    one = got["aflw/data/flickr/2/image00013.jpg#face=39342"]
    assert one.label == "39342" and one.box == (60, 50, 170, 160)
    pts = np.array(one.points)
    assert pts.shape == (len(AFLW_POINTS), 2) == (21, 2)
    # feature_id k is row k - 1, whatever order the rows were stored in.
    assert AFLW_POINTS[7] == "LeftEyeCenter" and tuple(pts[7]) == (75.5, 80.0)
    assert tuple(pts[10]) == (100.0, 80.5) and tuple(pts[14]) == (85.0, 95.0)
    assert np.isnan(np.delete(pts, [7, 10, 14], axis=0)).all()
    assert got["aflw/data/flickr/3/image00040.jpg#face=39343"].reason == \
        "listed in aflw.sqlite but missing"
    evil = [f for f in got.values() if "passwd" in f.path]
    assert evil[0].reason == "unsafe name in aflw.sqlite" and evil[0].uri == ""


def test_bupt_and_voxceleb2_listing(tmp_path):
    got = by_path(list_inputs([f"bupt={bupt_tree(tmp_path / 'b')}",
                               f"voxceleb2={voxceleb2_tree(tmp_path / 'v')}"], CFG))
    a = got["bupt/African/m.0abc12/m.0abc12_0001.jpg"]
    assert (a.label, a.race) == ("m.0abc12", "African")
    assert "not in a <race>/<identity>/ folder" in got["bupt/Martian/m.0q/1.jpg"].reason
    # 1 s at 10 fps sampled twice a second: frames 0 and 5, one speaker.
    frames = {p: f for p, f in got.items() if p.startswith("voxceleb2/dev/mp4/id00012")}
    assert sorted(frames) == ["voxceleb2/dev/mp4/id00012/21Uxsk56VDQ/00001.mp4#frame=000000",
                              "voxceleb2/dev/mp4/id00012/21Uxsk56VDQ/00001.mp4#frame=000005"]
    assert {f.label for f in frames.values()} == {"id00012"}
    assert len({f.sha256 for f in frames.values()}) == 1  # one clip, read once
    assert len({f.rid for f in frames.values()}) == 2
    assert "id<nnnnn>" in got["voxceleb2/dev/mp4/stray.mp4"].reason


def test_frame_sampling_and_input_specs(tmp_path):
    assert frame_indices(25.0, 4.0, 1.0, 10) == [0, 25, 50, 75]
    assert frame_indices(25.0, 4.0, 1.0, 2) == [0, 25]
    assert frame_indices(10.0, 1.0, 30.0, 100) == list(range(10))  # never past the last frame
    assert parse_inputs("/data/photos") == [("", "folders", "/data/photos")]
    assert parse_inputs(["vggface2=/v", "/p"]) == [("vggface2", "vggface2", "/v"),
                                                    ("folders", "folders", "/p")]
    with pytest.raises(LayoutError, match="unknown format 'vgg'"):
        parse_inputs(["vgg=/v"])
    with pytest.raises(LayoutError, match="given twice"):
        parse_inputs(["celeba=/a", "celeba=/b"])
    with pytest.raises(LayoutError, match="no img_celeba"):
        list_inputs(f"celeba={tmp_path}", CFG)


def test_match_face_picks_the_labelled_face():
    faces = [(0, 0, 100, 100), (200, 0, 300, 100), (190, 0, 320, 110)]
    loose = DatasetGuide(box=(180, -20, 330, 130), points=None)
    assert match_face(faces, loose) == 2  # both lie in the loose box: the larger IoU
    tight = DatasetGuide(box=(205, 5, 295, 95), points=None)
    assert match_face(faces, tight) == 1
    eyes = DatasetGuide(box=None, points=np.array([[30, 40], [70, 40], [np.nan, np.nan]]))
    assert match_face(faces, eyes) == 0
    assert match_face(faces, DatasetGuide(box=(500, 500, 600, 600), points=None)) is None


# ---------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    specs = [f"vggface2={vggface2_tree(tmp / 'vgg')}", f"celeba={celeba_tree(tmp / 'celeba')}",
             f"aflw={aflw_tree(tmp / 'aflw')}", f"voxceleb2={voxceleb2_tree(tmp / 'vox')}"]
    out = tmp / "out"
    summary = run(specs, str(out), CFG, use_ray=False)
    return out, summary


def test_mixed_run_manifest_records_the_sources(mixed):
    out, summary = mixed
    m = read_manifest(str(out)).set_index("path")
    ok = m[m.status == "ok"]
    a = m.loc["vggface2/train/n000002/0001_01.jpg"]
    assert (a.status, a.source, a.source_identity, a.identity) == \
        ("ok", "vggface2", "n000002", "vggface2/n000002")
    assert "the dataset's face" in a.landmark_source
    assert np.stack(a.dataset_landmarks).tolist()[0] == [100.5, 101.0]
    assert m.loc["celeba/img_celeba/000001.jpg"].identity == "celeba/2880"
    assert m.loc["vggface2/train/n000004/0001_01.jpg"].reason == "listed in bb_landmark but missing"
    assert (m.loc[[p for p in m.index if "passwd" in p]].status == "rejected").all()
    # AFLW: each face its own identity; VoxCeleb2: a clip's frames share the speaker.
    assert m.loc["aflw/data/flickr/2/image00013.jpg#face=39342"].identity == "aflw/39342"
    frames = ok[ok.source == "voxceleb2"]
    assert set(frames.frame) == {0, 5} and set(frames.identity) == {"voxceleb2/id00012"}
    # One identity-disjoint split over every source.
    assert ok.groupby("identity").split.nunique().max() == 1
    assert set(ok.source) == {"vggface2", "celeba", "aflw", "voxceleb2"}
    assert summary["ok"] == len(ok)


def test_group_photo_keeps_the_labelled_face(mixed):
    out, _ = mixed
    m = read_manifest(str(out)).set_index("path")
    row = m.loc["aflw/data/flickr/0/image00002.jpg#face=39341"]
    assert row.status == "ok" and row.n_faces == 2, row.reason
    samples = {s["key"]: s for split in ("train", "val")
               for s in iter_samples(shard_urls(str(out), split))}
    lmk = np.array(samples[row.key]["meta"]["landmarks_photo"])
    assert lmk[:, 0].min() > 256  # the right face, the one AFLW labels, not the first found
    assert samples[row.key]["meta"]["dataset"] == "aflw"


def test_cli_refuses_a_wrong_input_in_one_line(tmp_path):
    from flows.cli.main import app

    res = CliRunner().invoke(app, ["preprocess", "--input", f"vgg={tmp_path}", "--output",
                                   str(tmp_path / "out"), "--no-ray"])
    assert res.exit_code == 2 and "unknown format 'vgg'" in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_preprocess_command_mixes_datasets(tmp_path):
    """The real `wildface preprocess` (Prefect's ephemeral mode) on VGGFace2 + CelebA."""
    vgg, celeba = vggface2_tree(tmp_path / "vgg"), celeba_tree(tmp_path / "celeba")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    res = subprocess.run(
        [str(Path(sys.executable).parent / "wildface"), "preprocess", "--input",
         f"vggface2={vgg}", "--input", f"celeba={celeba}", "--output", str(tmp_path / "out"),
         "--no-ray", "--set", "preprocess.embedding=none"],
        env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    m = read_manifest(str(tmp_path / "out"))
    assert {"source", "source_identity", "dataset_box", "dataset_landmarks"} <= set(m.columns)
    ok = m[m.status == "ok"]
    assert set(ok.source) == {"vggface2", "celeba"}
    assert all(i.startswith(("vggface2/n", "celeba/")) for i in ok.identity)
    assert ok.groupby("identity").split.nunique().max() == 1
    assert json.loads((tmp_path / "out" / "identities.json").read_text())


# ------------------------------------------------------------------ listing at scale
def test_vggface2_listing_columns_refuse_what_read_vggface2_refuses():
    from preprocessing.datasets import vggface2_listing

    table = vggface2_listing(
        ["train/n1/a.jpg", "test/n2/x/b.JPG", "train/n1/c.txt", "test/top.jpg",
         "bb_landmark/loose_bb_train.csv"],
        {"train": ["n1/a", "n9/z", "../../etc/passwd"]}, CFG)
    assert table.to_pylist() == [
        {"rel": "test/n2/x/b.JPG", "label": None, "reason": "not in a test/<identity>/ folder"},
        {"rel": "test/top.jpg", "label": None, "reason": "not in a test/<identity>/ folder"},
        {"rel": "train/../../etc/passwd.jpg", "label": None,
         "reason": "unsafe name in bb_landmark"},
        {"rel": "train/n1/a.jpg", "label": "n1", "reason": ""},
        {"rel": "train/n9/z.jpg", "label": None, "reason": "listed in bb_landmark but missing"}]


def test_listing_benchmark_builds_an_identity_disjoint_manifest():
    import pyarrow as pa

    from benchmarks.listing import VGGFACE2_IDENTITIES, run
    from preprocessing.manifest import SCHEMA
    from preprocessing.split import split_identities

    out = run(10_000, val_fraction=0.2, seed=3)
    m = out["table"].to_pandas()
    assert out["table"].schema == SCHEMA and len(m) == 10_000
    assert list(m.path) == sorted(m.path) and m.path.is_unique
    assert (m.status == "ok").all() and set(m.source) == {"vggface2"}
    # VGGFace2's layout: the identity is the folder, namespaced by the source.
    row = m.iloc[0]
    assert row.path.split("/")[2] == row.source_identity
    assert row.identity == f"vggface2/{row.source_identity}"
    assert m.identity.nunique() == VGGFACE2_IDENTITIES
    assert m.groupby("identity").split.nunique().max() == 1  # one split per person
    of = split_identities(list(m.identity), 0.2, 3)  # the per-name split, row by row
    assert (m.split == m.identity.map(of)).all()
    assert (m.groupby("identity").split.first() == "val").sum() == round(0.2 * VGGFACE2_IDENTITIES)
    assert isinstance(out["peak_rss_mb"]["parquet"], int) and out["manifest_bytes"] > 0
    assert pa.array(m.frame).null_count == 10_000  # a column not given: a rejected row's value
