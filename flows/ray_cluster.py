"""Connecting to Ray (local or an existing cluster) and the settings of Ray Train jobs.

Light on purpose: :func:`setup_worker` runs in every Ray worker process of the job
(``worker_process_setup_hook``), so this module imports nothing heavy at load time.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from infra import storage
from infra.config import RayConfig
from infra.offline import apply_offline_env

# Without the dashboard, Ray Train's placement-group cleaner cannot reach the state API and
# warns every second for the whole run; the cleanup it guards still happens at shutdown.
_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: offline settings, quiet the noisy loggers."""
    apply_offline_env()
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(rc: RayConfig) -> None:
    """Connect to ``rc.address`` or start a local Ray (no-op when already connected).

    A local Ray binds loopback, has ``rc.num_cpus`` CPUs and serves the dashboard on
    ``127.0.0.1:rc.dashboard_port`` when ``rc.include_dashboard``."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": "flows.ray_cluster.setup_worker"}
    if rc.address:
        ray.init(address=rc.address, runtime_env=runtime_env)
        return
    ray.init(num_cpus=rc.num_cpus, include_dashboard=rc.include_dashboard,
             dashboard_host="127.0.0.1", dashboard_port=rc.dashboard_port,
             runtime_env=runtime_env)


def check_gpus(needed: float, field: str, address: str | None) -> None:
    """Refuse a GPU request that the local Ray cannot meet: Ray would wait forever to place
    the workers. A cluster given by ``address`` may autoscale, so it is not checked."""
    import ray

    if address or needed <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if needed > have:
        raise ValueError(f"{field}: {needed:g} GPU(s) asked for, but the local Ray has "
                         f"{have:g}")


def scaling_config(rc: RayConfig):
    """Ray Train ``ScalingConfig``: workers, CPU/GPU and extra resources per worker."""
    from ray.train import ScalingConfig

    resources = {"CPU": rc.cpus_per_worker, **rc.resources_per_worker}
    if rc.use_gpu:
        resources["GPU"] = rc.gpus_per_worker
    return ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu,
                         resources_per_worker=resources)


def run_storage(rc: RayConfig, endpoint: str | None, region: str) -> tuple[str, Any]:
    """Ray's ``storage_path`` (absolute for a local folder) and filesystem: an explicit
    pyarrow S3 filesystem when an S3 endpoint is configured (moto, MinIO), else Ray's own
    resolution of ``s3://`` (AWS)."""
    path = rc.storage_path
    if not storage.is_s3(path):
        return storage.absolute(path), None
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return path, None
    import pyarrow.fs

    # Credentials travel with the (pickled) filesystem to the controller and the workers,
    # whose environment may predate them.
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region=region,
                                 scheme="https" if endpoint.startswith("https") else "http",
                                 access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                                 secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    return path[len("s3://"):], fs
