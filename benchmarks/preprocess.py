"""Preprocessing throughput: images/s with 1 and 2 Ray Data workers, per-stage time, and
the pipeline's overhead over the raw model calls.

    .venv/bin/python benchmarks/preprocess.py [--images 128] [--side 640]

Inputs: distinct variants (crop, flip, brightness) of scikit-image's astronaut, so every
image has a face and its own content hash. "raw" runs SampleMaker.make on every image in
one process (the model calls plus decode/crop/encode, no Ray, no part files); "pipeline"
times the Ray Data stage (actor pool, part writes) on an already started Ray, so Ray's
own start-up is not counted. Two views of the pipeline:

- total: wall time of the whole stage, including the actors' start-up (process spawn,
  imports, model load), a fixed cost of a few seconds per run;
- steady: images/s between the first and the last finished batch, i.e. with the pool
  running: the rate a real dataset (thousands of images) sees.

Raw runs before and after the pipeline; the faster is the baseline (conservative).
Overhead = raw time per image vs the pipeline's (1 worker); scaling = 2-worker rate /
(2 x 1-worker rate). Goals: overhead <= 15 %, scaling >= 0.9. Figures: docs/preprocessing.md.

On a cluster (``--address host:port``, nodes without a shared disk): the inputs are uploaded
to ``--s3`` and the pipeline reads them and writes its records there, with one actor per
node (each asks for 3/4 of a node's CPUs, so two never share one); reported: images/s per
node, S3 round trips included. Run it with 1 and 2 nodes to compare (goal: the 2-node
figure >= 0.9 x the 1-node one), e.g. on the test cluster (docs/benchmarks.md):

    python tests/netns_cluster.py --nodes 2 -- .venv/bin/python benchmarks/preprocess.py \\
        --address 10.213.7.1:6379 --images 32
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_inputs(root: Path, n: int, side: int) -> None:
    import skimage.data

    base = skimage.data.astronaut()
    rng = np.random.default_rng(0)
    for i in range(n):
        y0, x0 = rng.integers(0, 60, 2)
        img = base[y0:y0 + 440, x0:x0 + 440].astype(np.float32) * rng.uniform(0.8, 1.2)
        img = np.clip(img, 0, 255).astype(np.uint8)
        if i % 2:
            img = img[:, ::-1]
        pil = Image.fromarray(np.ascontiguousarray(img)).resize((side, side), Image.BICUBIC)
        d = root / f"id{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=92)
        (d / f"{i:04d}.jpg").write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--side", type=int, default=640)
    ap.add_argument("--address", default=None,
                    help="a Ray cluster (host:port): inputs and outputs on --s3, images/s per node")
    ap.add_argument("--s3", default="s3://wildface-bench/preprocess",
                    help="with --address: where the inputs and the outputs go")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per actor call (default: preprocess.ray.batch_size)")
    args = ap.parse_args()

    from infra.offline import apply_offline_env

    apply_offline_env()
    import ray

    from infra.config import StorageConfig
    from infra.ray_connect import start_or_attach
    from preprocessing import pipeline
    from preprocessing.config import PreprocessConfig
    from preprocessing.sample import SampleMaker

    tmp = Path(tempfile.mkdtemp(prefix="wf-bench-"))
    make_inputs(tmp / "in", args.images, args.side)
    cfg = PreprocessConfig()
    if args.batch_size:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"batch_size": args.batch_size})})
    inputs = pipeline.scan_inputs(str(tmp / "in"), cfg)
    nothing_done = pipeline.load_records(str(tmp / "no-records"), ["rid"])
    todo = pipeline.todo_items(inputs, nothing_done)
    items = todo.to_pylist()

    t = time.perf_counter()
    maker = SampleMaker(cfg)
    load_s = time.perf_counter() - t
    maker.make(items[0])  # warm-up
    maker.stage_seconds.clear()

    def raw_seconds() -> float:
        t = time.perf_counter()
        for it in items:
            maker.make(it)
        return time.perf_counter() - t

    raw_runs = [raw_seconds()]
    stages = {k: round(v / len(items) * 1000, 2) for k, v in maker.stage_seconds.items()}

    if args.address:
        from infra import storage

        storage.configure(StorageConfig())
        bucket = storage.split_s3(args.s3)[0]
        if bucket not in {b["Name"] for b in storage._client().list_buckets()["Buckets"]}:
            storage._client().create_bucket(Bucket=bucket)
        storage.put_tree(tmp / "in", storage.join(args.s3, "in"))
        run_items = pipeline.todo_items(pipeline.scan_inputs(storage.join(args.s3, "in"), cfg),
                                        nothing_done)
        start_or_attach(cfg.ray.model_copy(update={"address": args.address}),
                        log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        node_cpus = min(n["Resources"].get("CPU", 1.0) for n in nodes)
        widths = {len(nodes): 0.75 * node_cpus}
        out_root = storage.join(args.s3, f"out-{time.time_ns()}")
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        widths = {1: cfg.ray.cpus_per_worker, 2: cfg.ray.cpus_per_worker}
        out_root = str(tmp / "out")
        run_items = todo
    results, steady = {}, {}
    for workers, cpus in widths.items():
        wcfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(
            update={"workers": workers, "cpus_per_worker": cpus})})
        out = f"{out_root}{workers}"
        marks: list[tuple[float, int]] = []
        t = time.perf_counter()
        pipeline.process_images(run_items, pipeline.work_dir(out, wcfg), wcfg,
                                StorageConfig(),
                                on_progress=lambda done, _: marks.append((time.perf_counter(), done)))
        results[workers] = time.perf_counter() - t
        (t_first, n_first), (t_last, n_last) = marks[0], marks[-1]
        steady[workers] = (n_last - n_first) / (t_last - t_first)
    ray.shutdown()
    # Raw again after the pipeline; the faster of the two is the baseline (a VM's speed
    # drifts over minutes: the conservative choice for the overhead figure).
    raw_runs.append(raw_seconds())
    raw_s = min(raw_runs)

    n = len(items)
    if args.address:
        (nodes_n, seconds), = results.items()
        print(json.dumps({
            "nodes": nodes_n, "images": n, "side": args.side, "batch_size": cfg.ray.batch_size,
            "load_average_1m": round(os.getloadavg()[0], 1),
            "raw_images_per_s": round(n / raw_s, 2),
            "images_per_s_per_node": round(n / seconds / nodes_n, 2),
            "steady_images_per_s_per_node": round(steady[nodes_n] / nodes_n, 2)}, indent=1))
        return
    report = {
        "images": n, "side": args.side, "batch_size": cfg.ray.batch_size, "load_average_1m": round(os.getloadavg()[0], 1),
        "model_load_s": round(load_s, 2),
        "raw_images_per_s": round(n / raw_s, 2),
        "raw_images_per_s_before_after": [round(n / r, 2) for r in raw_runs],
        "stage_ms_per_image": stages,
        "pipeline_images_per_s": {w: round(n / s, 2) for w, s in results.items()},
        "overhead_1_worker_pct": round((results[1] / raw_s - 1) * 100, 1),
        # The same without the actor's one-off model load (amortised on real datasets).
        "overhead_1_worker_excl_model_load_pct": round(
            ((results[1] - load_s) / raw_s - 1) * 100, 1),
        "scaling_2_workers": round(results[1] / results[2] / 2, 2),
        "steady_images_per_s": {w: round(r, 2) for w, r in steady.items()},
        "steady_overhead_1_worker_pct": round((n / raw_s / steady[1] - 1) * 100, 1),
        "steady_scaling_2_workers": round(steady[2] / steady[1] / 2, 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
