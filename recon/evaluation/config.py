"""Typed settings of the NoW evaluation and of model promotion (sections of WildfaceConfig)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from recon.config import StrictModel


class EvaluationConfig(StrictModel):
    """NoW protocol settings (``evaluation.*``)."""

    split: Literal["val", "test"] = Field("val", description="which image list to score")
    metrical: bool = Field(
        False, description="metrical variant: no scale in the alignment, only unit conversion"
    )
    unit_factor: float = Field(
        1000.0, gt=0, description="prediction unit -> scan unit (mm); 1000 for metres"
    )
    refine_iters: int = Field(30, ge=0, le=1000, description="max ICP steps of the refinement")
    refine_tol: float = Field(1e-6, ge=0, description="stop when the relative decrease is below")
    refine_points: int | None = Field(
        20000, ge=100, description="scan points used by the refinement steps (None = all)"
    )
    workers: int = Field(2, ge=1, description="processes scoring scans in parallel")
    curve_max_mm: float = Field(8.0, gt=0, description="cumulative error curve range")
    image_root: str = Field(
        "NoW_Dataset/final_release_version/iphone_pictures",
        description="folder of the images, relative to the dataset (for predictions)",
    )


class PromotionConfig(StrictModel):
    """When the challenger version becomes ``champion`` (``promotion.*``). The registered
    model and the challenger alias are ``tracking.registered_model`` / ``tracking.alias``."""

    metric: str = Field(
        "now_median", description="metric of the version's run that decides (mm for NoW)"
    )
    margin: float = Field(
        0.0, ge=0, description="the challenger must beat the champion by more than this"
    )
    lower_is_better: bool = Field(True, description="False for metrics where higher wins")
    baseline_metric: str | None = Field(
        "now_mean_face_median", description="the same metric for the mean face (the face "
        "model's template) on the same images, from the challenger's run: the challenger must "
        "beat it by more than the margin too, and without it is not promoted; None: no baseline"
    )
    champion_alias: str = Field("champion", description="alias of the promoted version")
