"""wildface on a Ray cluster of two hosts with no shared disk (:mod:`netns_cluster`: a head
and a worker node, each in its own network namespace; the worker cannot see the driver's or
the head's files). Data, shards, checkpoints and Ray Train's storage live on S3 (a moto
server on the head's address, the only store both nodes reach).

The driver runs on the head, as a user's would: the functions ``drive_*`` below, started
there by :func:`drive` in a process of their own, write what they saw to a JSON file that
the test reads (``drive_evaluate`` runs on the worker node and prints it instead).

1. cluster helper (fast): namespaces, the private view of the worker, cleanup on failure;
2. one run (slow): photos on S3 preprocessed on Ray Data with an actor on each node into
   shards on S3, then coarse training with one Ray Train worker per node (each node has one
   CPU); the worker node is killed (every process of it at once) once a checkpoint is
   registered and a node started again: the run resumes from the last checkpoint and
   finishes; its model is logged and registered (MLflow server on the head, artifacts on
   S3) and evaluated on the worker node from ``models:/wildface-deca@challenger``, the
   metrics logged to the version's run;
3. what the run needed (fast): gloo's interface is the one holding the node IP; a local
   coarse checkpoint is uploaded to S3 for a cluster named by ``$RAY_ADDRESS``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from netns_cluster import SUBNET, NetnsCluster, s3_env, start_mlflow, start_s3
from reconstruct_fixtures import RAY_TRAIN_TEST_ENV

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
TESTS = Path(__file__).resolve().parent
RUN = "multinode-coarse"
STEPS = 10


# -- the cluster helper --------------------------------------------------------------------------
def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@needs_root
def test_cluster_nodes_are_separate_hosts_and_cleanup_survives_a_failure():
    with pytest.raises(RuntimeError, match="boom"):
        with NetnsCluster() as c:
            secret = c.driver_dir / "driver-only.txt"
            secret.write_text("x")
            head = c.ip["head"]
            serve = ("import socket, time; s = socket.socket(); s.bind(('%s', 7000)); "
                     "s.listen(); c, _ = s.accept(); c.send(b'hello'); time.sleep(600)" % head)
            sleepers = {"head": c._spawn("head", [sys.executable, "-c", serve]),
                        "worker": c._spawn("worker", ["sleep", "600"], private_root=True)}
            dial = ("import socket, time; time.sleep(0.5); "
                    "print(socket.create_connection(('%s', 7000), timeout=10).recv(5))" % head)
            probe = c._spawn("worker", [
                "sh", "-c", f"test -e {secret} && echo seen; ip -4 -o addr show; "
                            f"{sys.executable} -c \"{dial}\""],
                private_root=True, stdout=subprocess.PIPE, text=True)
            out = probe.communicate(timeout=30)[0]
            assert "seen" not in out  # the driver's folder is not on the worker's disk
            assert f"{c.ip['worker']}/24" in out and "b'hello'" in out, out
            assert secret.read_text() == "x"
            pids = [p.pid for p in sleepers.values()]
            for node, p in sleepers.items():
                assert p.pid in c.pids(node)
            names = set(c.netns.values())
            root = c.root
            raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not names & {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()
                and "sleep" in _cmdline(pid)]
    assert not root.exists()


# -- the driver's side (run on the head) -----------------------------------------------------------
def _config(root: Path, address: str, tracking_uri: str) -> Path:
    from reconstruct_fixtures import e2e_tree

    tree = e2e_tree({})
    tree["train"].update(steps=STEPS, pretrain_steps=2, checkpoint_every=2)
    # one figure, at the end: logged by rank 0, wherever it runs, through the server
    tree["tracking"].update(uri=tracking_uri, log_every=2, figure_every=STEPS,
                            system_metrics=False)
    # the evaluation's synthetic NoW-layout set: two subjects of one image
    tree["evaluate_flow"] = {"synthetic_identities": 2, "synthetic_images_per_identity": 1}
    tree["evaluation"] = {"workers": 1, "refine_iters": 3}
    tree["ray"] = {"address": address, "num_workers": 2, "cpus_per_worker": 1,
                   "max_failures": 4, "storage_path": "s3://wfruns/ray"}
    # Two actors of 0.75 CPU cannot share a node of one CPU: one per node.
    tree["preprocess"] = {"ray": {"address": address, "workers": 2, "cpus_per_worker": 0.75,
                                  "batch_size": 3},
                          # all four identities train: both ranks need two each
                          "val_fraction": 0.0}
    # 128 pixels: dlib's detector finds the synthetic faces.
    tree["synth"] = {"identities": 4, "images_per_identity": 3, "image_size": 128}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _preprocess(cfg, root: Path, photos: str, out: str) -> dict:
    """Synthetic photos (with their landmark and mask side files) uploaded to ``photos``,
    then preprocessed (the per-image stages on Ray Data) into ``out``."""
    from infra import storage
    from preprocessing import pipeline as pp
    from recon.synth import generate

    generate(root / "synth", cfg.synth, cfg.face_model)
    storage.put_tree(root / "synth" / "images", photos)
    return pp.run(photos, out, cfg.preprocess, cfg.storage, use_ray=True)


def drive_run(root: str, address: str, tracking_uri: str) -> None:
    """Preprocess, then coarse training on the cluster, its model logged and registered;
    ``root/checkpointed`` appears once Ray has registered a checkpoint (the test kills the
    worker node then)."""
    import threading

    from infra.offline import apply_offline_env

    apply_offline_env()
    from flows import registry
    from flows.config import load_config
    from flows.tracking import _server_answers
    from flows.train import run_stage
    from infra import storage

    root = Path(root)
    cfg = load_config(_config(root, address, tracking_uri))
    storage.configure(cfg.storage)
    for bucket in ("wfdata", "wfruns"):
        storage._client().create_bucket(Bucket=bucket)
    data = "s3://wfdata/set"
    t0 = time.perf_counter()
    pre = _preprocess(cfg, root, "s3://wfdata/photos", data)
    (root / "preprocessed.json").write_text(json.dumps(
        {**pre, "files": storage.list_files(data), "seconds": time.perf_counter() - t0},
        default=str))

    done = threading.Event()

    def watch() -> None:
        # Ray writes this snapshot each time it registers a checkpoint.
        snapshot = f"s3://wfruns/ray/{RUN}/checkpoint_manager_snapshot.json"
        while not done.wait(0.5):
            if storage.exists(snapshot):
                (root / "checkpointed").write_text(storage.read_bytes(snapshot).decode())
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 120
    while not _server_answers(tracking_uri):  # started with the cluster; long up by now
        assert time.monotonic() < deadline, f"no MLflow server at {tracking_uri}"
        time.sleep(0.5)
    try:
        result = run_stage(cfg, "coarse", data, root / "out", run_name=RUN,
                           tracking_uri=tracking_uri)
    finally:
        done.set()
    files = storage.list_files(f"s3://wfruns/ray/{RUN}")
    (root / "coarse.json").write_text(json.dumps({**result.as_dict(), "files": files}))

    # The coarse model as the registered reconstructor: its files go to S3 through the server.
    t0 = time.perf_counter()
    model_uri = registry.log_reconstructor(tracking_uri, cfg, run_id=result.mlflow_run_id,
                                           detail_checkpoint=result.checkpoint,
                                           coarse_checkpoint=result.checkpoint)
    version = registry.register_model(tracking_uri, cfg, model_uri,
                                      run_id=result.mlflow_run_id, data=data)
    (root / "registered.json").write_text(json.dumps(
        {**version, "model_uri": model_uri, "seconds": time.perf_counter() - t0}))


def drive_evaluate(driver_dir: str, address: str, tracking_uri: str) -> None:
    """On the worker node: the registered model (``models:/<name>@<alias>``) evaluated on the
    synthetic NoW-layout set as the ``evaluate`` flow does it (its dataset, predict, score and
    log steps, without a Prefect server), then what the registry, the run and the bucket
    hold. This host sees neither the driver's files nor the head's: the model can only come
    through MLflow, whose artifacts are on S3. Prints the JSON as one line of its own."""
    import hashlib

    from infra.offline import apply_offline_env

    apply_offline_env()
    import boto3
    from mlflow.tracking import MlflowClient

    from flows.config import load_config
    from flows.evaluate import log_task, predict_dataset, synthetic_dataset
    from recon.evaluation.now import evaluate_now

    t0 = time.perf_counter()
    here = Path.cwd()  # the worker's own folder
    cfg = load_config(_config(here, address, tracking_uri))
    tc = cfg.tracking
    out = here / "evaluate"
    data = synthetic_dataset(out / "synthetic", cfg)
    summary, info = predict_dataset(f"models:/{tc.registered_model}@{tc.alias}", data,
                                    out / "predictions", cfg, tracking_uri=tracking_uri,
                                    baseline_out=out / "predictions-mean-face")
    metrics = evaluate_now(data, out / "predictions", out / "now", cfg.evaluation)
    baseline = evaluate_now(data, out / "predictions-mean-face", out / "now-mean-face",
                            cfg.evaluation)
    logged = log_task.fn(info.as_dict(), metrics, str(out), tracking_uri, baseline)

    client = MlflowClient(tracking_uri, tracking_uri)
    mv = client.get_model_version_by_alias(tc.registered_model, tc.alias)
    run = client.get_run(mv.run_id)
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="wfruns", Prefix="mlflow/") for o in page.get("Contents", [])]
    # where the server keeps the model's files: mlflow-artifacts:/<path> -> s3://wfruns/mlflow/<path>
    model_prefix = "mlflow/" + client.get_logged_model(
        info.source["model_id"]).artifact_location.split("mlflow-artifacts:/", 1)[1].strip("/")
    checkpoint = [k for k in keys if k.startswith(model_prefix) and k.endswith(".pt")]
    print(json.dumps({
        "predicted": summary.written, "failed": summary.failed, "model": info.as_dict(),
        "logged": logged, "version": str(mv.version), "aliases": list(mv.aliases),
        "version_run_id": mv.run_id, "version_source": mv.source,
        "run_metrics": run.data.metrics,
        "version_tags": mv.tags, "model_prefix": model_prefix, "keys": keys,
        "checkpoint_sha256": {k: hashlib.sha256(s3.get_object(Bucket="wfruns", Key=k)[
            "Body"].read()).hexdigest() for k in checkpoint},
        "sees_driver_dir": Path(driver_dir).exists(), "here": str(here),
        "run_artifact_uri": run.info.artifact_uri, "seconds": time.perf_counter() - t0}),
          flush=True)


def drive(cluster: NetnsCluster, name: str, *args: str, node: str = "head") -> subprocess.Popen:
    """``drive_<name>(*args)`` in a process on ``node`` (the head: the driver's host and
    folder); its output in the driver's folder (``<name>.log``)."""
    log = open(cluster.driver_dir / f"{name}.log", "ab")
    with log:
        return cluster.run([sys.executable, "-c",
                            f"import sys, test_multinode as t; t.drive_{name}(*sys.argv[1:])",
                            *args], node=node,
                           env={"PYTHONPATH": os.pathsep.join(filter(None, (
                               str(TESTS), os.environ.get("PYTHONPATH")))),
                                **RAY_TRAIN_TEST_ENV},
                           stdout=log, stderr=subprocess.STDOUT)


