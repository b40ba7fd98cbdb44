"""Prefect flow ``preprocess``: one task per pipeline stage, retries where work is
transient (storage I/O, the Ray stage). The stages are in :mod:`preprocessing.pipeline`;
they are idempotent, so a retried task redoes only what is missing. No result caching:
the pipeline's own content hashes decide what to skip."""
from __future__ import annotations

from contextlib import nullcontext

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import load_config
from flows.ray_cluster import ray_for_flow
from infra import storage
from preprocessing import pipeline
from preprocessing.datasets import LayoutError


def _not_a_layout_error(task, task_run, state) -> bool:
    """Retry what may pass (storage I/O), not an input laid out wrongly: it stays wrong."""
    try:
        state.result()
    except LayoutError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=_not_a_layout_error)
def scan(inputs: str | list[str], cfg, fmt: str | None = None):
    return pipeline.scan_inputs(inputs, cfg, fmt)


@task(retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def process(inputs, output: str, cfg, storage_cfg, use_ray: bool) -> dict:
    work = pipeline.work_dir(output, cfg)
    items = pipeline.todo_items(inputs, pipeline.load_records(work, ["rid"]))
    get_run_logger().info("%d of %d images need processing", len(items), len(inputs))
    # Connected here so the run's page links to its Ray job; the pipeline then reuses Ray.
    on_ray = ray_for_flow(cfg.ray, log_to_driver=False) if use_ray and items else nullcontext()
    with on_ray:
        return {"todo": len(items),
                **pipeline.process_images(items, work, cfg, storage_cfg, use_ray)}


@task(cache_policy=NO_CACHE)
def plan(inputs, output: str, cfg):
    return pipeline.plan(inputs, pipeline.load_records(pipeline.work_dir(output, cfg)), cfg)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def write_shards(output: str, the_plan) -> int:
    return pipeline.write_shards(output, the_plan)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def write_outputs(output: str, the_plan) -> dict:
    return pipeline.write_outputs(output, the_plan)


@flow(name="preprocess", log_prints=True)
def preprocess(input: str | list[str], output: str, config: str | None = None,
               overrides: list[str] | None = None, use_ray: bool = True,
               format: str | None = None) -> dict:
    """Photos under ``input`` (folder or s3:// prefix read as dataset ``format``, default
    ``folders``; or ``NAME=ROOT`` pairs, one per dataset: :mod:`preprocessing.datasets`)
    -> WebDataset shards, manifest and identities under ``output``. ``config``: YAML file or
    configs/ name; ``overrides``: ``preprocess.key=value`` strings. A local ``output`` is
    locked while the flow runs (``infra.storage.OutputLocked`` at once when another run holds
    it)."""
    cfg_all = load_config(config, overrides)
    cfg, storage_cfg = cfg_all.preprocess, cfg_all.storage
    storage.configure(storage_cfg)
    with storage.output_lock(output):
        inputs = scan(input, cfg, format)
        counts = process(inputs, output, cfg, storage_cfg, use_ray)
        the_plan = plan(inputs, output, cfg)
        n = write_shards(output, the_plan)
        written = write_outputs(output, the_plan)
    summary = pipeline.summarise(the_plan) | {
        "processed": counts.get("todo", 0), "shards_written": n,
        "files_written": [k for k, v in written.items() if v]}
    get_run_logger().info("preprocess summary: %s", summary)
    return summary
