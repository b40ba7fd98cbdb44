"""The whole pipeline on a bad-input corpus + real photos: manifest, shards, reruns,
resume after a kill, and (slow) the same result on a Ray Data actor pool."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocess_assets import astronaut, bad_corpus, t1_path
from preprocessing import annotations
from preprocessing.config import PreprocessConfig
from preprocessing.manifest import read_manifest
from preprocessing.pipeline import part_files, run, work_dir
from preprocessing.shards import iter_samples, shard_urls, to_torch

CFG = PreprocessConfig(shard_size=3, ray={"batch_size": 2, "workers": 2, "num_cpus": 2})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    expected = bad_corpus(root, t1_path())
    # An annotated photo: a shifted astronaut with .pts (1-based) and .mask.png beside it.
    rgb = np.ascontiguousarray(astronaut()[20:, 10:])
    (root / "anno").mkdir()
    cv2.imwrite(str(root / "anno" / "a.png"), rgb[..., ::-1])
    from preprocessing.detect import make_detector
    from preprocessing.landmarks import Landmarker
    lmk = Landmarker()(rgb, make_detector(PreprocessConfig())(rgb)[0].box)
    (root / "anno" / "a.pts").write_bytes(annotations.write_pts(lmk))
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[100:140, 180:240] = 255
    cv2.imwrite(str(root / "anno" / "a.mask.png"), mask)
    expected["anno/a.png"] = None
    return root, expected


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    run(str(corpus[0]), str(out), CFG, use_ray=False)
    return out


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    # The output lock holds the pid of the latest run: run state, not an output.
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file() and p.name != ".wildface.lock"}


def test_every_file_accounted_for(corpus, reference):
    root, expected = corpus
    m = read_manifest(str(reference)).set_index("path")
    assert sorted(m.index) == sorted(expected)
    for rel, reason in expected.items():
        row = m.loc[rel]
        if reason is None:
            assert row.status == "ok", (rel, row.reason)
            assert row.shard.startswith("shards/") and row.split in ("train", "val")
        else:
            assert row.status == "rejected", rel
            assert any(r in row.reason for r in reason.split("|")), (rel, row.reason)
    assert m.loc["group/t1.jpg"].n_faces == 6
    assert m.loc["anno/a.png"].landmark_source == "annotation"
    # Identities from folders; each identity in one split only.
    ok = m[m.status == "ok"]
    assert set(ok.identity) == {"eileen", "group", "anno"}
    assert ok.groupby("identity").split.nunique().max() == 1


def test_shards_read_back_in_training_format(corpus, reference):
    m = read_manifest(str(reference))
    ok = m[m.status == "ok"].set_index("key")
    groups = json.loads((reference / "identities.json").read_text())
    seen = set()
    for split in ("train", "val"):
        for s in iter_samples(shard_urls(str(reference), split)):
            seen.add(s["key"])
            assert s["image"].shape == (256, 256, 3) and s["image"].dtype == np.uint8
            assert s["mask"].shape == (256, 256) and set(np.unique(s["mask"])) <= {0, 255}
            assert s["landmarks"].shape == (68, 2) and s["landmarks"].dtype == np.float32
            # crop_scale 1.8 around the landmark box: landmarks span +-1/1.8 on the long side.
            span = s["landmarks"].max(0) - s["landmarks"].min(0)
            assert abs(span.max() - 2 / 1.8) < 0.02
            meta = s["meta"]
            assert meta["split"] == split == ok.loc[s["key"], "split"]
            assert s["key"] in groups[split][meta["identity"]]
            assert np.array(meta["transform"]).shape == (2, 3)
            t = to_torch(s)
            assert t["image"].shape == (3, 256, 256) and float(t["mask"].max()) == 1.0
            if meta["source"] == "anno/a.png":
                assert meta["mask_source"] == "annotation"
                # The annotated rectangle survives the crop transform.
                A = np.array(meta["transform"])
                cx, cy = A[:, :2] @ np.array([209.5, 119.5]) + A[:, 2]
                assert s["mask"][int(cy), int(cx)] == 255 and s["mask"][2, 2] == 0
    assert seen == set(ok.index)


def test_rerun_writes_nothing(corpus, reference):
    before = _snapshot(reference)
    summary = run(str(corpus[0]), str(reference), CFG, use_ray=False)
    assert summary["processed"] == 0 and summary["shards_written"] == 0
    assert summary["files_written"] == []
    assert _snapshot(reference) == before


def test_killed_run_resumes_to_the_same_manifest(corpus, reference, tmp_path):
    out = tmp_path / "out"
    cfg = CFG.model_copy(update={"ray": CFG.ray.model_copy(update={"batch_size": 1})})
    code = ("import sys; from preprocessing.pipeline import run; "
            "from preprocessing.config import PreprocessConfig; "
            f"run({str(corpus[0])!r}, {str(out)!r}, "
            f"PreprocessConfig.model_validate_json({cfg.model_dump_json()!r}), use_ray=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    work = work_dir(str(out), cfg)
    try:
        deadline = time.monotonic() + 120
        while len(part_files(work)) < 4:
            assert proc.poll() is None, "run finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "manifest.parquet").exists()
    n_parts = len(part_files(work))
    summary = run(str(corpus[0]), str(out), cfg, use_ray=False)
    assert 0 < summary["processed"] < len(corpus[1]) - n_parts + 1
    assert (out / "manifest.parquet").read_bytes() == (reference / "manifest.parquet").read_bytes()
    for shard in (reference / "shards").iterdir():
        assert (out / "shards" / shard.name).read_bytes() == shard.read_bytes()


@pytest.mark.slow
def test_ray_actor_pool_gives_the_same_result(corpus, reference, tmp_path):
    out = tmp_path / "ray"
    summary = run(str(corpus[0]), str(out), CFG, use_ray=True)
    assert summary["processed"] == len(corpus[1])
    assert (out / "manifest.parquet").read_bytes() == (reference / "manifest.parquet").read_bytes()
    assert (out / "identities.json").read_bytes() == (reference / "identities.json").read_bytes()


def test_transient_errors_are_retried_never_rejected(corpus, tmp_path, monkeypatch):
    """Out of memory on one photo every time, a storage read that times out twice on
    another: the first is left unrecorded (not a rejection) and processed by the rerun, the
    second succeeds within the retries; a bad photo stays a rejection."""
    import shutil

    from preprocessing import sample

    src = tmp_path / "in" / "eileen"
    src.mkdir(parents=True)
    for name in ("good.jpg", "palette.png", "text.jpg"):
        shutil.copy(corpus[0] / "eileen" / name, src / name)
    oom_bytes = (src / "good.jpg").read_bytes()
    real_decode, real_storage = sample.decode_image, sample.storage
    attempts = {"decode": 0, "read": 0}

    def decode(data, **kw):
        if data == oom_bytes:
            attempts["decode"] += 1
            raise MemoryError()
        return real_decode(data, **kw)

    class FlakyStorage:
        def __getattr__(self, name):
            return getattr(real_storage, name)

        def read_bytes(self, uri):
            if uri.endswith("palette.png") and attempts["read"] < 2:
                attempts["read"] += 1
                raise TimeoutError("read timed out")
            return real_storage.read_bytes(uri)

    monkeypatch.setattr(sample, "decode_image", decode)
    monkeypatch.setattr(sample, "storage", FlakyStorage())
    cfg = CFG.model_copy(update={"transient_retries": 2, "transient_retry_delay": 0.0})
    out = tmp_path / "out"
    summary = run(str(tmp_path / "in"), str(out), cfg, use_ray=False)
    assert attempts == {"decode": 3, "read": 2}  # 1 try + 2 retries; 2 timeouts then a read
    assert summary["retry_later"] == 1 and summary["ok"] == 1 and summary["rejected"] == 1
    m = read_manifest(str(out)).set_index("path")
    assert sorted(m.index) == ["eileen/palette.png", "eileen/text.jpg"]  # good.jpg: no row yet
    assert m.loc["eileen/palette.png"].status == "ok"
    assert m.loc["eileen/text.jpg"].status == "rejected"
    assert not any("MemoryError" in r for r in m.reason)

    monkeypatch.setattr(sample, "decode_image", real_decode)
    again = run(str(tmp_path / "in"), str(out), cfg, use_ray=False)
    assert again["processed"] == 1 and again["retry_later"] == 0 and again["ok"] == 2
    m = read_manifest(str(out)).set_index("path")
    assert m.loc["eileen/good.jpg"].status == "ok"
