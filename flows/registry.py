"""The registered model: log, register, move aliases, resolve, download, check and load.

``--model`` forms, resolved to local files (:func:`resolve_model`):

- a checkpoint file of the trainer (``detail-000000300.pt`` / ``coarse-...pt``);
- a folder: a training output (``<dir>/checkpoints/`` or the checkpoints themselves; the
  latest detail checkpoint, else the latest coarse one) or a downloaded MLflow model (has
  ``MLmodel``);
- ``models:/<name>@<alias>`` (e.g. ``models:/wildface-deca@champion``), ``models:/<name>/<N>``,
  ``models:/m-<id>`` (a logged model), ``runs:/<run id>[/<path>]`` (default path ``model``),
  read by :func:`parse_model_uri`.

The full coarse+detail reconstructor is ONE registered model, the pyfunc of
:mod:`flows.reconstructor` (:func:`log_reconstructor`), whose artifacts are the detail
checkpoint, the resolved config and the face model's arrays; each new version gets the
``tracking.alias`` alias (``challenger``) and tags naming its data, metrics and the sha256 of
its files (:func:`register_model`). Aliases, never stages; every move of one records who,
when and the previous holder (:func:`set_alias`). A registered model's artifacts are
downloaded and used directly (:func:`load_model`): nothing is unpickled and the pyfunc's code
file is never executed. The tracking URI is :func:`flows.tracking.resolve_tracking_uri`'s.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recon.config import FaceModelConfig, RefineConfig
from recon.formats.weights_file import ChecksumMismatchError, sha256_file, verify_file

MLFLOW_SCHEMES = ("models:/", "runs:/")
CHECKSUM_TAG = "sha256."  # + file name: the record of one model file (tag value: hex digest)
MLMODEL = "MLmodel"
# The models-from-code file, copied into the model folder under this name (never executed here).
CODE_FILE = "python_model"
CODE_FILE_NAME = "reconstructor.py"
# MLflow models-from-code file of the registered pyfunc (no pickled Python objects).
RECONSTRUCTOR_FILE = Path(__file__).resolve().parent / CODE_FILE_NAME
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


def pack_model_files(files: ModelFiles) -> dict[str, Any]:
    """What :func:`load_model` reads of ``files`` (the checkpoint, the face model, the config
    and the source), the files as bytes: for Ray actors on nodes that do not see this
    machine's disk (the packed model travels through Ray's object store).
    :func:`unpack_model_files` writes it back to files."""
    def read(path: Path | None) -> tuple[str, bytes] | None:
        return None if path is None else (Path(path).name, Path(path).read_bytes())

    return {"checkpoint": read(files.checkpoint), "face_model": read(files.face_model),
            "config_json": files.config_json, "source": dict(files.source)}


def unpack_model_files(packed: Mapping[str, Any], folder: str | os.PathLike) -> ModelFiles:
    """:func:`pack_model_files`'s model written to files in ``folder`` -> its ModelFiles."""
    from recon.formats.files import atomic_write_bytes

    def write(entry: tuple[str, bytes] | None) -> Path | None:
        if entry is None:
            return None
        name, data = entry
        path = Path(folder) / Path(name).name  # a bare file name: nothing outside ``folder``
        atomic_write_bytes(path, data)
        return path

    return ModelFiles(checkpoint=write(packed["checkpoint"]),
                      face_model=write(packed["face_model"]),
                      config_json=packed["config_json"], source=dict(packed["source"]))


@dataclass(frozen=True)
class ModelRef:
    """A ``models:/`` or ``runs:/`` URI, read once (:func:`parse_model_uri`). Exactly one of:
    ``model_id`` (``models:/m-<id>``), ``name`` with ``alias`` or ``version``
    (``models:/<name>@<alias>``, ``models:/<name>/<N>``), ``run_id`` with ``path``
    (``runs:/<run id>[/<path>]``)."""

    uri: str
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    model_id: str | None = None
    run_id: str | None = None
    path: str | None = None


def is_mlflow_uri(ref: str) -> bool:
    return str(ref).startswith(MLFLOW_SCHEMES)


