"""The local model store: manifest, checksums (loading refuses a mismatch), s3:// roots,
the `wildface weights` commands on small files."""
from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from flows.cli.weights import app
from infra.model_store import (
    ChecksumMismatchError,
    ModelStore,
    ModelStoreError,
    verify_file,
)
from recon.formats.files import wildface_home


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "src" / "tiny.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\x00\x01weights" * 100)
    return path


def test_add_records_manifest_and_path_verifies(tmp_path, weights_file) -> None:
    store = ModelStore(tmp_path / "store")
    entry = store.add("tiny", weights_file, source="unit test")
    data = weights_file.read_bytes()
    assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["models"]["tiny"]["sha256"] == entry.sha256
    assert manifest["models"]["tiny"]["source"] == "unit test"
    path = store.path("tiny")
    assert path.read_bytes() == data and path.suffix == ".safetensors"
    # Re-adding replaces the entry (idempotent for the same file).
    assert store.add("tiny", weights_file, source="unit test").sha256 == entry.sha256
    assert list(store.entries()) == ["tiny"]


def test_loading_refuses_a_checksum_mismatch(tmp_path, weights_file) -> None:
    store = ModelStore(tmp_path / "store")
    store.add("tiny", weights_file, source="unit test")
    stored = store.path("tiny")
    stored.write_bytes(stored.read_bytes()[:-1] + b"X")  # same size, one byte changed
    with pytest.raises(ChecksumMismatchError, match=r"model 'tiny'.*sha256 .* does not match"):
        store.path("tiny")
    stored.write_bytes(b"short")
    with pytest.raises(ChecksumMismatchError, match="size 5 bytes differs"):
        store.path("tiny")
    [result] = store.verify()
    assert not result.ok and "differs" in result.message


def test_missing_model_names_the_fix(tmp_path) -> None:
    store = ModelStore(tmp_path / "empty")
    assert store.entries() == {} and store.verify() == []
    with pytest.raises(ModelStoreError, match="fetch-from-packages"):
        store.path("facenet-casia-webface")


def test_unreadable_manifest_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelStoreError, match="unreadable manifest"):
        ModelStore(tmp_path).entries()


def test_verify_file(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    verify_file(path, hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(ChecksumMismatchError, match="Refusing to load"):
        verify_file(path, hashlib.sha256(b"abd").hexdigest())


def test_store_root_is_wildface_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WILDFACE_HOME", str(tmp_path / "home"))
    assert wildface_home() == str(tmp_path / "home")
    assert ModelStore().root == str(tmp_path / "home")
    monkeypatch.delenv("WILDFACE_HOME")
    assert wildface_home().endswith(".cache/wildface")


def test_s3_store_downloads_and_verifies(tmp_path, weights_file, monkeypatch) -> None:
    import moto

    monkeypatch.setenv("WILDFACE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    from infra import storage

    storage.configure(storage.StorageConfig())
    with moto.mock_aws():
        storage._client().create_bucket(Bucket="models")
        store = ModelStore("s3://models/wildface")
        entry = store.add("tiny", weights_file, source="unit test")
        assert storage.exists("s3://models/wildface/manifest.json")
        local = store.path("tiny")
        assert local.is_relative_to(tmp_path / "home" / "s3-cache")
        assert local.read_bytes() == weights_file.read_bytes()
        # A corrupt remote object is refused after download.
        storage.write_bytes(f"s3://models/wildface/{entry.file}", b"tampered")
        local.unlink()
        with pytest.raises(ChecksumMismatchError):
            store.path("tiny")
    storage.configure(storage.StorageConfig())


def test_cli_list_add_verify(tmp_path, weights_file) -> None:
    runner = CliRunner()
    root = str(tmp_path / "store")
    result = runner.invoke(app, ["list", "--store", root])
    assert result.exit_code == 0 and "empty" in result.output
    result = runner.invoke(app, ["add", "vgg19", str(weights_file), "--store", root])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["list", "--store", root])
    assert "vgg19" in result.output and "tiny.safetensors" in result.output
    assert runner.invoke(app, ["verify", "--store", root]).exit_code == 0
    (tmp_path / "store" / "files" / "vgg19.safetensors").write_bytes(b"changed")
    result = runner.invoke(app, ["verify", "--store", root])
    assert result.exit_code == 1 and "vgg19: FAILED" in result.output
