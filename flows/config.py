"""The whole wildface configuration: one typed tree composed of each package's sections.

``load_config`` reads an optional YAML file and ``key.sub=value`` overrides on top of the
defaults, and validates everything before any work starts. Errors name the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from recon.config import DEMO_HEAD, FaceModelConfig, LossConfig, NetworkConfig, StrictModel
from recon.config import TrainConfig
from recon.config import DataConfig, SynthConfig
from recon.config import RenderConfig
from recon.config import IdentityConfig, PerceptualConfig
from infra.config import RayConfig, TrackingConfig
from recon.evaluation.config import EvaluationConfig, PromotionConfig

from infra.config import ServicesConfig, StorageConfig
from preprocessing.config import PreprocessConfig
from flows.jobs_config import EvaluateFlowConfig, ReconstructConfig, RetrainConfig
from infra import storage
from infra.model_store import resolve_identity_weights, resolve_perceptual_weights

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override that does not validate; the message names the field."""


class WildfaceConfig(StrictModel):
    face_model: FaceModelConfig = Field(default_factory=FaceModelConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    model: NetworkConfig = Field(default_factory=NetworkConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    evaluate_flow: EvaluateFlowConfig = Field(default_factory=EvaluateFlowConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    @model_validator(mode="after")
    def _keypoint_steps_need_the_keypoint_head(self) -> "WildfaceConfig":
        if self.train.keypoint_steps > 0 and (self.model.head != "keypoints"
                                              or self.loss.keypoints == 0):
            raise ValueError("train.keypoint_steps > 0 needs model.head: keypoints and "
                             "loss.keypoints > 0")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: ``line L, column C: problem`` (1-based, as editors count)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        what = err.problem or "syntax error"
        if err.context:
            what += f" ({err.context})"
        return " ".join(f"line {mark.line + 1}, column {mark.column + 1}: {what}".split())
    return " ".join(str(err).split())


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML at {_yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a file in ``configs/`` (``demo`` -> ``configs/demo.yaml``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"config file not found: {name_or_path}")


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> WildfaceConfig:
    """Defaults, then the YAML file, then overrides (``"train.lr=1e-4"`` or a dict)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        resolved = resolve_config_path(path)
        source = str(resolved)
        loaded = _read_yaml(resolved) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{resolved}: top level must be a mapping")
        tree = loaded
    if isinstance(overrides, dict):
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                     for k, v in overrides.items()]
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: invalid YAML value at {_yaml_problem(err)}") from None
        _set_dotted(tree, key.strip(), value)
        source += f" + {key.strip()}"  # the key only: a value may hold a password
    try:
        return WildfaceConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None


# Local files the training workers open, by config section.
_LOCAL_PATHS = {"face_model": ("path", "landmarks"), "model": ("backbone_weights",),
                "identity": ("weights", "store"), "perceptual": ("weights", "store"),
                "data": ("cache_dir",)}


def with_absolute_paths(cfg: WildfaceConfig) -> WildfaceConfig:
    """``cfg`` with the local files its training workers open made absolute, from this
    process's working folder: Ray Train runs each worker in a folder of its own, where a
    relative path names nothing (or, for ``data.cache_dir``, a cache rebuilt every run).
    s3:// URIs and the built-in demo head stay as they are."""
    update = {}
    for section, fields in _LOCAL_PATHS.items():
        sub = getattr(cfg, section)
        changed = {}
        for name in fields:
            value = getattr(sub, name)
            if value and value != DEMO_HEAD:
                changed[name] = storage.absolute(value)
        if changed:
            update[section] = sub.model_copy(update=changed)
    return cfg.model_copy(update=update)


def with_stage_weights(cfg: WildfaceConfig, stage: str) -> WildfaceConfig:
    """``cfg`` with the pretrained network that training ``stage`` builds given as a local,
    checked file: the identity network (coarse stage, ``loss.identity`` > 0) or VGG19 (detail
    stage, ``loss.mrf`` > 0) from the model store when its ``weights`` is not set, since
    ``recon`` loads files only. Call it where the trainer runs: a Ray worker resolves into
    its own machine's store cache."""
    if stage == "coarse" and cfg.loss.identity > 0:
        return cfg.model_copy(update={"identity": resolve_identity_weights(cfg.identity)})
    if stage == "detail" and cfg.loss.mrf > 0:
        return cfg.model_copy(update={"perceptual": resolve_perceptual_weights(cfg.perceptual)})
    return cfg
