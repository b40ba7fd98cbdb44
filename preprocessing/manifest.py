"""The manifest: one Parquet row per INPUT file, and identities.json."""
from __future__ import annotations

import io
import json
from collections.abc import Mapping

import pyarrow as pa
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


def manifest_row(path: str, reason: str, sha256: str) -> dict:
    """A rejected row of ``path`` with every column present; the plan fills in the rest."""
    return {"path": path, "status": "rejected", "reason": reason, "identity": "", "split": "",
            "shard": "", "key": "", "sha256": sha256, "n_faces": 0, "detector_score": None,
            "landmark_source": "", "identity_distance": None, "source": "",
            "source_identity": "", "race": "", "frame": None, "dataset_box": None,
            "dataset_landmarks": None}


def manifest_table(columns: Mapping[str, pa.Array | pa.ChunkedArray]) -> pa.Table:
    """The manifest built column-wise (millions of rows without a Python object each):
    ``columns`` by name, of one length; a column not given holds a rejected row's value
    (:func:`manifest_row`) in every row. Sorted by path."""
    n = len(columns["path"])
    fill = manifest_row("", "", "")
    table = pa.table({f.name: columns[f.name].cast(f.type) if f.name in columns
                      else pa.repeat(pa.scalar(fill[f.name], f.type), n) for f in SCHEMA},
                     schema=SCHEMA)
    return table.sort_by("path")


def table_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes of a manifest table."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def manifest_bytes(rows: list[dict]) -> bytes:
    """Deterministic Parquet bytes of the rows (sorted by path)."""
    rows = sorted(rows, key=lambda r: r["path"])
    return table_bytes(pa.Table.from_pylist(rows, schema=SCHEMA))


def read_manifest(output: str):
    """The manifest of a preprocessing output as a pandas DataFrame."""
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, MANIFEST_FILE)))).to_pandas()


def identities_bytes(groups: dict[str, dict[str, list[str]]]) -> bytes:
    """{split: {identity: [keys]}} as canonical JSON."""
    return json.dumps(groups, sort_keys=True, indent=1).encode()


def write_if_changed(uri: str, data: bytes) -> bool:
    """Atomic write unless ``uri`` already holds exactly ``data``; True when written."""
    if storage.exists(uri) and storage.read_bytes(uri) == data:
        return False
    storage.write_bytes(uri, data)
    return True
