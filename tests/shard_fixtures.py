"""Random decoded samples (the ``preprocessing.shards`` format) and preprocessing-output
folders made from them, for the tests of the training stores. Imported by test modules."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from preprocessing.manifest import MANIFEST_FILE, manifest_table, table_bytes
from preprocessing.shards import shard_bytes


def random_sample(key: str, identity: str, size: int = 64, seed: int = 0,
                  mask: bool = True) -> dict:
    """A decoded sample of random pixels, landmarks inside the crop and (``mask``) a random
    binary skin mask, else none; the same ``seed`` gives the same sample."""
    rng = np.random.default_rng(seed)
    return {"key": key, "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "landmarks": rng.uniform(-0.4, 0.4, (68, 2)).astype(np.float32),
            "mask": rng.integers(0, 2, (size, size), dtype=np.uint8) * 255 if mask else None,
            "meta": {"identity": identity}}


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_train_split(root: Path, samples: list[dict], per_shard: int,
                      manifest: bool = False) -> Path:
    """``root/shards/train-NNNNNN.tar`` (``per_shard`` samples each),
    ``root/identities.json`` (the train lists from the samples' ``meta["identity"]``) and,
    with ``manifest``, ``root/manifest.parquet`` (a row per sample: its shard and identity)."""
    (root / "shards").mkdir(parents=True)
    rows = []
    for i in range(0, len(samples), per_shard):
        shard = f"shards/train-{i // per_shard:06d}.tar"
        raw = []
        for s in samples[i:i + per_shard]:
            lmk = io.BytesIO()
            np.save(lmk, s["landmarks"])
            raw.append({"key": s["key"], "jpg": _encoded(s["image"], "JPEG"),
                        "lmk.npy": lmk.getvalue(), "mask.png": _encoded(s["mask"], "PNG"),
                        "json": json.dumps(s["meta"]).encode()})
            rows.append({"path": f"{s['key']}.jpg", "status": "ok", "reason": "",
                         "identity": s["meta"]["identity"], "split": "train", "shard": shard,
                         "key": s["key"]})
        (root / shard).write_bytes(shard_bytes(raw))
    if manifest:
        (root / MANIFEST_FILE).write_bytes(table_bytes(manifest_table(
            {k: pa.array([r[k] for r in rows]) for k in rows[0]})))
    lists: dict[str, list[str]] = {}
    for s in samples:
        lists.setdefault(s["meta"]["identity"], []).append(s["key"])
    (root / "identities.json").write_text(json.dumps({"train": lists, "val": {}}))
    return root
