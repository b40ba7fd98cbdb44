"""The job of every worker of one Ray Train stage (:class:`StageJob`): built and checked by
:func:`flows.train.run_stage`, handed to Ray as a plain dict (:meth:`StageJob.loop_config`)
and checked again where :func:`flows.train_worker.train_loop` starts
(:meth:`StageJob.from_loop_config`), so a bad job fails at once with one message naming the
field. A module of its own, light to import: no Ray, MLflow or trainer here.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from flows.config import ConfigError, WildfaceConfig, format_errors
from recon.config import StrictModel

Stage = Literal["coarse", "detail"]


class StageRun(StrictModel):
    """The stage's MLflow run, which rank 0 logs into."""

    tracking_uri: str = Field(min_length=1)
    run_id: str = Field(min_length=1)


class StageJob(StrictModel):
    """One stage for every worker: the resolved config (absolute paths; ``train.steps`` is
    the stage's length), the data, the coarse checkpoint a detail stage starts from and the
    MLflow run to log into (None: no tracking)."""

    stage: Stage
    config: WildfaceConfig
    data: str = Field(min_length=1, description="absolute data folder or s3:// prefix")
    coarse: str | None = Field(
        None, min_length=1, validate_default=True, description="detail stage: a coarse "
        "checkpoint every worker can read (an absolute path or an s3:// URI)")
    mlflow: StageRun | None = None

    @field_validator("coarse")
    @classmethod
    def _detail_needs_coarse(cls, coarse: str | None, info: ValidationInfo) -> str | None:
        if coarse is None and info.data.get("stage") == "detail":
            raise ValueError("the detail stage needs a coarse checkpoint")
        return coarse

    def loop_config(self) -> dict[str, Any]:
        """The job as Ray's ``train_loop_config``: plain JSON types."""
        return self.model_dump(mode="json")

    @classmethod
    def from_loop_config(cls, raw: Any) -> StageJob:
        """The job back from ``train_loop_config``; a :class:`flows.config.ConfigError`
        naming each bad field when it does not validate."""
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(format_errors(err, "stage job")) from None


__all__ = ["Stage", "StageJob", "StageRun"]
