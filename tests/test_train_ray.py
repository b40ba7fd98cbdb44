"""Ray Train stages end to end on a tiny synthetic set, 2 CPU workers (gloo), checkpoints on a
moto S3 server, metrics in a sqlite MLflow store started here.

Few Ray runs on purpose (each costs ~40 s of fixed overhead on 2 cores):
1. coarse, 4 steps, checkpoints at 2 and 4; rank 1 dies once after step 3: the worker group
   restarts from the step-2 checkpoint and finishes; every stored checkpoint is complete;
2. the Prefect ``train`` flow with the same coarse run name and 6 steps: the coarse stage
   resumes at step 4 (a second run resuming the first), then the detail stage starts from
   the coarse checkpoint, the model is registered (alias challenger), loads with
   ``mlflow.pyfunc.load_model`` and reconstructs an image; each stage's progress line
   reaches the driver's terminal once.

Security, checked on these runs: every socket that a process of the runs listens on is on
127.0.0.1 (the process group's store included, which torch binds to every interface by
default), and the S3 secret (a canary) is in no file of Ray's session folder, neither the
one the workers inherit nor one handed through ``flows.ray_cluster.credentials_file``.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from reconstruct_fixtures import TINY

pytestmark = pytest.mark.slow

# Merged into the `e2e` fixture's tiny run (conftest.py): two Ray workers, checkpoints on S3.
E2E_CONFIG = {
    "train": {"steps": 4, "pretrain_steps": 2},
    "ray": {"num_cpus": 2, "num_workers": 2, "cpus_per_worker": 1, "max_failures": 2,
            "storage_path": "s3://wfruns/ray"},
    "synth": {"identities": 8, "images_per_identity": 3, "image_size": 96},
}
RUN = "test-coarse"
# moto takes any credentials: the secret is a canary searched for in Ray's logs.
CANARY = f"canary-secret-{uuid.uuid4().hex}"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        out.append(todo.pop())
        todo += kids.get(out[-1], [])
    return out


def _address(hex_addr: str) -> str:
    """/proc/net/tcp{,6} local address (host byte order words) -> IP text."""
    import ipaddress

    if len(hex_addr) == 8:
        return str(ipaddress.IPv4Address(bytes.fromhex(hex_addr)[::-1]))
    raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, 32, 8))
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped or ip)


def listening(pid: int) -> list[str]:
    """Addresses ('ip:port') that process ``pid`` listens on (TCP, v4 and v6)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
                  for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
        tables = [Path(f"/proc/{pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
    except OSError:  # gone, or a descriptor closed while reading
        return []
    out = []
    for table in tables:
        for line in table.splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr, port = f[1].split(":")
                out.append(f"{_address(addr)}:{int(port, 16)}")
    return out


class ListenerWatch(threading.Thread):
    """Samples, twice a second, the listening sockets of this process and its descendants
    (Ray's daemons and workers): {(process name, 'ip:port')}."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[tuple[str, str]] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for pid in _descendants(os.getpid()):
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                except OSError:
                    continue
                self.seen |= {(name, a) for a in listening(pid)}


def ray_session_files() -> list[Path]:
    """Every file under the session folder of the Ray this process runs."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [f for f in session.rglob("*") if f.is_file() and not f.is_symlink()]


@pytest.fixture(scope="module")
def env(moto_s3, e2e):
    """The tiny run (``e2e``; Ray is shut down before the S3 server stops) and its runs
    bucket."""
    from infra import storage

    os.environ["AWS_SECRET_ACCESS_KEY"] = CANARY  # moto_s3 puts the old value back
    storage.configure(e2e.cfg.storage)
    storage._client().create_bucket(Bucket="wfruns")
    # The workers keep their samples in the memory-mapped cache (built by the first run).
    tree = yaml.safe_load(e2e.config.read_text())
    tree.setdefault("data", {})["cache_dir"] = str(e2e.root / "cache")
    e2e.config.write_text(yaml.safe_dump(tree))
    return {"root": e2e.root, "config": e2e.config, "data": str(e2e.data),
            "uri": e2e.tracking_uri}


@pytest.fixture(scope="module")
def faulty_coarse(env, tmp_path_factory):
    """Run 1: coarse with a worker killed once after step 3."""
    from flows.config import load_config
    from flows.train import FAULT_ENV, run_stage

    marker = env["root"] / "killed-once"
    os.environ[FAULT_ENV] = f"rank=1,step=3,marker={marker}"
    watch = ListenerWatch()
    watch.start()
    try:
        result = run_stage(load_config(env["config"]), "coarse", env["data"],
                           env["root"] / "out-1", run_name=RUN, tracking_uri=env["uri"])
    finally:
        os.environ.pop(FAULT_ENV)
        watch.done.set()
        watch.join()
    return result, marker, watch.seen


def test_everything_listens_on_loopback_only(faulty_coarse):
    seen = faulty_coarse[2]
    workers = {a for name, a in seen if "RayTrainWorker" in name}
    assert workers, f"no training worker seen listening: {sorted(seen)}"
    assert not [s for s in seen if not s[1].startswith("127.0.0.1:")], sorted(seen)


def test_killed_worker_resumes_from_last_checkpoint(env, faulty_coarse):
    from mlflow.tracking import MlflowClient

    from infra import storage
    from recon.training.checkpoint import load_checkpoint

    result, marker, _ = faulty_coarse
    assert marker.read_text().startswith("killed rank 1 after step 3")
    assert result.step == 4
    # the restarted worker group loaded the step-2 checkpoint (rank 0's last report)
    assert result.resumed_from == 2
    assert result.checkpoint_uri.startswith("wfruns/ray/" + RUN)

    # every checkpoint in S3 is complete: one loadable file per folder, no temporary files
    files = storage.list_files(f"s3://wfruns/ray/{RUN}")
    ckpts = [f for f in files if f.endswith(".pt")]
    assert ckpts and not [f for f in files if f.endswith(".tmp")]
    steps = []
    for uri in ckpts:
        local = env["root"] / "dl" / uri.rsplit("/", 2)[-2] / uri.rsplit("/", 1)[-1]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(storage.read_bytes(uri))
        ckpt = load_checkpoint(local, stage="coarse")
        steps.append(ckpt["step"])
        assert set(ckpt) >= {"model", "optimizer", "config", "step_state"}
    assert max(steps) == 4
    # each rank cached its own 4 identities once; the restarted group reused those caches
    assert len(list((env["root"] / "cache").iterdir())) == 2

    # metrics, params, figures and the checkpoint reached MLflow
    client = MlflowClient(env["uri"], env["uri"])
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.checkpoint_every"] == "2"
    assert run.data.tags["wildface.stage"] == "coarse"
    history = client.get_metric_history(result.mlflow_run_id, "loss/landmarks")
    assert {m.step for m in history} == {1, 2, 3, 4}
    assert all(np.isfinite(m.value) for m in history)
    assert client.get_metric_history(result.mlflow_run_id, "time/step_s")
    figures = [f.path for f in client.list_artifacts(result.mlflow_run_id, "figures")]
    assert "figures/step_0000004.png" in figures
    assert [f.path for f in client.list_artifacts(result.mlflow_run_id, "checkpoint")] == \
        ["checkpoint/coarse-000000004.pt"]
    assert Path(result.figure).is_file()


def test_train_flow_resumes_trains_detail_and_registers(env, faulty_coarse, prefect_server,
                                                        monkeypatch, capfd):
    import mlflow
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from flows.train import train

    # Paths relative to the caller's folder (Ray Train runs its workers elsewhere).
    monkeypatch.chdir(env["root"])
    out = train(data="synth", out="out-2", config="tiny.yaml", overrides=["data.cache_dir=cache"],
                coarse_overrides=["train.steps=6"], detail_overrides=["train.steps=2"],
                run_name=RUN.removesuffix("-coarse"), tracking_uri=env["uri"])
    assert out["coarse"]["resumed_from"] == 4 and out["coarse"]["step"] == 6
    assert out["detail"]["step"] == 2 and out["detail"]["resumed_from"] is None

    # Each stage's progress line reaches the driver once (Ray forwards the workers' output
    # a moment later: wait for the last one).
    printed = ""
    for _ in range(50):
        printed += "".join(capfd.readouterr())
        if "detail: 2/2 steps" in printed:
            break
        time.sleep(0.2)
    lines = printed.splitlines()
    for final in ("coarse: 6/6 steps, ", "detail: 2/2 steps, "):
        assert len([x for x in lines if final in x]) == 1, [x for x in lines if final in x]

    client = MlflowClient(env["uri"], env["uri"])
    detail_run = client.get_run(out["detail"]["mlflow_run_id"])
    parent_id = detail_run.data.tags["mlflow.parentRunId"]
    assert client.get_run(out["coarse"]["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == \
        parent_id
    assert client.get_metric_history(detail_run.info.run_id, "loss/photometric_detail")

    version = client.get_model_version_by_alias("wildface-deca", "challenger")
    assert str(version.version) == out["model"]["version"]
    assert version.run_id == detail_run.info.run_id
    assert version.tags["data_root"] == env["data"]
    assert "metric.detail.loss" in version.tags

    mlflow.set_tracking_uri(env["uri"])
    model = mlflow.pyfunc.load_model("models:/wildface-deca@challenger")
    image_path = sorted(Path(env["data"], "images").rglob("*.jpg"))[0]
    image = np.asarray(Image.open(image_path).convert("RGB"))
    pred = model.predict(image)
    assert pred["shape"].shape == (1, TINY["face_model.n_shape"])
    assert pred["detail"].shape == (1, TINY["model.n_detail"])
    V = pred["vertices"].shape[1]
    assert pred["vertices"].shape == pred["neutral_vertices"].shape == (1, V, 3)
    assert pred["faces"].max() == V - 1
    assert pred["detail_vertices"].shape == (1, 3, 32, 32)
    assert np.isfinite(pred["vertices"]).all()


def test_more_gpus_than_the_local_ray_has_fail_at_once(env):
    # Ray Train would otherwise wait forever to place the workers.
    import torch

    from flows.config import load_config
    from flows.train import run_stage

    cfg = load_config(env["config"], ["ray.use_gpu=true",
                                      f"ray.gpus_per_worker={torch.cuda.device_count() + 1}"])
    with pytest.raises(ValueError, match=r"ray.num_workers x ray.gpus_per_worker \(ray.use_gpu\): "
                                         r"\d+ GPU\(s\) asked for, but the local Ray has \d+"):
        run_stage(cfg, "coarse", env["data"], env["root"] / "out-gpu", run_name="gpu")


def test_credentials_reach_workers_but_not_rays_logs(env, faulty_coarse, monkeypatch):
    """After both runs (their workers had the canary): no file of Ray's session holds it.
    A secret set after Ray started (so no Ray process inherited it) reaches a task through
    the credentials file, and is not logged either."""
    import ray

    from flows.ray_cluster import credentials_file

    late = f"late-{CANARY}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", late)

    @ray.remote
    def secret() -> str | None:
        return os.environ.get("AWS_SECRET_ACCESS_KEY")

    with credentials_file() as credentials:
        path = Path(credentials["WILDFACE_CREDENTIALS_FILE"])
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        got = ray.get(secret.options(runtime_env={"env_vars": credentials}).remote())
    assert got == late
    assert not path.exists()
    time.sleep(1)  # Ray's log writers flush once a second
    leaks = [str(f) for f in ray_session_files() if CANARY.encode() in f.read_bytes()]
    assert not leaks
