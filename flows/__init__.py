"""Orchestration: Prefect flows, the CLI and the wiring to Ray, MLflow and storage."""
from infra.offline import apply_offline_env

apply_offline_env()
