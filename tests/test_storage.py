"""infra.storage on local paths and on a moto S3 server on 127.0.0.1; the preprocessing
pipeline reading and writing s3://."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infra import storage
from infra.config import StorageConfig


@pytest.fixture(scope="module")
def s3(moto_s3):
    cfg = StorageConfig(endpoint_url=moto_s3, multipart_threshold_mb=5)
    storage.configure(cfg)
    storage._client().create_bucket(Bucket="wfb")
    yield cfg
    storage.configure(StorageConfig())


def test_local_atomic_write_list_exists(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")
    assert storage.read_bytes(target) == b"two"
    (tmp_path / "a" / ".c.bin.123.tmp").write_bytes(b"half")  # an interrupted write
    assert storage.list_files(tmp_path) == [str(target)]
    assert storage.exists(target) and not storage.exists(tmp_path / "nope")
    assert storage.relative(str(target), str(tmp_path)) == "a/b.bin"
    storage.delete(target)
    assert not storage.exists(target)


def test_absolute_paths_and_uris(tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)
    assert storage.absolute("data/x") == str(tmp_path.resolve() / "data" / "x")
    assert storage.absolute("~/w.pt") == str(Path(os.path.expanduser("~/w.pt")).resolve())
    assert storage.absolute("s3://bucket/a") == "s3://bucket/a"


def test_s3_roundtrip(s3):
    storage.write_bytes("s3://wfb/x/one.bin", b"1")
    big = np.random.default_rng(0).bytes(6 * 2**20)  # above the 5 MiB multipart threshold
    storage.write_bytes("s3://wfb/x/sub/big.bin", big)
    assert storage.read_bytes("s3://wfb/x/sub/big.bin") == big
    assert storage.list_files("s3://wfb/x") == ["s3://wfb/x/one.bin", "s3://wfb/x/sub/big.bin"]
    assert storage.exists("s3://wfb/x/one.bin") and not storage.exists("s3://wfb/x/two.bin")
    assert b"".join(storage.stream("s3://wfb/x/sub/big.bin")) == big
    assert storage.relative("s3://wfb/x/sub/big.bin", "s3://wfb/x") == "sub/big.bin"
    storage.delete("s3://wfb/x/one.bin")
    assert not storage.exists("s3://wfb/x/one.bin")


def test_put_tree_copies_a_folder_under_the_same_names(s3, tmp_path):
    tree = tmp_path / "tree"
    (tree / "alice" / "deep").mkdir(parents=True)
    (tree / "alice" / "x.jpg").write_bytes(b"x")
    (tree / "alice" / "deep" / "y.png").write_bytes(b"y")
    (tree / "z.txt").write_bytes(b"z")
    for dest in ("s3://wfb/tree", str(tmp_path / "copy")):
        assert storage.put_tree(tree, dest) == 3
        assert sorted(storage.relative(u, dest) for u in storage.list_files(dest)) == \
            ["alice/deep/y.png", "alice/x.jpg", "z.txt"]
        assert storage.read_bytes(storage.join(dest, "alice/deep/y.png")) == b"y"


def test_pipeline_s3_in_and_out(s3, tmp_path):
    """Photos from s3://, shards to s3://, read back by the shard reader (boto3 in this
    process)."""
    import io

    from PIL import Image

    from preprocess_assets import astronaut
    from preprocessing.config import PreprocessConfig
    from preprocessing.manifest import read_manifest
    from preprocessing.pipeline import run
    from preprocessing.shards import iter_samples, shard_urls

    for name, img in (("p1/a.jpg", astronaut()), ("p2/b.jpg", astronaut()[:, ::-1]),
                      ("p2/c.jpg", np.zeros((8, 8, 3), np.uint8))):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG")
        storage.write_bytes(f"s3://wfb/in/{name}", buf.getvalue())
    summary = run("s3://wfb/in", "s3://wfb/out", PreprocessConfig(), s3, use_ray=False)
    assert summary["ok"] == 2 and summary["rejected"] == 1
    m = read_manifest("s3://wfb/out")
    assert sorted(m.path) == ["p1/a.jpg", "p2/b.jpg", "p2/c.jpg"]
    urls = shard_urls("s3://wfb/out", "train") + shard_urls("s3://wfb/out", "val")
    assert urls and all(u.startswith("s3://wfb/out/shards/") for u in urls)
    samples = list(iter_samples(urls))
    assert sorted(s["key"] for s in samples) == sorted(m[m.status == "ok"].key)
    again = run("s3://wfb/in", "s3://wfb/out", PreprocessConfig(), s3, use_ray=False)
    assert again["processed"] == 0 and again["files_written"] == []
