"""The manifest: one Parquet row per INPUT file, and identities.json."""
from __future__ import annotations

import io
import json
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra import storage

MANIFEST_FILE = "manifest.parquet"  # under the preprocessing output
IDENTITIES_FILE = "identities.json"  # {split: {identity: [keys]}}, beside it

SCHEMA = pa.schema([
    ("path", pa.string()),          # relative to the input root, '/' separators
    ("status", pa.string()),        # ok | rejected
    ("reason", pa.string()),        # why rejected ('' when ok)
    ("identity", pa.string()),
    ("split", pa.string()),         # train | val | ''
    ("shard", pa.string()),         # e.g. shards/train-000000.tar
    ("key", pa.string()),           # sample key in the shard
    ("sha256", pa.string()),        # of the input file's bytes
    ("n_faces", pa.int32()),
    ("detector_score", pa.float32()),
    ("landmark_source", pa.string()),
    ("identity_distance", pa.float32()),  # to the identity's mean embedding (label check)
    # Where the input came from (preprocessing/datasets.py); empty/null for a plain folder.
    ("source", pa.string()),        # the dataset: vggface2, celeba, aflw, bupt, voxceleb2, ...
    ("source_identity", pa.string()),  # the identity as the source names it (identity: namespaced)
    ("race", pa.string()),          # BUPT-Balancedface's race folder
    ("frame", pa.int32()),          # frame index of a video input
    ("dataset_box", pa.list_(pa.float32())),  # the dataset's face box (x0, y0, x1, y1), pixels
    ("dataset_landmarks", pa.list_(pa.list_(pa.float32()))),  # the dataset's points (K, 2),
    # in its own order (5: eyes, nose, mouth corners; AFLW: 21), NaN where not annotated
])


#: A rejected row's value of every column but path.
REJECTED = {"status": "rejected", "reason": "", "identity": "", "split": "", "shard": "",
            "key": "", "sha256": "", "n_faces": 0, "detector_score": None,
            "landmark_source": "", "identity_distance": None, "source": "",
            "source_identity": "", "race": "", "frame": None, "dataset_box": None,
            "dataset_landmarks": None}


def manifest_table(columns: Mapping[str, pa.Array | pa.ChunkedArray]) -> pa.Table:
    """The manifest built column-wise (millions of rows without a Python object each):
    ``columns`` by name, of one length; a column not given holds a rejected row's value
    (:data:`REJECTED`) in every row. Sorted by path."""
    n = len(columns["path"])
    table = pa.table({f.name: columns[f.name].cast(f.type) if f.name in columns
                      else pa.repeat(pa.scalar(REJECTED[f.name], f.type), n) for f in SCHEMA},
                     schema=SCHEMA)
    return sort_by_path(table)


def sort_by_path(table: pa.Table, column: str = "path") -> pa.Table:
    """``table`` sorted by its ``path`` (or ``column``) column; as it is when it already is
    (a listing usually is: one pass instead of a sort)."""
    path = table[column]
    if len(path) < 2 or pc.all(pc.less_equal(path[:-1], path[1:])).as_py():
        return table
    return table.sort_by(column)


def table_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes of a manifest table."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_manifest(output: str):
    """The manifest of a preprocessing output as a pandas DataFrame."""
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, MANIFEST_FILE)))).to_pandas()


def identities_bytes(samples: pa.Table) -> bytes:
    """identities.json, {split: {identity: [keys]}} as ``json.dumps(.., sort_keys=True,
    indent=1)`` writes it, from the columns ``split``, ``identity``, ``key`` sorted in that
    order (keys: hex, nothing to escape), an identity's keys joined at a time."""
    if not samples.num_rows:
        return b"{}"
    out = io.StringIO()
    last_split = None
    codes = pc.dictionary_encode(pc.binary_join_element_wise(
        samples["split"], samples["identity"], "\n")).combine_chunks().indices.to_numpy()
    edges = np.flatnonzero(np.diff(codes)) + 1
    keys = samples["key"]
    for a, b in zip(np.r_[0, edges].tolist(), np.r_[edges, len(codes)].tolist()):
        split, identity = samples["split"][a].as_py(), samples["identity"][a].as_py()
        if split != last_split:
            out.write(("{\n" if last_split is None else "\n },\n")
                      + f" {json.dumps(split)}: {{\n")
            last_split = split
        else:
            out.write(",\n")
        out.write(f"  {json.dumps(identity)}: [\n   \"")
        out.write('",\n   "'.join(keys.slice(a, b - a).to_pylist()))
        out.write('"\n  ]')
    out.write("\n }\n}")
    return out.getvalue().encode()


def write_if_changed(uri: str, data: bytes) -> bool:
    """Atomic write unless ``uri`` already holds exactly ``data``; True when written."""
    if storage.exists(uri) and storage.read_bytes(uri) == data:
        return False
    storage.write_bytes(uri, data)
    return True
