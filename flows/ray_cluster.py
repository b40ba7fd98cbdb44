"""Connecting training to Ray (through :mod:`infra.ray_connect`), the settings of Ray
Train jobs and handing the driver's credentials to its workers.

Light on purpose: :func:`setup_worker` runs in every Ray worker process of the job
(``worker_process_setup_hook``), so this module imports nothing heavy at load time.

Credentials never travel in a runtime environment's ``env_vars``: Ray writes those, in
clear, to its logs (``runtime_env_agent.log`` under the session folder, readable by every
local user with Ray's default temp dir). :func:`credentials_file` writes them to a file only
its owner can read and passes its path instead; :func:`setup_worker` loads it. A worker on
another node, where the file does not exist, uses that node's own credentials (instance role
or its environment).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infra import storage
from infra.config import RayConfig, RayStartConfig
from infra.offline import apply_offline_env
from infra.ray_connect import start_or_attach

# Without the dashboard, Ray Train's placement-group cleaner cannot reach the state API and
# warns every second for the whole run; the cleanup it guards still happens at shutdown.
_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)

# The path of the driver's credentials file (:func:`credentials_file`) in a worker's env.
CREDENTIALS_ENV = "WILDFACE_CREDENTIALS_FILE"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_TRACKING_TOKEN")


@contextmanager
def credentials_file() -> Iterator[dict[str, str]]:
    """``env_vars`` entries that hand this process's credentials (:data:`CREDENTIAL_KEYS`
    that are set) to Ray workers: ``{CREDENTIALS_ENV: path}`` of a JSON file in a fresh
    folder only its owner can enter (mode 0700, the file 0600), deleted when the block
    ends; ``{}`` when there is none to hand."""
    from recon.formats.files import atomic_write_bytes

    present = {k: os.environ[k] for k in CREDENTIAL_KEYS if os.environ.get(k)}
    if not present:
        yield {}
        return
    folder = tempfile.mkdtemp(prefix="wildface-credentials-")
    try:
        path = Path(folder) / "credentials.json"
        atomic_write_bytes(path, json.dumps(present).encode())
        path.chmod(0o600)
        yield {CREDENTIALS_ENV: str(path)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_credentials() -> None:
    """Set the variables of the credentials file named by ``$CREDENTIALS_ENV`` in this
    process (a worker); nothing when there is none or it is not on this node."""
    path = os.environ.get(CREDENTIALS_ENV)
    if not path:
        return
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return
    os.environ.update({k: str(v) for k, v in values.items() if k in CREDENTIAL_KEYS})


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: offline settings, the driver's credentials, this
    worker's cluster as ``$RAY_ADDRESS``, quiet the noisy loggers."""
    import ray

    apply_offline_env()
    load_credentials()
    # Ray's own helpers in the job (Ray Train's placement-group cleaner) find their cluster
    # through $RAY_ADDRESS and give up when several Rays run on the machine; workers started
    # by a head (`wildface services`) do not inherit the driver's environment.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(rc: RayConfig) -> None:
    """Start or attach to Ray (:func:`infra.ray_connect.start_or_attach`; no-op when already
    connected) with :func:`setup_worker` as every worker's setup hook; a Prefect flow run is
    linked to its Ray job (:func:`link_ray_job`)."""
    start_or_attach(rc, runtime_env={
        "worker_process_setup_hook": "flows.ray_cluster.setup_worker"})
    link_ray_job()


# The key of the link artifact from a Prefect flow run to its Ray job.
RAY_JOB_ARTIFACT = "ray-job"


def link_ray_job() -> str | None:
    """Link the current Prefect flow run to this process's Ray job on the Ray dashboard: a
    link artifact (key :data:`RAY_JOB_ARTIFACT`) on the run's page in the Prefect UI, one
    click from the job's actors, tasks and logs. Returns the URL; None (nothing recorded)
    outside a flow run, before Ray is connected, or when the cluster serves no dashboard."""
    import ray
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None or not ray.is_initialized():
        return None
    # Ray's own record of the dashboard's address ("host:port"; no public API returns it
    # to a driver that attached rather than started).
    from ray._private.worker import get_dashboard_url

    address = get_dashboard_url()
    if not address:
        return None
    from prefect.artifacts import create_link_artifact

    job = ray.get_runtime_context().get_job_id()
    url = f"http://{address}/#/jobs/{job}"
    create_link_artifact(url, link_text=f"Ray job {job}", key=RAY_JOB_ARTIFACT,
                         description="this run's Ray job: its actors, tasks and logs")
    return url


@contextmanager
def ray_for_flow(rc: RayStartConfig, **options: Any) -> Iterator[None]:
    """Ray for a job run by a flow: started or attached (:func:`start_or_attach`, with
    ``options``), the flow run linked to its Ray job, and shut down after the block when this
    call started it (an attached cluster keeps running)."""
    started = start_or_attach(rc, **options)
    try:
        link_ray_job()
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


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
