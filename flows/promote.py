"""Prefect flow ``promote``: the registry's challenger becomes champion only if it is better.

The challenger (the version with alias ``tracking.alias``, default ``challenger``) is
compared with the version holding ``promotion.champion_alias`` (default ``champion``) on
``promotion.metric`` (default ``now_median``, lower is better), read from each version's
run metrics (else from a version tag of that name). The challenger is promoted when it beats
the mean face, the baseline that knows nothing (``promotion.baseline_metric``, default
``now_mean_face_median``, measured on the same images by the evaluation), by more than
``promotion.margin``, and there is no champion or it beats the champion by that margin too,
and its
files pass the load-time checks: they match the sha256 recorded at registration
(:func:`flows.registry.resolve_model`) and its checkpoint holds no ``inf`` / ``nan``. Either
way the decision and both numbers are written to the challenger version's tags
(``promotion.*``) and description; the alias moves through :func:`flows.registry.set_alias`,
which records who moved it, when, and the previous champion on the version's tags.

:func:`decide` is the pure rule; :func:`promote_version` does the MLflow I/O with a given
client; :func:`promote` is the flow.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from infra.offline import apply_offline_env

apply_offline_env()

from prefect import flow, get_run_logger  # noqa: E402

from flows.config import WildfaceConfig, load_config  # noqa: E402
from recon.evaluation.config import PromotionConfig  # noqa: E402


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    metric: str
    margin: float
    lower_is_better: bool
    challenger_version: str
    challenger_value: float | None
    champion_version: str | None
    champion_value: float | None
    baseline_value: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _missing(x: float | None) -> bool:
    return x is None or math.isnan(x)


def decide(
    challenger: float | None,
    champion: float | None,
    *,
    margin: float = 0.0,
    lower_is_better: bool = True,
    has_champion: bool = True,
    baseline: float | None = None,
    needs_baseline: bool = False,
) -> tuple[bool, str]:
    """The promotion rule on the metric values -> (promote, reason).

    A challenger without the metric: never promoted. With ``needs_baseline``, the challenger
    must beat ``baseline`` (the mean face's value) by strictly more than ``margin``, and is
    not promoted without one. Then: no champion, or a champion without the metric: promote
    (there is nothing else to beat); otherwise the challenger must beat the champion by
    strictly more than ``margin`` (beyond rounding).
    """
    def gain_over(other: float) -> float:
        return (other - challenger) if lower_is_better else (challenger - other)

    def beats(other: float) -> bool:
        # Differences at rounding level are ties: 1.20 - 1.15 is not "more than 0.05".
        return gain_over(other) - margin > 1e-9 * max(1.0, abs(other))

    if _missing(challenger):
        return False, "challenger has no value for the metric"
    prefix = ""
    if needs_baseline:
        if _missing(baseline):
            return False, "no mean-face baseline for the metric: evaluate the challenger again"
        if not beats(baseline):
            return False, (f"not better than the mean face (the template, all codes zero): "
                           f"{challenger:.6g} vs {baseline:.6g}, margin {margin:.6g}")
        prefix = f"beats the mean face by {gain_over(baseline):.6g}; "
    if not has_champion:
        return True, prefix + "no champion yet"
    if _missing(champion):
        return True, prefix + "champion has no value for the metric"
    if beats(champion):
        return True, prefix + f"better by {gain_over(champion):.6g} > margin {margin:.6g}"
    return False, prefix + (f"improvement {gain_over(champion):.6g} over the champion does "
                            f"not exceed margin {margin:.6g}")


def _metric_of(client, version, metric: str) -> float | None:
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(metric)
        if value is not None:
            return float(value)
    tag = (version.tags or {}).get(metric)
    try:
        return float(tag) if tag is not None else None
    except ValueError:
        return None


def promote_version(
    client,
    model_name: str,
    cfg: PromotionConfig,
    *,
    challenger_alias: str = "challenger",
    version: str | None = None,
) -> PromotionDecision:
    """Decide and apply the promotion in the registry via an ``MlflowClient``.

    ``version`` names the challenger explicitly; default: the version with
    ``challenger_alias``. A challenger the rule would promote is first downloaded from
    ``client``'s tracking URI and checked (:func:`integrity_problem`); one that fails is
    rejected with the reason recorded.
    """
    from mlflow.exceptions import MlflowException

    from flows.registry import set_alias

    challenger = (client.get_model_version(model_name, str(version)) if version is not None
                  else client.get_model_version_by_alias(model_name, challenger_alias))
    try:
        champion = client.get_model_version_by_alias(model_name, cfg.champion_alias)
    except MlflowException:
        champion = None
    ch_value = _metric_of(client, challenger, cfg.metric)
    base_value = (_metric_of(client, challenger, cfg.baseline_metric)
                  if cfg.baseline_metric else None)
    if champion is not None and str(champion.version) == str(challenger.version):
        promoted, reason = False, "challenger is already the champion"
        champ_value: float | None = ch_value
    else:
        champ_value = _metric_of(client, champion, cfg.metric) if champion is not None else None
        promoted, reason = decide(ch_value, champ_value, margin=cfg.margin,
                                  lower_is_better=cfg.lower_is_better,
                                  has_champion=champion is not None, baseline=base_value,
                                  needs_baseline=cfg.baseline_metric is not None)
    if promoted:  # only then: the check downloads the model
        problem = integrity_problem(client, model_name, str(challenger.version))
        if problem is not None:
            promoted, reason = False, f"refused: {problem}"
    decision = PromotionDecision(
        promoted=promoted, reason=reason, metric=cfg.metric, margin=cfg.margin,
        lower_is_better=cfg.lower_is_better, challenger_version=str(challenger.version),
        challenger_value=ch_value,
        champion_version=None if champion is None else str(champion.version),
        champion_value=champ_value, baseline_value=base_value,
    )
    _record(client, model_name, decision)
    if promoted:
        set_alias(client, model_name, cfg.champion_alias, challenger.version)
    return decision


def integrity_problem(client, model_name: str, version: str) -> str | None:
    """Why version ``version`` must not be promoted (its files differ from the sha256 recorded
    at registration, or its checkpoint holds ``inf`` / ``nan``), else None."""
    import tempfile

    from flows.registry import assert_finite_model, resolve_model

    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        try:
            files = resolve_model(f"models:/{model_name}/{version}", tmp, client.tracking_uri)
            assert_finite_model(files)
        # ModelIntegrityError, CheckpointError / NonFiniteState (ValueErrors), a missing file
        except (ValueError, FileNotFoundError) as err:
            return str(err)
    return None


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.6g}"


def _record(client, model_name: str, d: PromotionDecision) -> None:
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tags = {
        "promotion.decision": "promoted" if d.promoted else "rejected",
        "promotion.reason": d.reason,
        "promotion.metric": d.metric,
        "promotion.margin": str(d.margin),
        "promotion.challenger_value": _fmt(d.challenger_value),
        "promotion.champion_value": _fmt(d.champion_value),
        "promotion.champion_version": d.champion_version or "none",
        "promotion.baseline_value": _fmt(d.baseline_value),
        "promotion.time": when,
    }
    for k, v in tags.items():
        client.set_model_version_tag(model_name, d.challenger_version, k, v)
    line = (f"[{when}] promotion: {tags['promotion.decision']} - {d.metric} "
            f"challenger v{d.challenger_version} = {_fmt(d.challenger_value)}, champion "
            f"{'v' + d.champion_version if d.champion_version else '(none)'} = "
            f"{_fmt(d.champion_value)}, mean face = {_fmt(d.baseline_value)}, margin "
            f"{d.margin:g}: {d.reason}")
    old = client.get_model_version(model_name, d.challenger_version).description or ""
    client.update_model_version(model_name, d.challenger_version,
                                description=(old + "\n" + line).strip())


@flow(name="promote")
def promote(
    cfg: WildfaceConfig | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    version: str | None = None,
) -> dict:
    """Promote the challenger to champion if it beats the champion (see module doc).

    ``cfg`` (in-process) or ``config`` + ``overrides`` (deployments). Returns the
    decision as a dict.
    """
    from mlflow import MlflowClient

    from flows.tracking import resolve_tracking_uri

    cfg = cfg or load_config(config, overrides)
    uri = resolve_tracking_uri(cfg.tracking, services=cfg.services)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    decision = promote_version(client, cfg.tracking.registered_model, cfg.promotion,
                               challenger_alias=cfg.tracking.alias, version=version)
    logger = get_run_logger()
    # A refused challenger is a broken or tampered model, not a worse one: said loudly.
    say = logger.error if decision.reason.startswith("refused:") else logger.info
    say("promotion of %s v%s: %s (%s)", cfg.tracking.registered_model,
        decision.challenger_version, "promoted" if decision.promoted else "rejected",
        decision.reason)
    return decision.as_dict()
