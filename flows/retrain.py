"""Prefect flow ``retrain``: preprocess what is new, train, evaluate, promote — the existing
flows composed as subflows, run on a cron schedule.

1. ``preprocess`` the input location (``retrain.input``: a folder or s3:// prefix) into
   ``OUT/data``; the preprocessing is incremental (content hashes), so only new or changed
   photos are processed. With fewer than ``retrain.min_new_images`` new photos (and no
   ``force``) the run stops here: nothing to learn from.
2. ``train`` (coarse -> detail on Ray Train) on ``OUT/data`` into ``OUT/train``; the new model
   version is registered with the ``challenger`` alias.
3. ``evaluate`` that version on the NoW-layout dataset (``evaluate_flow.dataset``, else the
   synthetic set); ``now_median`` / ``now_mean`` / ``now_std`` go to its run.
4. ``promote``: the challenger becomes ``champion`` only if it beats it (``promotion.*``).

Schedule: ``retrain.cron`` (default Sundays 03:00 UTC). ``prefect.yaml``'s deployment
``retrain/scheduled`` carries the same cron (a test keeps them equal);
``python -m flows.retrain [CONFIG]`` serves the flow on the configured schedule instead.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from infra.offline import apply_offline_env

apply_offline_env()

from prefect import flow, get_run_logger  # noqa: E402

from flows.config import load_config  # noqa: E402


@flow(name="retrain", log_prints=True)
def retrain(
    input: str | None = None,
    out: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    dataset: str | None = None,
    force: bool = False,
    use_ray_preprocess: bool = True,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Preprocess new photos under ``input`` (default ``retrain.input``), train, evaluate on
    ``dataset`` (default ``evaluate_flow.dataset``, else synthetic), promote. ``out``
    (default ``retrain.out``) holds data, train and eval; ``force`` retrains even without new
    photos. Returns what each step did."""
    from flows import tracking
    from flows.evaluate import evaluate
    from flows.preprocess import preprocess
    from flows.promote import promote
    from flows.train import train

    logger = get_run_logger()
    cfg = load_config(config, overrides)  # validated before any work
    rc = cfg.retrain
    source = input or rc.input
    if not source:
        logger.warning("no input location (pass input= or set retrain.input): nothing to do")
        return {"skipped": "no input location"}
    out_path = Path(out or rc.out).resolve()
    data = str(out_path / "data")
    pre = preprocess(input=source, output=data, config=config, overrides=overrides,
                     use_ray=use_ray_preprocess)
    new = int(pre.get("processed", 0))
    if new < rc.min_new_images and not force:
        logger.info("%d new photo(s) < retrain.min_new_images=%d: not retraining", new,
                    rc.min_new_images)
        return {"preprocess": pre, "skipped": f"{new} new photo(s)"}
    uri = tracking.resolve_tracking_uri(cfg.tracking, out_path, cfg.services, given=tracking_uri)
    trained = train(data=data, out=str(out_path / "train"), config=config, overrides=overrides,
                    tracking_uri=uri)
    version = trained["model"]
    evaluated = evaluate(model=version["uri"], dataset=dataset,
                         out=str(out_path / "eval" / f"v{version['version']}"), config=config,
                         overrides=overrides, tracking_uri=uri)
    promoted_cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})})
    decision = promote(cfg=promoted_cfg, version=version["version"])
    print(f"retrain: {new} new photo(s) -> {version['name']} v{version['version']} "
          f"(now_median {evaluated['metrics']['now_median']:.3f} mm): "
          f"{'promoted' if decision['promoted'] else 'not promoted'} ({decision['reason']})")
    return {"preprocess": pre, "model": version, "evaluation": evaluated["metrics"],
            "promotion": decision, "tracking_uri": uri}


def serve(config: str | None = None, overrides: list[str] | None = None) -> None:
    """Serve ``retrain`` in this process on the configured cron (``retrain.cron``)."""
    from prefect.schedules import Cron

    cfg = load_config(config, overrides)
    retrain.serve(name="scheduled",
                  schedules=[Cron(cfg.retrain.cron, timezone=cfg.retrain.timezone)],
                  parameters={"config": config, "overrides": overrides or []})


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:])
