"""The listing, manifest and split of a VGGFace2-sized dataset, on generated names.

Names in VGGFace2's layout (``train/n000002/0001_01.jpg``; 9131 identities, 3.31 M images,
8631 of them in train/ and 500 in test/, 362 images a person) are generated in memory, never
as files, and handed to the VGGFace2 reader's listing (:func:`preprocessing.datasets.
vggface2_listing`); its entries become manifest columns (path, identity namespaced by the
source, source columns), the identity-disjoint split (:func:`preprocessing.split.
split_column`) and the Parquet bytes of the manifest. Printed: seconds per step and the
peak resident memory of the process after each step (``getrusage``, MB). Goal: 3.3 M names under a minute and
2 GiB.

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


def run(n: int, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Generate ``n`` names, list them, build the manifest and split -> figures and the
    manifest's table (``table``)."""
    from preprocessing.config import PreprocessConfig
    from preprocessing.datasets import vggface2_listing
    from preprocessing.manifest import manifest_table, table_bytes
    from preprocessing.split import split_column

    times: dict[str, float] = {}
    peaks: dict[str, int] = {}
    t = time.perf_counter()
    names = vggface2_names(n)
    times["generate"] = time.perf_counter() - t
    peaks["generate"] = round(peak_rss_mb())

    t = time.perf_counter()
    listing = vggface2_listing(names, {}, PreprocessConfig())
    del names
    times["listing"] = time.perf_counter() - t
    peaks["listing"] = round(peak_rss_mb())

    t = time.perf_counter()
    source = "vggface2"
    ok = pc.equal(listing["reason"], "")
    identity = pc.if_else(ok, pc.binary_join_element_wise(source, listing["label"], "/"), "")
    split = pc.if_else(ok, split_column(identity, val_fraction, seed), "")
    table = manifest_table({
        "path": pc.binary_join_element_wise(source, listing["rel"], "/"),
        "status": pc.if_else(ok, "ok", "rejected"), "reason": listing["reason"],
        "identity": identity, "split": split, "source": pa.repeat(source, len(ok)),
        "source_identity": pc.fill_null(listing["label"], "")})
    del listing
    times["manifest_and_split"] = time.perf_counter() - t
    peaks["manifest_and_split"] = round(peak_rss_mb())

    t = time.perf_counter()
    size = len(table_bytes(table))
    times["parquet"] = time.perf_counter() - t
    peaks["parquet"] = round(peak_rss_mb())
    return {"names": n, "seconds": {k: round(v, 2) for k, v in times.items()},
            "total_seconds": round(sum(v for k, v in times.items() if k != "generate"), 2),
            "peak_rss_mb": peaks, "manifest_bytes": size, "table": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", type=int, default=3_310_000)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    args = ap.parse_args()
    out = run(args.names, args.val_fraction)
    table = out.pop("table")
    out["identities"] = {s: len(pc.unique(pc.filter(table["identity"],
                                                     pc.equal(table["split"], s))))
                         for s in ("train", "val")}
    out["machine"] = f"{platform.processor() or platform.machine()}, {platform.python_version()}"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
