"""Registry trust: the artifact store is the untrusted side, the tracking database the record.

Each attack is performed on a real sqlite MLflow store: files of a registered model are
replaced in the artifact store after registration (a checkpoint with other weights, a code
file that writes a marker when executed), and every way wildface loads the model refuses it
with the file and both hashes named, executing nothing. A checkpoint holding NaN is never
registered nor promoted; every alias move records who, when and the previous holder.
"""
from __future__ import annotations

import getpass
import logging
import shutil
import socket
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from typer.testing import CliRunner

from flows import registry, tracking
from flows.registry import ModelIntegrityError, load_reconstructor, resolve_model
from reconstruct_fixtures import tiny_config, untrained_checkpoint
from recon.evaluation.config import PromotionConfig
from recon.training.checkpoint import NonFiniteState
from recon.formats.weights_file import sha256_file

MODEL = "wildface-trust"
# A small backbone: the store's copies of the model are hashed and downloaded several times.
SMALL = {"model.backbone": "mobilenet_v3_small", "model.hidden": 16,
         "tracking.registered_model": MODEL}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with version 1 registered (alias ``challenger``) from a logged model."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_config(**SMALL, **{"tracking.uri": uri})
    ckpt = untrained_checkpoint(root / "detail-000000002.pt", cfg)
    coarse = untrained_checkpoint(root / "coarse-000000001.pt", cfg, seed=2)
    exp_id = tracking.setup(uri, cfg.tracking.experiment)
    client = MlflowClient(uri, uri)
    run_id = client.create_run(exp_id, run_name="detail").info.run_id
    model_uri = registry.log_reconstructor(uri, cfg, run_id=run_id, detail_checkpoint=str(ckpt),
                                           coarse_checkpoint=str(coarse))
    version = registry.register_model(uri, cfg, model_uri, run_id=run_id, data="synthetic")
    logged = client.get_logged_model(model_uri.rsplit("/", 1)[-1])
    folder = Path(urlparse(logged.artifact_location).path)  # the artifact store's copy
    return {"root": root, "uri": uri, "cfg": cfg, "client": client, "run_id": run_id,
            "model_uri": model_uri, "version": version, "folder": folder, "exp_id": exp_id}


@contextmanager
def replaced(path: Path, data: bytes):
    """The attack: ``path`` in the artifact store overwritten with ``data``, then restored."""
    original = path.read_bytes()
    path.write_bytes(data)
    try:
        yield
    finally:
        path.write_bytes(original)


def _other_weights(store, tmp_path) -> bytes:
    return untrained_checkpoint(tmp_path / "detail-000000002.pt", store["cfg"], seed=1
                                ).read_bytes()


def _evil_code(marker: Path) -> bytes:
    return (f"from pathlib import Path\nPath({str(marker)!r}).write_text('executed')\n"
            "raise RuntimeError('the replaced file ran')\n").encode()


def test_model_uris_are_read_into_their_parts():
    """The forms of MLflow's docs (models:/<name>/<version>, models:/<name>@<alias>,
    models:/<model id>, runs:/<run id>/<path>); anything else is refused by name."""
    from flows.registry import ModelRef, parse_model_uri

    assert parse_model_uri("models:/wildface-deca@champion") == ModelRef(
        "models:/wildface-deca@champion", name="wildface-deca", alias="champion")
    assert parse_model_uri("models:/wildface-deca/12") == ModelRef(
        "models:/wildface-deca/12", name="wildface-deca", version="12")
    assert parse_model_uri("models:/m-0a1b") == ModelRef("models:/m-0a1b", model_id="m-0a1b")
    assert parse_model_uri("runs:/abc123") == ModelRef("runs:/abc123", run_id="abc123",
                                                       path="model")
    assert parse_model_uri("runs:/abc123/detail_model").path == "detail_model"
    for bad in ("models:/wildface-deca", "models:/wildface-deca/latest", "models:/@champion",
                "runs:/abc123/../x", "runs:/", "/tmp/detail-000000001.pt"):
        with pytest.raises(ValueError, match="expected|not an MLflow"):
            parse_model_uri(bad)


def test_files_and_record_match_after_registration(store):
    client, v = store["client"], store["version"]
    tags = client.get_model_version(MODEL, v["version"]).tags
    record = {k: val for k, val in tags.items() if k.startswith("sha256.")}
    # every file the loader reads, the MLmodel and the code file, hashed independently here
    folder = store["folder"]
    assert record["sha256.checkpoint"] == sha256_file(folder / "artifacts/detail-000000002.pt")
    assert record["sha256.config"] == sha256_file(folder / "artifacts/config.json")
    assert record["sha256.face_model"] == sha256_file(folder / "artifacts/face_model.npz")
    assert record["sha256.MLmodel"] == sha256_file(folder / "MLmodel")
    assert record["sha256.python_model"] == sha256_file(
        Path(registry.RECONSTRUCTOR_FILE))
    for ref in (v["uri"], f"models:/{MODEL}@challenger", store["model_uri"],
                f"runs:/{store['run_id']}"):
        files = resolve_model(ref, tracking_uri=store["uri"])
        assert files.checksums == record and files.checkpoint.name == "detail-000000002.pt"


