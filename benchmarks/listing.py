"""The preprocessing pipeline's own planning of a VGGFace2-sized dataset, on generated names.

Names in VGGFace2's layout (``train/n000002/0001_01.jpg``; 9131 identities, 3.31 M images,
8631 of them in train/ and 500 in test/, 362 images a person) are generated in memory, never
as files, and go through what the driver of ``wildface preprocess`` does
(:mod:`preprocessing.pipeline`): the scan (the VGGFace2 reader's listing of the folder and
the hashing of the inputs), the resume check (the records already made, the inputs left to
do: what Ray Data is handed), then, once the records are there, the plan (identities
namespaced by source, the identity-disjoint split, the shard layout and their digests) and
the manifest's and identities.json's bytes. The per-image work is stubbed: the folder's
listing returns the generated names, a file's sha256 is that of its name, and the records
the actors would write are written as parts of ``--part-rows`` records each ("ok", no
image bytes). Printed: seconds per step and the peak resident memory of the process after
each step (``getrusage``, MB). Goal: 3.3 M names under a minute and 2 GiB.

    .venv/bin/python benchmarks/listing.py [--names 3310000] [--val-fraction 0.2]

Figures with the machine they ran on: docs/benchmarks.md ("Dataset listing at scale").
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import pyarrow as pa
import pyarrow.compute as pc

VGGFACE2_IDENTITIES = 9131
VGGFACE2_TEST_IDENTITIES = 500


def vggface2_names(n: int, identities: int = VGGFACE2_IDENTITIES) -> pa.Array:
    """``n`` relative paths in VGGFace2's layout, spread evenly over ``identities`` people
    (the last ``VGGFACE2_TEST_IDENTITIES`` of them under test/), as one Arrow column."""
    chunks = []
    for i in range(min(n, identities)):
        count = n // identities + (i < n % identities)
        split = "test" if i >= identities - VGGFACE2_TEST_IDENTITIES else "train"
        chunks.append(pa.array([f"{split}/n{i + 2:06d}/{j // 3 + 1:04d}_{j % 3 + 1:02d}.jpg"
                                for j in range(count)], pa.string()))
    return pa.chunked_array(chunks, pa.string()).combine_chunks()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def cpu_seconds() -> float:
    """This process's CPU time (all threads): on a shared machine, the figure that does
    not depend on what else runs."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _stub_records(todo: pa.Table, work: str, part_rows: int) -> None:
    """The parts the actors would write for ``todo``: every image "ok", no image bytes."""
    import io

    import pyarrow.parquet as pq

    from infra import storage
    from preprocessing.pipeline import PART_SCHEMA

    for start in range(0, todo.num_rows, part_rows):
        rid = todo["rid"].slice(start, part_rows)
        n = len(rid)
        t = pa.table({"rid": rid, "sha256": todo["sha256"].slice(start, part_rows),
                      "status": pa.repeat("ok", n), "reason": pa.repeat("", n),
                      "meta": pa.repeat("{}", n), "n_faces": pa.repeat(pa.scalar(1, pa.int32()), n),
                      "detector_score": pa.repeat(pa.scalar(1.0, pa.float32()), n),
                      "landmark_source": pa.repeat("the dataset's face", n)})
        t = pa.table({f.name: t[f.name] if f.name in t.column_names else pa.nulls(n, f.type)
                      for f in PART_SCHEMA}, schema=PART_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(t, buf)
        storage.write_bytes(storage.join(work, f"part-{start:09d}.parquet"), buf.getvalue())


def run(n: int, val_fraction: float = 0.2, seed: int = 0, part_rows: int = 100_000) -> dict:
    """Generate ``n`` names and plan them as ``wildface preprocess`` would -> figures and the
    manifest's table (``table``)."""
    import hashlib
    import tempfile
    from unittest import mock

    from infra import storage
    from preprocessing import datasets, pipeline
    from preprocessing.config import PreprocessConfig
    from preprocessing.manifest import identities_bytes, table_bytes

    # Embeddings (512 bytes an image with dlib's) are a per-image product: left out.
    cfg = PreprocessConfig(embedding="none", val_fraction=val_fraction, seed=seed)
    root = "/vggface2"
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    peaks: dict[str, int] = {}
    cpu_at = [cpu_seconds()]

    def step(name: str, t0: float) -> None:
        times[name] = time.perf_counter() - t0
        cpu[name] = cpu_seconds() - cpu_at[0]
        peaks[name] = round(peak_rss_mb())

    def start() -> float:
        cpu_at[0] = cpu_seconds()
        return time.perf_counter()

    t = start()
    names = vggface2_names(n)
    step("generate", t)

    real_list = storage.list_files
    folder = {root: names}
    del names

    def list_files(where):  # the folder as storage lists it: full paths, sorted
        if where not in folder:
            return real_list(where)
        return pc.binary_join_element_wise(where, folder[where], "/").to_pylist()

    def file_sha(uri):
        return hashlib.sha256(uri.encode()).hexdigest()

    with tempfile.TemporaryDirectory(prefix="wildface-listing-") as out, \
            mock.patch.object(storage, "list_files", list_files), \
            mock.patch.object(datasets, "_file_sha", file_sha):
        work = pipeline.work_dir(out, cfg)
        t = start()
        inputs = pipeline.scan_inputs(f"vggface2={root}", cfg)
        folder.clear()
        step("scan", t)

        t = start()
        todo = pipeline.todo_items(inputs, pipeline.load_records(work, ["rid"]))
        step("resume_check", t)

        _stub_records(todo, work, part_rows)  # the actors' work: not the driver's
        del todo

        t = start()
        the_plan = pipeline.plan(inputs, pipeline.load_records(work), cfg)
        del inputs
        step("records_and_plan", t)

        t = start()
        size = len(table_bytes(the_plan.manifest))
        identities_size = len(identities_bytes(the_plan.identities))
        step("parquet", t)
    steps = ("scan", "resume_check", "records_and_plan", "parquet")
    return {"names": n, "seconds": {k: round(v, 2) for k, v in times.items()},
            "total_seconds": round(sum(times[k] for k in steps), 2),
            "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
            "total_cpu_seconds": round(sum(cpu[k] for k in steps), 2),
            "peak_rss_mb": peaks, "manifest_bytes": size, "identities_bytes": identities_size,
            "shards": len(the_plan.digests), "table": the_plan.manifest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", type=int, default=3_310_000)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--part-rows", type=int, default=100_000)
    args = ap.parse_args()
    out = run(args.names, args.val_fraction, part_rows=args.part_rows)
    table = out.pop("table")
    out["identities"] = {s: len(pc.unique(pc.filter(table["identity"],
                                                     pc.equal(table["split"], s))))
                         for s in ("train", "val")}
    out["machine"] = f"{platform.processor() or platform.machine()}, {platform.python_version()}"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