def _log_tail(cluster: NetnsCluster, name: str) -> str:
    return (cluster.driver_dir / f"{name}.log").read_text()[-4000:]


# -- the cluster run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """Head and worker node up (one CPU each), moto on the head's address."""
    env = {**s3_env(f"{SUBNET}.1"),
           # A lost node is declared dead after ~3 s instead of tens of seconds.
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    with NetnsCluster(env=env) as c:
        c.start_node("head")
        c.start_node("worker")
        start_s3(c)
        c.wait_for_nodes(2)
        yield c


@pytest.fixture(scope="module")
def tracking_uri(cluster) -> str:
    """An MLflow server on the head's address, its artifacts in ``s3://wfruns/mlflow``
    (the driver waits for it: it comes up while the photos are preprocessed)."""
    return start_mlflow(cluster, "s3://wfruns/mlflow")


class Titles(threading.Thread):
    """Samples, five times a second, the Ray process titles (``ray::...``) on each node:
    {node: {title}}."""

    def __init__(self, cluster: NetnsCluster) -> None:
        super().__init__(daemon=True)
        self.cluster, self.done = cluster, threading.Event()
        self.seen: dict[str, set[str]] = {n: set() for n in cluster.NODES}

    def run(self) -> None:
        while not self.done.wait(0.2):
            for node in self.cluster.NODES:
                self.seen[node] |= {t.split()[0] for t in map(_cmdline, self.cluster.pids(node))
                                    if t.startswith("ray::")}

    def on(self, node: str, part: str) -> list[str]:
        return [t for t in self.seen[node] if part in t]


@needs_root
@pytest.mark.slow
def test_preprocess_coarse_register_evaluate_across_nodes_resume_after_losing_a_node(
        cluster, tracking_uri):
    from recon.training.checkpoint import load_checkpoint

    root = cluster.driver_dir
    titles = Titles(cluster)
    titles.start()
    driver = drive(cluster, "run", str(root), cluster.address, tracking_uri)
    deadline = time.monotonic() + 300
    while not (root / "checkpointed").exists():
        assert driver.poll() is None, _log_tail(cluster, "run")
        assert time.monotonic() < deadline, _log_tail(cluster, "run")
        time.sleep(0.2)
    cluster.kill("worker")
    assert driver.poll() is None, "the run finished before the node was lost"
    time.sleep(2)
    cluster.start_node("worker")  # a node returns
    assert driver.wait(timeout=300) == 0, _log_tail(cluster, "run")
    titles.done.set()
    titles.join()
    evaluation = drive(cluster, "evaluate", str(root), cluster.address, tracking_uri,
                       node="worker")
    assert evaluation.wait(timeout=300) == 0, _log_tail(cluster, "evaluate")

    # preprocessing: photos on S3 -> shards on S3, Ray Data actors on both nodes
    pre = json.loads((root / "preprocessed.json").read_text())
    assert pre["ok"] >= 8 and pre["shards_written"] >= 1, pre
    assert {"s3://wfdata/set/manifest.parquet", "s3://wfdata/set/identities.json"} <= \
        set(pre["files"])
    assert all(titles.on(n, "BatchProcessor") for n in cluster.NODES), titles.seen
    # training: one Ray Train worker on each node (each has one CPU)
    assert all(titles.on(n, "RayTrainWorker") for n in cluster.NODES), titles.seen

    result = json.loads((root / "coarse.json").read_text())
    assert result["step"] == STEPS
    # the restarted worker group started from a checkpoint registered before the loss
    assert (root / "checkpointed").read_text()
    assert result["resumed_from"] is not None and 2 <= result["resumed_from"] < STEPS, result
    assert result["resumed_from"] % 2 == 0
    assert result["checkpoint_uri"].startswith(f"wfruns/ray/{RUN}/checkpoint_")
    ckpts = [f for f in result["files"] if f.endswith(".pt")]
    assert ckpts and not [f for f in result["files"] if f.endswith(".tmp")]
    # the final checkpoint, copied to the driver's folder from S3, is complete
    final = load_checkpoint(Path(result["checkpoint"]), stage="coarse")
    assert final["step"] == STEPS and set(final) >= {"model", "optimizer", "step_state"}

    # registration: a new version of the model with the alias, its files on S3 as recorded
    registered = json.loads((root / "registered.json").read_text())
    ev = json.loads([line for line in (root / "evaluate.log").read_text().splitlines()
                     if line.startswith("{")][-1])
    assert ev["version"] == registered["version"] and "challenger" in ev["aliases"]
    assert ev["version_run_id"] == registered["run_id"] == result["mlflow_run_id"]
    keys = set(ev["keys"])
    prefix = ev["model_prefix"]
    assert {f"{prefix}/MLmodel", f"{prefix}/artifacts/config.json",
            f"{prefix}/artifacts/face_model.npz"} <= keys, sorted(keys)
    # the checkpoint in the bucket is the trained one, byte for byte, as the registry records
    ckpt_key = f"{prefix}/artifacts/{Path(result['checkpoint']).name}"
    assert ev["checkpoint_sha256"] == {ckpt_key: ev["version_tags"]["sha256.checkpoint"]}
    assert ev["version_tags"]["sha256.checkpoint"] == hashlib.sha256(
        Path(result["checkpoint"]).read_bytes()).hexdigest()
    # the training run's own files, the figure logged by rank 0 included, are there too
    run_prefix = "mlflow/" + ev["run_artifact_uri"].split("mlflow-artifacts:/", 1)[1].strip("/")
    assert f"{run_prefix}/checkpoint/{Path(result['checkpoint']).name}" in keys
    assert f"{run_prefix}/figures/step_{STEPS:07d}.png" in keys, sorted(keys)

    # evaluation on the worker node, which sees no file of the driver's: the model came
    # through the registry (downloaded into the worker's own folder), the metrics went to
    # the version's run, the curve to S3
    assert not ev["sees_driver_dir"] and ev["here"].startswith(str(cluster.node_dir("worker")))
    model = ev["model"]
    assert model["uri"] == "models:/wildface-deca@challenger"
    assert model["version"] == registered["version"] and model["step"] == STEPS
    assert ev["version_source"] == registered["model_uri"] == f"models:/{model['model_id']}"
    assert model["checkpoint"].startswith(str(cluster.node_dir("worker")))
    assert ev["predicted"] == 2 and not ev["failed"]
    now = {k: v for k, v in ev["run_metrics"].items() if k.startswith("now_")}
    assert now == pytest.approx({k: v for k, v in ev["logged"].items() if k != "run_id"})
    assert now["now_n_images"] == 2 and now["now_n_missing"] == 0
    assert 0 < now["now_median"] < 100  # mm
    assert float(ev["version_tags"]["metric.now_median"]) == pytest.approx(
        now["now_median"], rel=1e-5)
    assert f"{run_prefix}/evaluation/now/metrics.json" in keys


def test_gloo_interface_is_the_one_holding_the_node_ip():
    from flows.ray_process_group import interface_of

    listed = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                            text=True, check=True).stdout
    pairs = [(f[1], f[3].split("/")[0]) for f in (line.split() for line in listed.splitlines())]
    assert pairs
    for name, addr in pairs:
        assert interface_of(addr) == name.split("@")[0]
    assert interface_of("10.213.7.250") is None  # an address of no interface here


def test_a_local_coarse_checkpoint_reaches_a_cluster_named_by_ray_address(moto_s3, tmp_path,
                                                                          monkeypatch):
    from flows.train import resolve_checkpoint
    from infra import storage
    from infra.config import RayConfig, StorageConfig

    storage.configure(StorageConfig())
    storage._client().create_bucket(Bucket="wfinputs")
    ckpt = tmp_path / "coarse-000000004.pt"
    ckpt.write_bytes(b"coarse weights")
    rc = RayConfig(storage_path="s3://wfinputs/ray")
    # the other nodes of a cluster do not see this disk: the file goes next to the runs
    monkeypatch.setenv("RAY_ADDRESS", "10.213.7.1:6379")
    uri = resolve_checkpoint(str(ckpt), tmp_path, None, rc)
    assert uri == "s3://wfinputs/ray/inputs/coarse-000000004.pt"
    assert storage.read_bytes(uri) == b"coarse weights"
    # a Ray on this machine reads it where it is
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert resolve_checkpoint(str(ckpt), tmp_path, None, rc) == str(ckpt.resolve())
