"""Configuration sections of the infrastructure layer: storage and local services."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from recon.config import StrictModel


class StorageConfig(StrictModel):
    """Where ``s3://`` URIs are served from. Local paths need no settings."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint (e.g. http://127.0.0.1:9000); default: $AWS_ENDPOINT_URL"
    )
    region: str = Field("us-east-1", description="S3 region name")
    multipart_threshold_mb: int = Field(
        64, ge=5, description="uploads larger than this use a multipart upload"
    )


class ServicesConfig(StrictModel):
    """Local services started by ``wildface services up``; loopback only."""

    state_dir: str = Field(
        ".wildface-services", description="pids, logs, databases and artifacts of the services"
    )
    host: str = Field("127.0.0.1", pattern=r"^(127\.\d+\.\d+\.\d+|localhost)$",
                      description="bind address: loopback only")
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    database: str | None = Field(
        None, pattern=r"^postgres(ql)?://",
        description="PostgreSQL server of the Prefect server and MLflow's backend store: "
        "postgresql://USER[:PASSWORD]@HOST[:PORT][?OPTIONS], no database name (they use "
        "prefect_database and mlflow_database there, created if missing); None = sqlite "
        "files in the state dir")
    prefect_database: str = Field("prefect", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                  description="the Prefect server's database on `database`")
    mlflow_database: str = Field("mlflow", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                 description="MLflow's backend store on `database`")
    artifacts: str | None = Field(
        None, description="MLflow's artifact store: s3://bucket/prefix (endpoint: "
        "$AWS_ENDPOINT_URL, the moto server with s3) or a folder; None = "
        "<state_dir>/mlflow/artifacts")
    s3: bool = Field(False, description="also start a moto S3 server")
    s3_port: int = Field(5555, ge=1, le=65535)
    ray: bool = Field(True, description="also start a Ray head with its dashboard, token "
                      "authentication on (jobs attach to it through $RAY_ADDRESS and the "
                      "token file's $RAY_AUTH_TOKEN_PATH from `services env`)")
    ray_port: int = Field(6379, ge=1, le=65535, description="the Ray head's GCS port")
    ray_dashboard_port: int = Field(8265, ge=1, le=65535)
    ray_client_port: int = Field(10001, ge=1, le=65535,
                                 description="the Ray head's client server (ray://)")
    work_pool: str = Field("wildface", description="Prefect process work pool of the worker")
    worker_query_seconds: int = Field(2, ge=1, description="how often the worker polls")
    start_timeout_s: float = Field(
        300.0, gt=0, description="wait this long for each service to be healthy (a loaded "
        "2-core machine took ~2 min for the Prefect server)")

    @field_validator("database")
    @classmethod
    def _server_only(cls, url: str | None) -> str | None:
        # One server, two databases: a name in the URL would say which one it is not.
        if url is not None and urlsplit(url).path not in ("", "/"):
            raise ValueError("name the PostgreSQL server only (postgresql://USER@HOST:PORT); "
                             "the databases are services.prefect_database and "
                             "services.mlflow_database")
        return url

    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()


class RayStartConfig(StrictModel):
    """Where a job's Ray runs (:func:`infra.ray_connect.start_or_attach`): an existing
    cluster, else the one ``$RAY_ADDRESS`` names (``wildface services env`` sets it), else a
    private local Ray in this process, on 127.0.0.1. Every Ray section derives from it."""

    address: str | None = Field(
        None, description="existing cluster ('auto', 'ray://host:10001', 'host:6379'); "
        "None = $RAY_ADDRESS, else start a private local Ray in this process"
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a private local Ray (None = all); ignored when attaching"
    )
    include_dashboard: bool = Field(
        False, description="private local Ray: serve the dashboard (~1 GiB more memory)"
    )
    dashboard_port: int = Field(8265, ge=1, le=65535)


class RayPoolConfig(RayStartConfig):
    """A Ray Data actor pool (``preprocessing.ray_data.map_actor_pool``): where it runs
    (:class:`RayStartConfig`) and how wide."""

    workers: int = Field(2, ge=1, description="actors in the pool")
    cpus_per_worker: float = Field(
        0.5, gt=0, description="fractional, so actors and tasks don't deadlock on 2 cores")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs per actor (fractions share one); Ray hides the GPUs from "
        "actors that ask for none, so device auto needs this > 0 to use them")


class RayConfig(RayStartConfig):
    """Ray Train jobs (``flows/train.py``): the cluster, the workers and the run storage."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL, AMP (train.amp)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0, description="used when use_gpu")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra custom resources per worker"
    )
    storage_path: str = Field(
        "runs/ray", description="checkpoints and run state: a local folder (shared by all "
        "nodes on a cluster) or s3://bucket/prefix"
    )
    max_failures: int = Field(
        2, ge=-1, description="worker-group restarts from the latest checkpoint (-1 = no limit)"
    )
    checkpoints_to_keep: int = Field(2, ge=1)


class TrackingConfig(StrictModel):
    """MLflow tracking and registry (``flows/tracking.py``)."""

    uri: str | None = Field(
        None, description="tracking URI; None = $MLFLOW_TRACKING_URI, else the MLflow "
        "server of `wildface services` when it is up, else a sqlite store in the output folder"
    )
    experiment: str = Field("wildface", description="MLflow experiment name")
    registered_model: str = Field("wildface-deca", description="registry name of the model")
    alias: str = Field("challenger", description="alias given to each new version")
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    figure_every: int = Field(200, ge=1, description="steps between figure artifacts")
    figure_images: int = Field(4, ge=1, le=16, description="fixed validation images per figure")
    system_metrics: bool = Field(True, description="CPU/memory/GPU figures of the run")
