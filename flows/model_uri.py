"""``--model``: a local checkpoint or an MLflow model, resolved to local files.

Accepted forms:

- a checkpoint file of the trainer (``detail-000000300.pt`` / ``coarse-...pt``);
- a folder: a training output (``<dir>/checkpoints/`` or the checkpoints themselves; the
  latest detail checkpoint, else the latest coarse one) or a downloaded MLflow model (has
  ``MLmodel``);
- ``models:/<name>@<alias>`` (e.g. ``models:/wildface-deca@champion``), ``models:/<name>/<N>``,
  ``models:/m-<id>`` (a logged model), ``runs:/<run id>[/<path>]`` (default path ``model``).

A registered model is the reconstructor pyfunc of :mod:`flows.reconstructor`: its artifacts
(the detail checkpoint, the resolved config and the face model's arrays) are downloaded and
used directly; nothing is unpickled and the pyfunc's code file is never executed. The tracking
URI is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the MLflow server of ``wildface
services`` when it answers.

Trust: the artifact store (files) is the untrusted side, the tracking database the record.
Logging records the sha256 of every model file (:func:`model_checksums`) as ``sha256.<name>``
tags of the logged model; registering copies them onto the version's tags. Every MLflow model
is checked against that record after its download and before anything reads it
(:func:`verify_model_dir`): a file that differs, is missing, or has no recorded checksum is
refused (:class:`ModelIntegrityError`, naming the file and both hashes). Local paths are the
user's own files and are not checked.
"""
from __future__ import annotations

import logging
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infra.config import ServicesConfig
from recon.config import FaceModelConfig, RefineConfig
from recon.weights_file import ChecksumMismatchError, sha256_file, verify_file

MLFLOW_SCHEMES = ("models:/", "runs:/")
CHECKSUM_TAG = "sha256."  # + file name: the record of one model file (tag value: hex digest)
MLMODEL = "MLmodel"
# The models-from-code file, copied into the model folder under this name (never executed here).
CODE_FILE = "python_model"
CODE_FILE_NAME = "reconstructor.py"
# What the loader reads: a record without these cannot vouch for the model.
REQUIRED_CHECKSUMS = (MLMODEL, "checkpoint", "config", "face_model")

log = logging.getLogger(__name__)


class ModelIntegrityError(ValueError):
    """A downloaded model whose files do not match the registry's record of them."""


@dataclass
class ModelFiles:
    """A model as local files. ``source``: where it came from (``uri`` and, for MLflow,
    ``registered_model``, ``version``, ``run_id``, ``model_id``)."""

    checkpoint: Path
    face_model: Path | None = None  # the face model's .npz shipped with a registered model
    config_json: str | None = None  # the resolved config shipped with a registered model
    source: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)  # every file of an MLflow model
    checksums: dict[str, str] = field(default_factory=dict)  # the record they were checked on

    @property
    def run_id(self) -> str | None:
        return self.source.get("run_id")


