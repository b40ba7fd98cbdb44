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
used directly; nothing is unpickled. The tracking URI is ``tracking_uri``, else
``$MLFLOW_TRACKING_URI``, else the MLflow server of ``wildface services`` when it answers.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recon.config import FaceModelConfig, RefineConfig

MLFLOW_SCHEMES = ("models:/", "runs:/")


@dataclass
class ModelFiles:
    """A model as local files. ``source``: where it came from (``uri`` and, for MLflow,
    ``registered_model``, ``version``, ``run_id``, ``model_id``)."""

    checkpoint: Path
    face_model: Path | None = None  # the face model's .npz shipped with a registered model
    config_json: str | None = None  # the resolved config shipped with a registered model
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        return self.source.get("run_id")


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
    from flows.tracking import services_mlflow_uri

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


def read_pyfunc_dir(model_dir: Path, source: dict[str, Any]) -> ModelFiles:
    """The checkpoint, config and face model of a downloaded reconstructor pyfunc."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{model_dir}: not an MLflow model (no MLmodel file)")
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = (spec.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    paths: dict[str, Path] = {}
    for name, entry in artifacts.items():
        rel = entry.get("path") if isinstance(entry, dict) else entry
        path = (model_dir / str(rel)).resolve()
        if not path.is_relative_to(model_dir.resolve()):
            raise ValueError(f"{mlmodel}: artifact {name!r} points outside the model folder")
        paths[name] = path
    if "checkpoint" not in paths:
        raise ValueError(f"{model_dir}: not a wildface reconstructor (no 'checkpoint' artifact)")
    config_json = paths["config"].read_text() if "config" in paths else None
    source = {**source, "model_id": spec.get("model_id") or source.get("model_id")}
    if spec.get("run_id") and not source.get("run_id"):
        source["run_id"] = spec["run_id"]
    return ModelFiles(checkpoint=paths["checkpoint"], face_model=paths.get("face_model"),
                      config_json=config_json,
                      source={k: v for k, v in source.items() if v is not None})


def _registry_source(client, ref: str) -> tuple[str, dict[str, Any]]:
    """``models:/...`` -> (URI to download, source details)."""
    rest = ref[len("models:/"):].strip("/")
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        import mlflow

        logged = mlflow.get_logged_model(rest)
        return ref, {"uri": ref, "model_id": rest, "run_id": logged.source_run_id}
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, version = rest.rpartition("/")
        if not name or not version.isdigit():
            raise ValueError(f"{ref}: expected models:/<name>@<alias>, models:/<name>/<version> "
                             f"or models:/m-<id>")
        mv = client.get_model_version(name, version)
    return (f"models:/{name}/{mv.version}",
            {"uri": ref, "registered_model": name, "version": str(mv.version),
             "run_id": mv.run_id, "model_id": getattr(mv, "model_id", None)})


def resolve_model(ref: str, directory: str | os.PathLike | None = None,
                  tracking_uri: str | None = None) -> ModelFiles:
    """``--model`` -> local files (MLflow models are downloaded to ``directory``, default a
    new temporary folder)."""
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
    if ref.startswith("runs:/"):
        rest = ref[len("runs:/"):].strip("/")
        run_id, _, sub = rest.partition("/")
        download = f"runs:/{run_id}/{sub or 'model'}"
        source: dict[str, Any] = {"uri": ref, "run_id": run_id}
    else:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        download, source = _registry_source(client, ref)
    dst = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="wildface-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=download, dst_path=str(dst),
                                                     tracking_uri=uri))
    model_dir = local if (local / "MLmodel").is_file() else next(
        (p.parent for p in local.rglob("MLmodel")), local)
    return read_pyfunc_dir(model_dir, source)


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


__all__ = ["ModelFiles", "is_mlflow_uri", "latest_local_checkpoint", "load_reconstructor",
           "read_pyfunc_dir", "resolve_model", "tracking_uri_for"]