def parse_model_uri(ref: str) -> ModelRef:
    """``models:/...`` or ``runs:/...`` -> :class:`ModelRef` (ValueError for any other form)."""
    ref = str(ref)
    if ref.startswith("runs:/"):
        run_id, _, path = ref[len("runs:/"):].strip("/").partition("/")
        path = path or "model"
        if not run_id or not path.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"{ref}: expected runs:/<run id>[/<model name>]")
        return ModelRef(ref, run_id=run_id, path=path)
    if not ref.startswith("models:/"):
        raise ValueError(f"{ref}: not an MLflow model URI (models:/... or runs:/...)")
    rest = ref[len("models:/"):].strip("/")
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        return ModelRef(ref, model_id=rest)
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return ModelRef(ref, name=name, alias=alias)
    else:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return ModelRef(ref, name=name, version=version)
    raise ValueError(f"{ref}: expected models:/<name>@<alias>, models:/<name>/<version> "
                     f"or models:/m-<id>")


# -- aliases ------------------------------------------------------------------------------------
def alias_tag(alias: str, field: str) -> str:
    """The version tag recording a move of ``alias``: ``alias.<alias>.<field>`` with field
    ``set_by`` (user@host), ``set_at`` (ISO UTC time) or ``previous`` (the version that held
    it, or ``none``)."""
    return f"alias.{alias}.{field}"