def test_tampered_checkpoint_is_refused_with_both_hashes(store, tmp_path):
    v, uri = store["version"], store["uri"]
    target = store["folder"] / "artifacts" / "detail-000000002.pt"
    recorded = store["client"].get_model_version(MODEL, v["version"]).tags["sha256.checkpoint"]
    evil = _other_weights(store, tmp_path)
    with replaced(target, evil):
        actual = sha256_file(target)
        assert actual != recorded
        for ref in (v["uri"], f"models:/{MODEL}@challenger", store["model_uri"]):
            with pytest.raises(ModelIntegrityError) as err:
                load_reconstructor(ref, directory=tmp_path / "dl", tracking_uri=uri)
            message = str(err.value)
            assert "checkpoint" in message and "detail-000000002.pt" in message
            assert recorded in message and actual in message
        # the pipeline's evaluation loads it the same way
        from flows.pipeline import heldout_shape_error

        with pytest.raises(ModelIntegrityError, match=recorded):
            heldout_shape_error(v["uri"], str(tmp_path / "unused"), store["cfg"],
                                tracking_uri=uri)
    assert sha256_file(target) == recorded  # restored: the next tests see the true model


def test_a_detail_stage_starts_only_from_the_recorded_coarse_checkpoint(store, tmp_path):
    v, uri = store["version"], store["uri"]
    target = store["folder"] / "artifacts" / "coarse-000000001.pt"
    got = registry.download_coarse_checkpoint(v["uri"], uri, tmp_path / "ok")
    assert got.name == target.name and sha256_file(got) == sha256_file(target)
    with replaced(target, _other_weights(store, tmp_path)):
        with pytest.raises(ModelIntegrityError, match="coarse_checkpoint"):
            registry.download_coarse_checkpoint(v["uri"], uri, tmp_path / "bad")


def test_the_pipelines_heldout_check_runs_on_the_checked_model(store, tmp_path):
    from flows.pipeline import heldout_shape_error
    from reconstruct_fixtures import make_synth

    held = make_synth(tmp_path / "held", identities=2, images=1, size=96)
    metrics = heldout_shape_error(store["version"]["uri"], str(held), store["cfg"],
                                  tmp_path / "meshes", tracking_uri=store["uri"])
    assert metrics["heldout_images"] == 2
    assert 0 < metrics["heldout_shape_error_median_mm"] < 1e3
    assert len(list((tmp_path / "meshes").glob("*_neutral.obj"))) == 2


def test_tampered_code_file_is_refused_and_never_executed(store, tmp_path):
    from flows.cli.main import app

    v, uri = store["version"], store["uri"]
    marker = tmp_path / "executed.txt"
    with replaced(store["folder"] / "reconstructor.py", _evil_code(marker)):
        with pytest.raises(ModelIntegrityError, match=r"python_model.*sha256"):
            resolve_model(v["uri"], tmp_path / "dl", uri)
        (tmp_path / "in").mkdir()
        result = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "in"), "--model",
                                          f"models:/{MODEL}@challenger", "--out",
                                          str(tmp_path / "out"), "--tracking-uri", uri])
        assert result.exit_code != 0
        assert "python_model" in result.output and "does not match the recorded" in result.output
        assert not marker.exists()
        # The attack is real: loaded the MLflow way, the replaced file runs.
        import mlflow

        mlflow.set_tracking_uri(uri)
        (tmp_path / "pyfunc").mkdir()
        with pytest.raises(mlflow.exceptions.MlflowException, match="the replaced file ran"):
            mlflow.pyfunc.load_model(v["uri"], dst_path=str(tmp_path / "pyfunc"))
        assert marker.read_text() == "executed"


