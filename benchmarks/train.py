"""Ray Train throughput: samples/s of the coarse stage with 1 and 2 workers, and the loader.

For each worker count, a coarse-stage TorchTrainer run (gloo on CPU, NCCL on GPU) of
``--steps`` steps on a synthetic set; the training samples/s of all ranks comes from the
``time/samples_per_s`` metric rank 0 logs to MLflow (first ``--warmup`` steps dropped), and
the wall time of the whole run (Ray start, worker group, data loading, checkpoints) is
reported next to it. Then the data loader alone (``recon.training.data.make_train_loader``,
0 and 2 loader processes, the same batches and augmentation) in samples/s, to compare with
what one step consumes: data loading must never be the bottleneck.

    .venv/bin/python benchmarks/train.py [--config demo] [--steps 30] [--workers 1 2]
    .venv/bin/python benchmarks/train.py --config paper --gpu   # on a GPU machine

On a cluster (``--address host:port``, nodes without a shared disk): the synthetic photos
are preprocessed on the cluster into ``--s3``, which also holds Ray Train's storage, and the
coarse stage runs one worker per node (all of a node's CPUs). A first run of ``--warmup``
steps is not counted (the nodes' one-off imports and caches); then a run of ``--steps``
steps: samples/s per node over its whole wall time (worker group start, samples read from
S3, checkpoints written to S3), and rank 0's rate at its last step. Run it with 1 and 2 nodes of
the test cluster to compare (goal: the 2-node figure >= 0.9 x the 1-node one):

    python tests/netns_cluster.py --nodes 2 -- .venv/bin/python benchmarks/train.py \\
        --address 10.213.7.1:6379 --steps 12 --warmup 4

Figures with the machine they ran on are in docs/training-at-scale.md (2-core CPU shared with
other jobs, demo config: 1 worker 4.3 samples/s, 2 workers 8.0 samples/s; loader 333-418
samples/s).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synth_set(root: Path, cfg) -> str:
    from recon.synth import generate

    out = root / "synth"
    if not (out / "params.json").is_file():
        generate(out, cfg.synth, cfg.face_model)
    return str(out)


def ray_throughput(config: str, overrides: list[str], data: str, workers: int, steps: int,
                   warmup: int, gpu: bool, root: Path) -> dict:
    """samples/s of ``steps`` coarse steps on ``workers`` Ray Train workers."""
    from mlflow.tracking import MlflowClient

    from flows.config import load_config
    from flows.train import run_stage

    cfg = load_config(config, [*overrides, f"train.steps={steps}",
                               f"train.checkpoint_every={steps}", "tracking.log_every=1",
                               f"tracking.figure_every={10 * steps}",
                               f"ray.num_workers={workers}", f"ray.use_gpu={gpu}",
                               f"ray.storage_path={root / 'ray'}"])
    uri = f"sqlite:///{root / 'mlflow.db'}"
    t0 = time.perf_counter()
    result = run_stage(cfg, "coarse", data, root / f"w{workers}", tracking_uri=uri,
                       run_name=f"bench-{workers}w-{time.time_ns()}")
    wall = time.perf_counter() - t0
    client = MlflowClient(uri, uri)
    hist = sorted(client.get_metric_history(result.mlflow_run_id, "time/samples_per_s"),
                  key=lambda m: m.step)
    rates = [m.value for m in hist if m.step > warmup]
    n, k = cfg.train.batch_shape("coarse")
    return {"workers": workers, "device": "cuda" if gpu else "cpu", "batch_per_worker": n * k,
            "samples_per_s": float(np.median(rates)), "steps": steps,
            "wall_s": wall}


def cluster_throughput(config: str, overrides: list[str], root: Path, address: str,
                       s3: str, steps: int, warmup: int) -> dict:
    """samples/s per node of the coarse stage on the cluster at ``address``, one worker per
    node, data and run storage under ``s3``."""
    import ray

    from flows.config import load_config
    from flows.train import run_stage
    from infra import storage
    from infra.ray_connect import start_or_attach
    from preprocessing import pipeline

    cfg = load_config(config, overrides)
    storage.configure(cfg.storage)
    bucket = storage.split_s3(s3)[0]
    if bucket not in {b["Name"] for b in storage._client().list_buckets()["Buckets"]}:
        storage._client().create_bucket(Bucket=bucket)
    storage.put_tree(Path(synth_set(root, cfg)) / "images", storage.join(s3, "photos"))
    data = storage.join(s3, "data")
    start_or_attach(cfg.ray.model_copy(update={"address": address}))
    pipeline.run(storage.join(s3, "photos"), data,
                 cfg.preprocess.model_copy(update={"ray": cfg.preprocess.ray.model_copy(
                     update={"address": address})}), cfg.storage)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    node_cpus = min(n["Resources"].get("CPU", 1.0) for n in nodes)
    for n_steps in (warmup, steps):
        run_cfg = load_config(config, [*overrides, f"train.steps={n_steps}",
                                       f"train.checkpoint_every={n_steps}",
                                       f"ray.address={address}", f"ray.num_workers={len(nodes)}",
                                       f"ray.cpus_per_worker={node_cpus}",
                                       f"ray.storage_path={storage.join(s3, 'ray')}"])
        result = run_stage(run_cfg, "coarse", data, root / f"n{len(nodes)}-{n_steps}",
                           run_name=f"bench-{len(nodes)}n-{n_steps}-{time.time_ns()}")
    n, k = cfg.train.batch_shape("coarse")
    return {"nodes": len(nodes), "cpus_per_node": node_cpus, "batch_per_worker": n * k,
            "steps": steps, "wall_s": round(result.seconds, 1),
            "samples_per_s_per_node": round(steps * n * k / result.seconds, 3),
            "last_step_samples_per_s_rank0": round(result.metrics.get("images_per_s", 0.0), 2)}


def loader_throughput(config: str, overrides: list[str], data: str, batches: int,
                      num_workers: int) -> dict:
    """samples/s of the training DataLoader alone (decode, crop, collate)."""
    from flows.config import load_config
    from recon.synth import iter_samples
    from recon.training.data import (CropAugment, IdentityBatchSampler, SampleStore,
                                     make_train_loader)

    cfg = load_config(config, overrides)
    store = SampleStore.from_samples(iter_samples(data))
    n, k = cfg.train.batch_shape("coarse")
    sampler = IdentityBatchSampler(store.identities, n, k, seed=0)
    d = cfg.data
    augment = CropAugment(out_size=cfg.model.image_size, scale_min=d.scale_min,
                          scale_max=d.scale_max, shift=d.shift, eval_scale=d.eval_scale)
    loader = make_train_loader(store, sampler, augment, num_workers=num_workers)
    it = iter(loader)
    next(it)  # start-up of the loader processes is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    return {"loader_workers": num_workers, "samples_per_s": batches * n * k / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, AMP)")
    ap.add_argument("--loader-batches", type=int, default=20)
    ap.add_argument("--address", default=None,
                    help="a Ray cluster (host:port): data and storage on --s3, samples/s per node")
    ap.add_argument("--s3", default="s3://wildface-bench/train",
                    help="with --address: where the data and Ray Train's storage go")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of this process (default: the cores it may use)")
    args = ap.parse_args()
    from recon.devices import set_cpu_threads

    set_cpu_threads(args.threads)
    from flows.config import load_config

    print(json.dumps({"machine": platform.platform(), "cpus": __import__("os").cpu_count(),
                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                      "config": args.config}))
    with tempfile.TemporaryDirectory(prefix="wildface-bench-") as tmp:
        root = Path(tmp)
        if args.address:
            print(json.dumps(cluster_throughput(args.config, args.overrides, root, args.address,
                                                args.s3, args.steps, args.warmup)), flush=True)
            return
        data = synth_set(root, load_config(args.config, args.overrides))
        for w in args.workers:
            print(json.dumps(ray_throughput(args.config, args.overrides, data, w, args.steps,
                                            args.warmup, args.gpu, root)), flush=True)
        for nw in (0, 2):
            print(json.dumps(loader_throughput(args.config, args.overrides, data,
                                               args.loader_batches, nw)), flush=True)


if __name__ == "__main__":
    main()