def _who() -> str:
    """``user@host`` of this process (the uid when the user has no name here)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry or $USER
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def set_alias(client, name: str, alias: str, version: str | int) -> str | None:
    """Point ``alias`` of registered model ``name`` at ``version`` (``client``: an
    ``MlflowClient``), the one way wildface moves an alias: who, when and the previous holder
    are written to the version's tags (:func:`alias_tag`) before the move, so no move is left
    without a record. Returns the previous holder's version (None when the alias was free)."""
    from datetime import datetime, timezone

    from mlflow.exceptions import MlflowException

    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:  # the alias is free
        previous = None
    record = {"set_by": _who(),
              "set_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "previous": previous or "none"}
    for field_name, value in record.items():
        client.set_model_version_tag(name, str(version), alias_tag(alias, field_name), value)
    client.set_registered_model_alias(name, alias, str(version))
    return previous


def _warn_untraced_alias(name: str, alias: str, mv) -> None:
    """An alias that wildface did not move (no ``alias.<alias>.set_at`` tag on its version)
    was moved by hand or by another tool: said, since the registry kept no trace of who."""
    if alias_tag(alias, "set_at") not in (mv.tags or {}):
        log.warning("alias %s of %s points at version %s with no recorded move (%s): it was "
                    "set outside wildface", alias, name, mv.version, alias_tag(alias, "set_by"))


# -- local files ------------------------------------------------------------------------------
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
    """:func:`recon.formats.weights_file.verify_file` as a :class:`ModelIntegrityError` (a ValueError:
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


# -- resolving and downloading -----------------------------------------------------------------
def _registry_source(client, ref: ModelRef) -> tuple[str, dict[str, Any], dict[str, str]]:
    """A parsed ``models:/...`` or ``runs:/...`` -> (URI to download, source details, the
    record of its files), the record read from the tracking database, never from the
    artifact store."""
    if ref.run_id:
        logged = _run_logged_model(client, ref)
        return (f"models:/{logged.model_id}",
                {"uri": ref.uri, "run_id": ref.run_id, "model_id": logged.model_id}, logged.tags)
    if ref.model_id:
        logged = client.get_logged_model(ref.model_id)
        return (ref.uri, {"uri": ref.uri, "model_id": ref.model_id,
                          "run_id": logged.source_run_id}, logged.tags)
    if ref.alias:
        mv = client.get_model_version_by_alias(ref.name, ref.alias)
        _warn_untraced_alias(ref.name, ref.alias, mv)
    else:
        mv = client.get_model_version(ref.name, ref.version)
    return (f"models:/{ref.name}/{mv.version}",
            {"uri": ref.uri, "registered_model": ref.name, "version": str(mv.version),
             "run_id": mv.run_id, "model_id": getattr(mv, "model_id", None)}, mv.tags)


def _run_logged_model(client, ref: ModelRef):
    """The latest model named ``ref.path`` logged by run ``ref.run_id``."""
    run = client.get_run(ref.run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{ref.path}'")
    if not found:
        raise FileNotFoundError(f"{ref.uri}: run {ref.run_id} logged no model named "
                                f"{ref.path!r}")
    return max(found, key=lambda m: m.creation_timestamp)


def resolve_model(ref: str, directory: str | os.PathLike | None = None,
                  tracking_uri: str | None = None) -> ModelFiles:
    """``--model`` -> local files (MLflow models are downloaded to ``directory``, default a
    new temporary folder, and checked against their record: :func:`verify_model_dir`).
    ``tracking_uri``: the one to read MLflow models from, else
    :func:`flows.tracking.resolve_tracking_uri`'s."""
    ref = str(ref)
    if not is_mlflow_uri(ref):
        path = Path(ref).expanduser()
        if path.is_file():
            return ModelFiles(checkpoint=path.resolve(), source={"uri": str(path.resolve())})
        if path.is_dir():
            if (path / MLMODEL).is_file():
                return read_pyfunc_dir(path, {"uri": str(path.resolve())})
            ckpt = latest_local_checkpoint(path)
            return ModelFiles(checkpoint=ckpt.resolve(), source={"uri": str(ckpt.resolve())})
        raise FileNotFoundError(f"model not found: {ref} (a checkpoint, a folder, "
                                f"models:/<name>@<alias>, models:/<name>/<N> or runs:/<id>)")
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.tracking import resolve_tracking_uri

    parsed = parse_model_uri(ref)
    uri = resolve_tracking_uri(given=tracking_uri)
    client = MlflowClient(uri, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    download, source, tags = _registry_source(client, parsed)
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


def download_coarse_checkpoint(ref: str, uri: str, directory: Path) -> Path:
    """The coarse checkpoint of ``runs:/<run id>`` (its ``checkpoint/`` artifact) or of a
    registered version ``models:/<name>/<version>`` / ``models:/<name>@<alias>``, downloaded
    to ``directory``."""
    from mlflow.tracking import MlflowClient

    directory.mkdir(parents=True, exist_ok=True)
    parsed = parse_model_uri(ref)
    if parsed.run_id:
        client = MlflowClient(uri, uri)
        files = [f.path for f in client.list_artifacts(parsed.run_id, "checkpoint")
                 if f.path.endswith(".pt")]
        if not files:
            raise FileNotFoundError(f"{ref}: the run has no checkpoint/ artifact")
        return Path(client.download_artifacts(parsed.run_id, sorted(files)[-1], str(directory)))

    model = resolve_model(ref, directory, uri)  # checked against the version's record
    coarse = model.artifacts.get("coarse_checkpoint")
    if coarse is None or not coarse.name.startswith("coarse-"):
        raise FileNotFoundError(f"{ref}: the model version has no coarse checkpoint artifact")
    return coarse


# -- loading -----------------------------------------------------------------------------------
def load_model(files: ModelFiles, *, face_model: FaceModelConfig | None = None,
               device: str = "cpu", refine: RefineConfig | None = None):
    """A model's local files (:func:`resolve_model`) ->
    :class:`recon.inference.reconstruct.FaceReconstructor` (weights only; nothing else is run).

    face_model: a configured face model that must be the one the model was trained with;
    None = the recorded one. refine: test-time refinement instead of the model's own."""
    from recon.inference import reconstruct

    return reconstruct.load_model(files.checkpoint, face_model=face_model,
                                  recorded_face_model=files.face_model,
                                  config_json=files.config_json, device=device,
                                  source=files.source, refine=refine)


def load_reconstructor(ref: str, *, face_model: str | None = None,
                       face_model_config: FaceModelConfig | None = None,
                       directory: str | os.PathLike | None = None,
                       tracking_uri: str | None = None, device: str = "cpu",
                       refine: RefineConfig | None = None):
    """``--model`` (+ optional ``--face-model``, a configured face-model path: 'demo-head',
    a FLAME .pkl or .npz) -> :func:`load_model` of :func:`resolve_model`'s files."""
    configured = face_model_config
    if configured is None and face_model:
        configured = FaceModelConfig(path=face_model)
    return load_model(resolve_model(ref, directory, tracking_uri), face_model=configured,
                      device=device, refine=refine)


# -- logging and registering ---------------------------------------------------------------------
def log_reconstructor(uri: str, cfg, *, run_id: str, detail_checkpoint: str,
                      coarse_checkpoint: str) -> str:
    """Log the reconstructor pyfunc (:mod:`flows.reconstructor`) into ``run_id`` as ``model/``:
    artifacts = both checkpoints, the resolved config and the face model's arrays. The sha256
    of every file (:func:`model_checksums`, the ``MLmodel`` and the code file included) become
    ``sha256.*`` tags of the logged model: the record each load checks the artifact store's
    copies against. Returns the model URI (``models:/m-...``) to load or register."""
    from importlib.metadata import version

    import mlflow
    from mlflow.tracking import MlflowClient

    from recon.face_model.flame_io import load_face_model

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(cfg.model_dump_json(indent=1))
        face_path = load_face_model(cfg.face_model).save_npz(Path(tmp) / "face_model.npz")
        artifacts = {"checkpoint": detail_checkpoint, "coarse_checkpoint": coarse_checkpoint,
                     "config": str(config_path), "face_model": str(face_path)}
        # Hashed here, from the files handed to MLflow, not read back from its artifact store.
        record = model_checksums({**artifacts, CODE_FILE: RECONSTRUCTOR_FILE})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(RECONSTRUCTOR_FILE), artifacts=artifacts,
                # Declared so that loading may override it (load_model(model_config=...) or
                # MLFLOW_PYFUNC_INFERENCE_CONFIG): MLflow ignores keys not logged here.
                model_config={"device": "auto"},
                # Explicit requirements: inferring them would load the model in a subprocess.
                pip_requirements=[f"wildface=={version('wildface')}",
                                  f"torch=={version('torch')}", f"mlflow=={mlflow.__version__}"],
            )
        # MLflow writes the MLmodel itself: read back at once, before anyone else uses it.
        logged = client.get_logged_model(info.model_id)
        mlmodel = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{logged.artifact_location.rstrip('/')}/{MLMODEL}", dst_path=tmp,
            tracking_uri=uri)
        record.update(model_checksums({MLMODEL: mlmodel}))
    client.set_logged_model_tags(info.model_id, record)
    return info.model_uri


