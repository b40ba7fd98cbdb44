"""Names from outside and output folders: an S3 key is only ever a name (no shell reads a
shard), names that would escape a folder are refused, outputs follow the umask, and one
output folder has one writer at a time."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infra import storage
from infra.config import StorageConfig
from recon.formats.files import UnsafeName, atomic_path, atomic_write_bytes, check_name, path_inside
from shard_fixtures import random_sample, write_train_split

SHELL_KEY = "train-000000;touch${IFS}PWNED;.tar"


@pytest.fixture(scope="module")
def s3(moto_s3):
    storage.configure(StorageConfig(endpoint_url=moto_s3))
    storage._client().create_bucket(Bucket="sec")
    yield
    storage.configure(StorageConfig())


@pytest.mark.parametrize("name, why", [
    ("../victim/x", "'..' path part"),
    ("photos/../../etc/passwd", "'..' path part"),
    ("./x", "'.' path part"),
    ("/tmp/abs/y", "absolute name"),
    ("a//b", "empty path part"),
    ("a/", "empty path part"),
    ("", "empty name"),
    ("x\ny", "control character"),
    ("x\x00y", "control character"),
    (SHELL_KEY, "character(s) '$;{}'"),
    ("a|b", "character(s) '|'"),
    ("a`id`", "character(s) '`'"),
    ("dir\\..\\x", "character(s) '\\\\'"),
    ("n" * 256, "longer than 255 bytes"),
])
def test_unsafe_names_are_refused_with_the_reason(name, why):
    with pytest.raises(UnsafeName) as err:
        check_name(name)
    assert why in str(err.value)


@pytest.mark.parametrize("name", ["a", "id0000/img000", "IMG_0001 (1)", "O'Brien", "été/ça",
                                  "x..y", "...", "n" * 255])
def test_ordinary_photo_names_pass(name):
    assert check_name(name) == name


def test_path_inside_follows_links(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    assert path_inside(out, "a/b") == out / "a" / "b"
    (out / "planted").symlink_to(outside)  # a link planted in the output folder
    with pytest.raises(UnsafeName, match="leads outside"):
        path_inside(out, "planted/x")
    with pytest.raises(UnsafeName, match="'..' path part"):
        path_inside(out, "../outside")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        storage.write_bytes(tmp_path / "sub" / "b.bin", b"y")  # fsynced local write
        with atomic_path(tmp_path / "c.mp4", suffix=".mp4") as tmp:  # writers given a name
            tmp.write_bytes(b"z")
    finally:
        os.umask(old)
    for name in ("a.bin", "sub/b.bin", "c.mp4"):
        assert _mode(tmp_path / name) == expected, name
    assert _mode(tmp_path / "sub") == 0o777 & ~umask


def test_shard_key_with_a_shell_command_is_only_a_name(s3, tmp_path, monkeypatch):
    """A shard whose key holds ``;touch${IFS}PWNED;`` is read back sample for sample and
    runs nothing (the old ``pipe:`` reader ran ``touch`` in the worker's folder)."""
    from preprocessing.shards import iter_samples, read_split

    local = write_train_split(tmp_path / "local", [random_sample(f"k{i}", "a", seed=i)
                                                   for i in range(3)], per_shard=3)
    storage.write_bytes(f"s3://sec/data/shards/{SHELL_KEY}",
                        (local / "shards" / "train-000000.tar").read_bytes())
    storage.write_bytes("s3://sec/data/identities.json", (local / "identities.json").read_bytes())
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    urls, identities = read_split("s3://sec/data", "train")
    assert urls == [f"s3://sec/data/shards/{SHELL_KEY}"] and identities == {"a": ["k0", "k1", "k2"]}
    samples = list(iter_samples(urls))
    assert [s["key"] for s in samples] == ["k0", "k1", "k2"]
    assert samples[1]["landmarks"].shape == (68, 2)
    assert list(work.iterdir()) == [] and not (tmp_path / "PWNED").exists()
    # the same name on a local disk: a path, not a URL (no cut at ';', '#' or '?')
    odd = tmp_path / "odd#dir?" / SHELL_KEY
    odd.parent.mkdir()
    odd.write_bytes((local / "shards" / "train-000000.tar").read_bytes())
    assert [s["key"] for s in iter_samples([str(odd)])] == ["k0", "k1", "k2"]
    assert list(work.iterdir()) == []


def test_no_shell_or_subprocess_in_the_data_path():
    """The readers and writers of photos, shards and outputs start no process: no import of
    ``subprocess``, no ``os.system``/``popen``/``exec*``/``spawn*``, no ``pipe:`` URL."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for rel in ("infra/storage.py", "preprocessing/shards.py", "preprocessing/pipeline.py",
                "flows/reconstruct.py", "recon/formats/files.py", "recon/formats/mesh_io.py"):
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("subprocess", "pty") for n in names), rel
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "os":
                assert not node.attr.startswith(("system", "popen", "exec", "spawn")), rel
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith("pipe:"), rel


# -- one writer per output folder ----------------------------------------------------------
def test_second_writer_fails_at_once_and_the_lock_is_released(tmp_path):
    out = tmp_path / "out"
    with storage.output_lock(out):
        with pytest.raises(storage.OutputLocked) as err:
            with storage.output_lock(out):
                pass
        assert str(out) in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    with storage.output_lock(out):  # released when the first finished
        pass
    assert storage.list_files(out) == []  # the lock file is no output


def test_lock_of_a_killed_holder_is_free(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from infra import storage
            with storage.output_lock({str(out)!r}):
                print("held", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(storage.OutputLocked, match=rf"in use by another run \(pid "
                                                       rf"{holder.pid}\)"):
            with storage.output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
        holder.wait()
    with storage.output_lock(out):
        pass


def test_jobs_refuse_a_locked_output(tmp_path):
    """reconstruct --out, preprocess --output and train --out fail at once, writing nothing."""
    from typer.testing import CliRunner

    from flows.cli.main import app
    from flows.reconstruct import run_batch
    from preprocessing.config import PreprocessConfig
    from preprocessing.pipeline import run
    from reconstruct_fixtures import tiny_config

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not read")
    out = tmp_path / "out"
    with storage.output_lock(out):
        with pytest.raises(storage.OutputLocked, match=str(out)):
            run_batch([str(photos)], str(out), "no-such-model.pt", tiny_config())
        with pytest.raises(storage.OutputLocked, match=str(out)):
            run(str(photos), str(out), PreprocessConfig(), use_ray=False)
        result = CliRunner().invoke(app, ["train", "--stage", "coarse", "--data",
                                          str(photos), "--out", str(out)])
        assert result.exit_code == 1 and "in use by another run" in result.output
        assert sorted(p.name for p in out.iterdir()) == [storage.LOCK_FILE]
