"""Settings that keep Ray, Prefect and MLflow on loopback, applied by the project itself.

Every entry point (CLI, flows, services, tests) calls :func:`apply_offline_env` before
importing those libraries, so no user shell setting is needed for a machine with no
internet. Values the user already set are kept.
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE_ENV: dict[str, str] = {
    # Ray: no usage stats, reports to loopback, local dashboard without token auth,
    # single node bound to loopback.
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    # Prefect: no telemetry.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    # MLflow: no telemetry, no background job runners.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # Hubs: never reach them.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def _ensure_ray_bootstrap_config() -> None:
    """Ray's dashboard probes cloud metadata addresses unless this file says 'local'."""
    path = Path.home() / "ray_bootstrap_config.yaml"
    if not path.exists():
        try:
            path.write_text("provider: {type: local}\n")
        except OSError:
            pass


def apply_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    _ensure_ray_bootstrap_config()
