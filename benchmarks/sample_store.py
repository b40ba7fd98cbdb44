"""Training samples in memory vs in the memory-mapped cache: build time, resident memory,
batch time.

Each mode runs in its own process (resident memory is per process): it builds a store of
``--samples`` decoded 256x256 samples (random pixels: decoding is not what is measured),
then times ``--batches`` training batches (DECA's crop augmentation to ``--crop`` px, batch
``--batch``). Printed per mode: build seconds, resident memory (RSS: private and
mapped-file) after building and after the batches, and ms per batch; for the cache also its
size on disk. A second cached run over the same folder shows the reuse (no rebuild).

    .venv/bin/python benchmarks/sample_store.py [--samples 4000] [--batches 50]

Figures with the machine they ran on: docs/training.md ("Samples larger than memory").
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def rss_mb() -> dict[str, float]:
    """Resident memory of this process, MB (Linux /proc): ``anon`` (private: what each process
    and rank pays) and ``file`` (mapped file pages: shared page cache, reclaimable)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {name: int(fields[key].split()[0]) / 1024
            for name, key in (("anon", "RssAnon"), ("file", "RssFile"))}


def grown(now: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    return {k: round(now[k] - base[k], 1) for k in now}


def samples(n: int, size: int = 256):
    for i in range(n):
        rng = np.random.default_rng(i)
        yield {"key": f"p{i // 4:06d}/{i % 4}",
               "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
               "landmarks": rng.uniform(-0.35, 0.35, (68, 2)).astype(np.float32),
               "mask": np.full((size, size), 255, np.uint8),
               "meta": {"identity": f"p{i // 4:06d}"}}


def one_mode(mode: str, n: int, batches: int, batch: int, crop: int, cache: str) -> dict:
    from recon.training.data import CropAugment, IdentityBatchSampler, SampleStore
    from recon.training.sample_cache import cache_folder, cached_store

    torch.set_num_threads(1)
    base = rss_mb()
    t = time.perf_counter()
    if mode == "memory":
        store = SampleStore.from_samples(samples(n))
    else:
        store = cached_store(lambda: samples(n), cache, f"benchmark {n}")
    build = time.perf_counter() - t
    after_build = rss_mb()
    sampler = IdentityBatchSampler(store.identities, batch // 2, 2, seed=0)
    augment = CropAugment(out_size=crop)
    stream = sampler.iter_from(0)
    t = time.perf_counter()
    for _ in range(batches):
        step, keys = next(stream)
        store.batch(keys, augment, True, torch.Generator().manual_seed(step))
    per_batch = (time.perf_counter() - t) / batches
    out = {"mode": mode, "samples": n, "build_s": round(build, 2),
           "rss_after_build_mb": grown(after_build, base),
           "rss_after_batches_mb": grown(rss_mb(), base),
           "ms_per_batch": round(per_batch * 1000, 1)}
    if mode != "memory":
        folder = cache_folder(cache, f"benchmark {n}")
        out["cache_mb"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--mode", choices=["memory", "cache"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.samples, args.batches, args.batch,
                                  args.crop, args.cache)))
        return
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}, torch "
          f"{torch.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as cache:
        for mode in ("memory", "cache", "cache"):  # the second cached run reuses the folder
            cmd = [sys.executable, __file__, "--mode", mode, "--cache", cache,
                   "--samples", str(args.samples), "--batches", str(args.batches),
                   "--batch", str(args.batch), "--crop", str(args.crop)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            print(res.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
