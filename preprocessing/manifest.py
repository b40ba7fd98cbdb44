"""The manifest: one Parquet row per INPUT file, and identities.json."""
from __future__ import annotations

import io
import json

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
])


def manifest_bytes(rows: list[dict]) -> bytes:
    """Deterministic Parquet bytes of the rows (sorted by path)."""
    rows = sorted(rows, key=lambda r: r["path"])
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


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
