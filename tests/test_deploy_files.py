"""The deploy files of infra/deploy/, parsed and checked offline.

References: Ray's own cluster-launcher schema (``ray/autoscaler/ray-schema.json``, shipped in
the installed ray package) validates the launcher YAML; Prefect's own
``ProcessJobConfiguration`` renders the work pool's base job template; the KubeRay manifests
use the field names of KubeRay's ``ray.io/v1`` CRDs (checked against their schemas, see
docs/deploy.md); commands in them are checked against the real command tree.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from cli_commands import ROOT, cli_problems, flow_parameters, words_of
from infra.offline import OFFLINE_ENV

DEPLOY = ROOT / "infra" / "deploy"
IMAGE = "wildface:0.1.0"
SECRETISH = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|TOKEN", re.I)
# What the image must set as infra/offline.py does (telemetry and hubs); the loopback-binding
# entries are for one machine, not for cluster nodes.
IMAGE_ENV = ("RAY_USAGE_STATS_ENABLED", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
             "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), lines joined."""
    stages: list[list[tuple[str, str]]] = []
    logical, pending = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        instr, _, args = line.partition(" ")
        if instr.upper() == "FROM":
            stages.append([])
        stages[-1].append((instr.upper(), args.strip()))
    return stages


def test_image_installs_offline_and_runs_unprivileged():
    build, final = dockerfile_stages()
    assert build[0][1].startswith("python:3.11") and final[0][1].startswith("python:3.11")
    pip = [a for i, a in final if i == "RUN" and "pip install" in a]
    assert pip and all(seg.count("--no-index") >= 1
                       for a in pip for seg in a.split("&&") if "pip install" in seg)
    for instr, args in build + final:
        if instr == "COPY" and "--from" not in args:
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    env = {}
    for instr, args in final:
        if instr == "ENV":
            env.update(dict(kv.split("=", 1) for kv in args.split()))
    for key in IMAGE_ENV:
        assert env.get(key) == OFFLINE_ENV[key], key
    user = [a for i, a in final if i == "USER"]
    assert user and user[-1] not in ("0", "root")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env"} <= set(ignored)


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def assert_no_literal_secrets(container: dict) -> None:
    for var in container.get("env", []):
        if SECRETISH.search(var["name"]):
            assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), var["name"]


def test_raycluster_manifest():
    rc = load("kuberay/raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert rc["spec"]["rayVersion"] == importlib.metadata.version("ray")
    head = rc["spec"]["headGroupSpec"]
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    pods = [head["template"]] + [g["template"] for g in groups.values()]
    for pod in pods:
        for c in containers(pod):
            assert c["image"] == IMAGE
            assert_no_literal_secrets(c)
            assert {"secretRef": {"name": "wildface-s3"}} in c.get("envFrom", [])
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
    gpu = containers(groups["gpu"]["template"])[0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in containers(groups["cpu"]["template"])[0]["resources"]["limits"]
    assert head["serviceType"] == "ClusterIP"  # never a public LoadBalancer by default


def test_rayjob_runs_a_real_command_on_s3():
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": load("kuberay/raycluster.yaml")[
        "metadata"]["name"]}
    words = words_of(job["spec"]["entrypoint"], "wildface")
    assert words is not None and cli_problems(words) == []
    opts = dict(zip(words[::1], words[1::1]))
    assert opts["--data"].startswith("s3://")  # no node shares a disk with the driver
    assert "ray.storage_path=s3://wildface-data/ray" in words
    for c in containers(job["spec"]["submitterPodTemplate"]):
        assert c["image"] == IMAGE
        assert_no_literal_secrets(c)


def test_cluster_launcher_config_validates_against_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = load("ray-cluster.yaml")
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["docker"]["image"] == IMAGE
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` (SSH)
    assert not any(SECRETISH.search(k) for k in json.dumps(cfg).split('"'))


def test_prefect_cluster_deployments_and_work_pool():
    from prefect.utilities.templating import apply_values
    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads((DEPLOY / "prefect" / "work-pool.json").read_text())
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    variables = jsonschema.Draft202012Validator(template["variables"])
    # Nothing that runs code can be set by a deployment or a flow run.
    assert not {"command", "env", "working_dir"} & set(template["variables"]["properties"])
    for attack in ({"ray_address": "ray://h:10001", "command": "touch PWNED"},
                   {"ray_address": "ray://h:10001", "env": {"LD_PRELOAD": "/tmp/x.so"}},
                   {"ray_address": "ray://h:10001; touch PWNED"}):
        assert list(variables.iter_errors(attack)), attack
    values = {"ray_address": "ray://wildface-head-svc:10001"}
    assert not list(variables.iter_errors(values))
    # As the worker renders it (Prefect's templating; no server needed for plain values).
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items()
                if "default" in v}
    job = ProcessJobConfiguration(**apply_values(template["job_configuration"],
                                                 defaults | values, remove_notset=True))
    assert job.env["RAY_ADDRESS"] == values["ray_address"] and job.command is None

    spec = load("prefect/cluster-deployments.yaml")
    workdir = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir == "/opt/wildface"  # the image's source tree (Dockerfile)
    for dep in spec["deployments"]:
        _, params = flow_parameters(dep["entrypoint"])
        assert set(dep["parameters"]) <= params, dep["entrypoint"]
        assert dep["work_pool"]["name"] == "wildface-cluster"
        assert not list(variables.iter_errors(dep["work_pool"]["job_variables"]))
        for key, value in dep["parameters"].items():
            if key in ("input", "output", "out"):
                assert str(value).startswith("s3://"), (dep["entrypoint"], key)


def test_compose_services_on_loopback_with_secrets_from_the_env_file():
    compose = load("compose.yaml")
    services = compose["services"]
    assert {"postgres", "prefect", "mlflow", "s3"} <= set(services)
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = dict(line.split("=", 1) for line in
                   (DEPLOY / "services.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), used - set(example)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        for dep in svc.get("depends_on", {}):
            assert dep in services
        for key, value in (svc.get("environment") or {}).items():
            if SECRETISH.search(key):
                assert str(value).startswith("${"), (name, key)
        for mount in svc.get("volumes", []):
            src = mount.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), src
    prefect_env = services["prefect"]["environment"]
    assert services["prefect"]["image"].startswith(
        f"prefecthq/prefect:{importlib.metadata.version('prefect')}-python3.11")
    assert prefect_env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    mlflow = " ".join(services["mlflow"]["command"])
    assert services["mlflow"]["image"] == IMAGE
    assert "--backend-store-uri=postgresql+psycopg2://" in mlflow and "--allowed-hosts=" in mlflow


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                                  "ray-cluster.yaml", "compose.yaml",
                                  "prefect/cluster-deployments.yaml"])
def test_every_deploy_file_is_checked_here(name):
    assert (DEPLOY / name).exists()


def test_no_unchecked_deploy_file():
    checked = {"Dockerfile", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
               "ray-cluster.yaml", "compose.yaml", "postgres-init.sql", "services.env.example",
               "prefect/cluster-deployments.yaml", "prefect/work-pool.json"}
    present = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert present == checked