def register_model(uri: str, cfg, model_uri: str, *, run_id: str, data: str,
                   metrics: Mapping[str, float] | None = None,
                   extra_tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """Register ``model_uri`` as a new version of ``tracking.registered_model``, tagged with
    its data (root, manifest hash), code version, face model, backbone, ``metrics``
    (``metric.<name>``) and the sha256 of its files (``sha256.*``), and point the
    ``tracking.alias`` alias (``challenger``) at it (:func:`set_alias`).
    Returns ``{"name", "version", "uri", "run_id"}``.

    Refused, registering nothing: a model whose files do not match the checksums recorded when
    it was logged (:class:`ModelIntegrityError`) and one whose checkpoint holds ``inf`` /
    ``nan`` (:class:`recon.training.checkpoint.NonFiniteState`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.tracking import code_version

    tc = cfg.tracking
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        files = resolve_model(model_uri, tmp, uri)
        assert_finite_model(files)
    mv = mlflow.register_model(model_uri, tc.registered_model)
    tags = {"data_root": str(data), "code_version": code_version(),
            "face_model": cfg.face_model.path if cfg.face_model.path == "demo-head"
            else Path(cfg.face_model.path).name, "backbone": cfg.model.backbone}
    tags.update({f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()
                 if isinstance(v, (int, float))})
    tags["manifest_sha256"] = client.get_run(run_id).data.tags.get("wildface.manifest_sha256",
                                                                   "unknown")
    tags.update(extra_tags or {})
    tags.update(files.checksums)  # last: nothing else may overwrite the record
    for k, v in tags.items():
        client.set_model_version_tag(tc.registered_model, mv.version, k, str(v)[:5000])
    set_alias(client, tc.registered_model, tc.alias, mv.version)
    return {"name": tc.registered_model, "version": str(mv.version),
            "uri": f"models:/{tc.registered_model}/{mv.version}", "run_id": run_id}


__all__ = ["ModelFiles", "ModelIntegrityError", "ModelRef", "alias_tag", "assert_finite_model",
           "download_coarse_checkpoint", "is_mlflow_uri", "latest_local_checkpoint",
           "load_model", "load_reconstructor", "log_reconstructor", "model_checksums",
           "parse_model_uri", "read_pyfunc_dir", "recorded_checksums", "register_model",
           "resolve_model", "set_alias", "verify_model_dir"]