# -- the registry's server and alias records (also used by flows.tracking) -----------------
def _server_answers(uri: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def services_mlflow_uri(services: ServicesConfig | None = None) -> str | None:
    """The MLflow server of ``wildface services`` when it answers, else None."""
    svc = services or ServicesConfig()
    uri = f"http://{svc.host}:{svc.mlflow_port}"
    return uri if _server_answers(uri) else None


def alias_tag(alias: str, field: str) -> str:
    """The version tag recording a move of ``alias``: ``alias.<alias>.<field>`` with field
    ``set_by`` (user@host), ``set_at`` (ISO UTC time) or ``previous`` (the version that held
    it, or ``none``)."""
    return f"alias.{alias}.{field}"


def is_mlflow_uri(ref: str) -> bool:
    return str(ref).startswith(MLFLOW_SCHEMES)


def tracking_uri_for(explicit: str | None = None) -> str:
    """The MLflow server to resolve ``models:/`` and ``runs:/`` against."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if is_tracking_uri_set():  # set in this process (e.g. by the pipeline flow)
        return mlflow.get_tracking_uri()
    served = services_mlflow_uri()
    if served:
        return served
    raise ValueError("an MLflow model URI needs a tracking URI: pass --tracking-uri, set "
                     "MLFLOW_TRACKING_URI or tracking.uri, or start `wildface services up`")


def latest_local_checkpoint(folder: Path) -> Path:
    """The latest detail checkpoint under ``folder`` (or its ``checkpoints/``), else coarse."""
    from recon.training.checkpoint import latest_checkpoint

    for directory in (folder / "checkpoints", folder):
        for stage in ("detail", "coarse"):
            found = latest_checkpoint(directory, stage)
            if found is not None:
                return found
    raise FileNotFoundError(f"{folder}: no coarse-*.pt / detail-*.pt checkpoint here or in "
                            f"{folder / 'checkpoints'}")


def _read_mlmodel(model_dir: Path) -> tuple[dict, dict[str, Path]]:
    """A model folder's ``MLmodel`` spec and its files by name: ``MLmodel``, the code file
    (``python_model``, when there) and each pyfunc artifact (refused when it points outside
    the folder)."""
    root = model_dir.resolve()
    mlmodel = root / MLMODEL
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{model_dir}: not an MLflow model (no MLmodel file)")
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = (spec.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    paths: dict[str, Path] = {MLMODEL: mlmodel}
    if (root / CODE_FILE_NAME).is_file():
        paths[CODE_FILE] = root / CODE_FILE_NAME
    for name, entry in artifacts.items():
        rel = entry.get("path") if isinstance(entry, dict) else entry
        path = (root / str(rel)).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"{mlmodel}: artifact {name!r} points outside the model folder")
        paths[str(name)] = path
    return spec, paths


def read_pyfunc_dir(model_dir: Path, source: dict[str, Any]) -> ModelFiles:
    """The checkpoint, config and face model of a downloaded reconstructor pyfunc."""
    spec, paths = _read_mlmodel(model_dir)
    if "checkpoint" not in paths:
        raise ValueError(f"{model_dir}: not a wildface reconstructor (no 'checkpoint' artifact)")
    config_json = paths["config"].read_text() if "config" in paths else None
    source = {**source, "model_id": spec.get("model_id") or source.get("model_id")}
    if spec.get("run_id") and not source.get("run_id"):
        source["run_id"] = spec["run_id"]
    return ModelFiles(checkpoint=paths["checkpoint"], face_model=paths.get("face_model"),
                      config_json=config_json,
                      source={k: v for k, v in source.items() if v is not None},
                      artifacts=paths)


# -- the record of a model's files ------------------------------------------------------------
def model_checksums(files: Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """``{name: path}`` -> the record's tags ``{"sha256.<name>": hex digest}``."""
    return {f"{CHECKSUM_TAG}{name}": sha256_file(path) for name, path in sorted(files.items())}


def recorded_checksums(tags: Mapping[str, str] | None) -> dict[str, str]:
    """The ``sha256.*`` tags of a logged model or model version."""
    return {k: v for k, v in (tags or {}).items() if k.startswith(CHECKSUM_TAG)}


def verify_model_dir(model_dir: Path, record: Mapping[str, str], label: str) -> dict[str, Path]:
    """Check a downloaded model folder against its record (``sha256.<name>`` tags) before
    anything reads it; returns its files by name. ``label`` names the model in errors.

    Refused (:class:`ModelIntegrityError`): a record without the files the loader reads, a
    recorded file that is missing, a file whose sha256 differs (the message names the file
    and both hashes), a file of the model that the record does not cover."""
    record = recorded_checksums(record)
    missing = [n for n in REQUIRED_CHECKSUMS if f"{CHECKSUM_TAG}{n}" not in record]
    if missing:
        raise ModelIntegrityError(
            f"{label}: the registry has no recorded sha256 of {', '.join(missing)} (a model "
            f"logged without checksums); refusing to load files it cannot vouch for. Log and "
            f"register the model again with this version of wildface.")
    # The MLmodel first: it says where the other files are.
    expected = record[f"{CHECKSUM_TAG}{MLMODEL}"]
    _verify(model_dir.resolve() / MLMODEL, expected, f"{label}: {MLMODEL}")
    _, paths = _read_mlmodel(model_dir)
    unrecorded = sorted(set(paths) - {k[len(CHECKSUM_TAG):] for k in record})
    if unrecorded:
        raise ModelIntegrityError(f"{label}: files {unrecorded} have no recorded sha256; "
                                  f"refusing to load the model")
    for key, digest in sorted(record.items()):
        name = key[len(CHECKSUM_TAG):]
        if name == MLMODEL:
            continue
        if name not in paths or not paths[name].is_file():
            raise ModelIntegrityError(f"{label}: recorded file {name!r} is missing from the "
                                      f"downloaded model; refusing to load it")
        _verify(paths[name], digest,
                f"{label}: {name} ({paths[name].relative_to(model_dir.resolve())})")
    return paths


def _verify(path: Path, digest: str, label: str) -> None:
    """:func:`recon.weights_file.verify_file` as a :class:`ModelIntegrityError` (a ValueError:
    the CLI reports it as a clear error)."""
    if not path.is_file():
        raise ModelIntegrityError(f"{label}: missing from the downloaded model; refusing to "
                                  f"load it")
    try:
        verify_file(path, digest, label=label)
    except ChecksumMismatchError as err:
        raise ModelIntegrityError(str(err)) from err


def assert_finite_model(files: ModelFiles) -> None:
    """Refuse (:class:`recon.training.checkpoint.NonFiniteState`) a model whose checkpoint's
    networks hold ``inf`` or ``nan`` (a diverged run): never registered nor promoted."""
    from recon.training.checkpoint import assert_finite_state, load_checkpoint

    ckpt = load_checkpoint(files.checkpoint, map_location="cpu")
    assert_finite_state(ckpt["model"], f"{files.source.get('uri', files.checkpoint)}: checkpoint")


def _registry_source(client, ref: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    """``models:/...`` or ``runs:/...`` -> (URI to download, source details, the record of its
    files), the record read from the tracking database, never from the artifact store."""
    if ref.startswith("runs:/"):
        run_id, _, sub = ref[len("runs:/"):].strip("/").partition("/")
        logged = _run_logged_model(client, ref, run_id, sub or "model")
        return (f"models:/{logged.model_id}",
                {"uri": ref, "run_id": run_id, "model_id": logged.model_id}, logged.tags)
    rest = ref[len("models:/"):].strip("/")
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        logged = client.get_logged_model(rest)
        return ref, {"uri": ref, "model_id": rest, "run_id": logged.source_run_id}, logged.tags
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
        _warn_untraced_alias(name, alias, mv)
    else:
        name, _, version = rest.rpartition("/")
        if not name or not version.isdigit():
            raise ValueError(f"{ref}: expected models:/<name>@<alias>, models:/<name>/<version> "
                             f"or models:/m-<id>")
        mv = client.get_model_version(name, version)
    return (f"models:/{name}/{mv.version}",
            {"uri": ref, "registered_model": name, "version": str(mv.version),
             "run_id": mv.run_id, "model_id": getattr(mv, "model_id", None)}, mv.tags)


def _run_logged_model(client, ref: str, run_id: str, name: str):
    """The latest model named ``name`` logged by run ``run_id``."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{ref}: expected runs:/<run id>[/<model name>]")
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'")
    if not found:
        raise FileNotFoundError(f"{ref}: run {run_id} logged no model named {name!r}")
    return max(found, key=lambda m: m.creation_timestamp)


def _warn_untraced_alias(name: str, alias: str, mv) -> None:
    """An alias that wildface did not move (no ``alias.<alias>.set_at`` tag on its version)
    was moved by hand or by another tool: said, since the registry kept no trace of who."""
    if alias_tag(alias, "set_at") not in (mv.tags or {}):
        log.warning("alias %s of %s points at version %s with no recorded move (%s): it was "
                    "set outside wildface", alias, name, mv.version, alias_tag(alias, "set_by"))


def resolve_model(ref: str, directory: str | os.PathLike | None = None,
                  tracking_uri: str | None = None) -> ModelFiles:
    """``--model`` -> local files (MLflow models are downloaded to ``directory``, default a
    new temporary folder, and checked against their record: :func:`verify_model_dir`)."""
    ref = str(ref)
    if not is_mlflow_uri(ref):
        path = Path(ref).expanduser()
        if path.is_file():
            return ModelFiles(checkpoint=path.resolve(), source={"uri": str(path.resolve())})
        if path.is_dir():
            if (path / "MLmodel").is_file():
                return read_pyfunc_dir(path, {"uri": str(path.resolve())})
            ckpt = latest_local_checkpoint(path)
            return ModelFiles(checkpoint=ckpt.resolve(), source={"uri": str(ckpt.resolve())})
        raise FileNotFoundError(f"model not found: {ref} (a checkpoint, a folder, "
                                f"models:/<name>@<alias>, models:/<name>/<N> or runs:/<id>)")
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri_for(tracking_uri)
    client = MlflowClient(uri, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    download, source, tags = _registry_source(client, ref)
    record = recorded_checksums(tags)
    dst = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="wildface-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=download, dst_path=str(dst),
                                                     tracking_uri=uri))
    model_dir = local if (local / MLMODEL).is_file() else next(
        (p.parent for p in local.rglob(MLMODEL)), local)
    verify_model_dir(model_dir, record, ref)
    files = read_pyfunc_dir(model_dir, source)
    files.checksums = record
    return files


def load_reconstructor(ref: str, *, face_model: str | None = None,
                       face_model_config: FaceModelConfig | None = None,
                       directory: str | os.PathLike | None = None,
                       tracking_uri: str | None = None, device: str = "cpu",
                       refine: RefineConfig | None = None):
    """``--model`` (+ optional ``--face-model``) -> :class:`recon.reconstruct.FaceReconstructor`.

    face_model: a configured face-model path ('demo-head', a FLAME .pkl or .npz) that must be
    the one the model was trained with; None = the recorded one. refine: test-time
    refinement instead of the model's own (:func:`recon.reconstruct.load_model`)."""
    from recon.reconstruct import load_model

    files = resolve_model(ref, directory, tracking_uri)
    configured = face_model_config
    if configured is None and face_model:
        configured = FaceModelConfig(path=face_model)
    return load_model(files.checkpoint, face_model=configured,
                      recorded_face_model=files.face_model, config_json=files.config_json,
                      device=device, source=files.source, refine=refine)


__all__ = ["ModelFiles", "ModelIntegrityError", "assert_finite_model", "is_mlflow_uri",
           "latest_local_checkpoint", "load_reconstructor", "model_checksums", "read_pyfunc_dir",
           "recorded_checksums", "resolve_model", "tracking_uri_for", "verify_model_dir"]