def test_a_model_without_a_record_is_refused(store, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    bare = mlflow.register_model(store["model_uri"], f"{MODEL}-bare")  # no wildface tags
    with pytest.raises(ModelIntegrityError, match="no recorded sha256 of MLmodel, checkpoint"):
        resolve_model(f"models:/{MODEL}-bare/{bare.version}", tmp_path, store["uri"])


def test_an_alias_moved_outside_wildface_is_reported(store, tmp_path, caplog):
    store["client"].set_registered_model_alias(MODEL, "by-hand", store["version"]["version"])
    with caplog.at_level(logging.WARNING, logger="flows.registry"):
        resolve_model(f"models:/{MODEL}@by-hand", tmp_path, store["uri"])
    assert "set outside wildface" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flows.registry"):
        resolve_model(f"models:/{MODEL}@challenger", tmp_path / "2", store["uri"])
    assert "set outside wildface" not in caplog.text


def _nan_checkpoint(store, path: Path) -> Path:
    """A checkpoint of a diverged run, written as a foreign tool would (the trainer's own
    ``save_checkpoint`` refuses to write it)."""
    ckpt = torch.load(untrained_checkpoint(path, store["cfg"]), weights_only=True)
    name = next(k for k, t in ckpt["model"].items()
                if isinstance(t, torch.Tensor) and t.is_floating_point())
    ckpt["model"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, path)
    return path


def test_a_nan_checkpoint_is_never_registered(store, tmp_path):
    client, uri, cfg = store["client"], store["uri"], store["cfg"]
    bad = _nan_checkpoint(store, tmp_path / "detail-000000002.pt")
    run_id = client.create_run(store["exp_id"], run_name="diverged").info.run_id
    model_uri = registry.log_reconstructor(uri, cfg, run_id=run_id, detail_checkpoint=str(bad),
                                           coarse_checkpoint=str(bad))
    before = {m.version for m in client.search_model_versions(f"name='{MODEL}'")}
    challenger = str(client.get_model_version_by_alias(MODEL, "challenger").version)
    with pytest.raises(NonFiniteState, match="non-finite"):
        registry.register_model(uri, cfg, model_uri, run_id=run_id, data="synthetic")
    assert {m.version for m in client.search_model_versions(f"name='{MODEL}'")} == before
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == challenger


def test_promotion_records_who_and_when_and_refuses_a_tampered_or_diverged_model(store,
                                                                                 tmp_path):
    from flows.promote import promote_version

    client, uri, cfg, v1 = store["client"], store["uri"], store["cfg"], store["version"]
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    me = f"{getpass.getuser()}@{socket.gethostname()}"
    # registering moved `challenger`; no one held it before
    tags = client.get_model_version(MODEL, v1["version"]).tags
    assert tags["alias.challenger.set_by"] == me
    assert tags["alias.challenger.previous"] == "none"

    rule = PromotionConfig(metric="now_median")
    client.set_model_version_tag(MODEL, v1["version"], "now_median", "1.5")
    client.set_model_version_tag(MODEL, v1["version"], "now_mean_face_median", "2.0")
    d1 = promote_version(client, MODEL, rule, version=v1["version"])
    assert d1.promoted, d1.reason
    tags = client.get_model_version(MODEL, v1["version"]).tags
    assert tags["alias.champion.set_by"] == me
    assert started <= datetime.fromisoformat(tags["alias.champion.set_at"]) <= \
        datetime.now(timezone.utc)
    assert tags["alias.champion.previous"] == "none"

    # a better version 2 whose checkpoint is replaced in the store after registration
    v2 = registry.register_model(uri, cfg, store["model_uri"], run_id=store["run_id"],
                                 data="synthetic")
    client.set_model_version_tag(MODEL, v2["version"], "now_median", "1.0")
    client.set_model_version_tag(MODEL, v2["version"], "now_mean_face_median", "2.0")
    with replaced(store["folder"] / "artifacts" / "detail-000000002.pt",
                  _other_weights(store, tmp_path)):
        d2 = promote_version(client, MODEL, rule, version=v2["version"])
    assert not d2.promoted and d2.reason.startswith("refused:") and "sha256" in d2.reason
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v1["version"]
    assert client.get_model_version(MODEL, v2["version"]).tags["promotion.decision"] == "rejected"

    d3 = promote_version(client, MODEL, rule, version=v2["version"])  # the true files
    assert d3.promoted, d3.reason
    assert client.get_model_version(MODEL, v2["version"]).tags["alias.champion.previous"] == \
        v1["version"]


def test_promotion_refuses_a_diverged_model(store, tmp_path):
    """A version whose record matches its files but whose weights hold NaN (registered by
    another tool): the promotion's own check refuses it."""
    import mlflow

    from flows.registry import model_checksums
    from flows.promote import promote_version

    client = store["client"]
    model_dir = tmp_path / "model"
    shutil.copytree(store["folder"], model_dir)
    ckpt = model_dir / "artifacts" / "detail-000000002.pt"
    _nan_checkpoint(store, ckpt)
    name = f"{MODEL}-diverged"
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=model_dir.as_uri(), run_id=store["run_id"])
    record = dict(client.get_model_version(MODEL, store["version"]["version"]).tags)
    record.update(model_checksums({"checkpoint": ckpt}))
    for k, val in record.items():
        if k.startswith("sha256."):
            client.set_model_version_tag(name, mv.version, k, val)
    client.set_model_version_tag(name, mv.version, "now_median", "1.0")
    client.set_model_version_tag(name, mv.version, "now_mean_face_median", "2.0")
    mlflow.set_tracking_uri(store["uri"])
    d = promote_version(client, name, PromotionConfig(), version=mv.version)
    assert not d.promoted and "non-finite" in d.reason
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, "champion")
