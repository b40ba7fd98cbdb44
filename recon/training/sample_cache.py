"""A split's decoded samples on local disk, memory-mapped: training sets larger than RAM.

:meth:`SampleStore.from_samples <recon.training.data.SampleStore.from_samples>` keeps every
decoded sample in the process (about 260 kB per 256x256 sample, so ~26 GB per 100k images
and per rank). A cache folder holds the same samples once, decoded, in fixed-size arrays;
:func:`cached_store` writes it on first use and then reads it through ``np.memmap``: a batch
touches only its own pages, the OS page cache is shared by the loader workers and by every
rank on a node, and later runs over the same source reuse the folder instead of decoding the
shards again.

Layout of a cache folder (``<root>/<digest of the source>``)::

    index.json      {"format", "source", "count", "height", "width", "keys",
                     "identities" (per key, from the samples' meta; null entries allowed),
                     "has_mask" (per key)}
    images.u8       (N, H, W, 3) uint8, C order
    masks.u8        (N, H, W) uint8; zeros where a sample has no mask
    landmarks.f32   (N, 68, 2) little-endian float32, the image convention [-1, 1]

The folder is built under a temporary name (``.<digest>.partial-<host>-<pid>-<random>``) and
renamed into place complete, so a reader never sees a partial cache; two processes building
the same one (ranks of a node that read the whole split) both succeed and one copy is kept;
the next build removes what a killed writer of this host left behind. All samples of a cache have one image
size (preprocessing's crops do); another size is refused, naming the sample.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from recon.training.data import Record, SampleStore, group_by_identity, record_from_sample

CACHE_FORMAT = 1
INDEX_FILE = "index.json"
_ARRAYS = {"images": ("images.u8", np.uint8), "masks": ("masks.u8", np.uint8),
           "landmarks": ("landmarks.f32", np.dtype("<f4"))}


def cache_folder(root: str | os.PathLike, source: str) -> Path:
    """The cache folder of ``source`` (any string naming what the samples are, e.g. their
    shard URLs) under ``root``."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{source}".encode()).hexdigest()[:20]
    return Path(root) / digest


def _read_index(folder: Path) -> dict | None:
    try:
        return json.loads((folder / INDEX_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _partial_prefix(folder: Path) -> str:
    return f".{folder.name}.partial-{socket.gethostname()}-"


def _remove_dead_partials(folder: Path) -> None:
    """Delete the half-written copies of ``folder`` left by killed writers on this host (a
    crash skips the writer's own cleanup); those of live processes stay."""
    prefix = _partial_prefix(folder)
    for path in folder.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def write_sample_cache(samples: Iterable[Mapping], folder: str | os.PathLike,
                       source: str) -> Path:
    """Decode-once copy of ``samples`` (the decoded sample dicts of
    ``preprocessing.shards`` / ``recon.synth``) into ``folder``, streaming: memory stays at
    one sample. Returns ``folder``. Raises ValueError on an empty input, a repeated key or a
    sample whose size differs from the first one's."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(folder)
    partial = folder.parent / f"{_partial_prefix(folder)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        keys: list[str] = []
        identities: list[str | None] = []
        has_mask: list[bool] = []
        size: tuple[int, int] | None = None
        seen: set[str] = set()
        files = {name: open(partial / fname, "wb") for name, (fname, _) in _ARRAYS.items()}
        try:
            for sample in samples:
                rec = record_from_sample(sample)
                if rec.key in seen:
                    raise ValueError(f"sample {rec.key} appears twice (cache {folder})")
                shape = rec.image.shape[:2]
                if size is None:
                    size = shape
                elif shape != size:
                    raise ValueError(f"sample {rec.key}: image {shape[0]}x{shape[1]}, but the "
                                     f"cache's samples are {size[0]}x{size[1]}; a cache holds "
                                     "one image size (preprocess to one crop size)")
                mask = rec.mask if rec.mask is not None else np.zeros(shape, np.uint8)
                files["images"].write(np.ascontiguousarray(rec.image).tobytes())
                files["masks"].write(np.ascontiguousarray(mask).tobytes())
                files["landmarks"].write(rec.landmarks.astype("<f4").tobytes())
                seen.add(rec.key)
                keys.append(rec.key)
                identities.append(rec.identity)
                has_mask.append(rec.mask is not None)
            for fh in files.values():
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            for fh in files.values():
                fh.close()
        if size is None:
            raise ValueError(f"no samples to cache (cache {folder})")
        index = {"format": CACHE_FORMAT, "source": source, "count": len(keys),
                 "height": size[0], "width": size[1], "keys": keys,
                 "identities": identities, "has_mask": has_mask}
        (partial / INDEX_FILE).write_text(json.dumps(index))
        try:
            os.rename(partial, folder)
        except OSError:
            # Another process finished the same cache first, or a stale folder is in the way.
            if _read_index(folder) != index:
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


class MappedRecords(Mapping[str, Record]):
    """The records of a cache folder, by key, read through ``np.memmap`` (each ``[key]``
    copies out one sample). Pickles as its folder name, so loader workers started by
    ``spawn`` and Ray actors reopen the files instead of receiving the arrays."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = _read_index(self.folder)
        if index is None or index.get("format") != CACHE_FORMAT:
            raise FileNotFoundError(f"{self.folder}: not a complete sample cache "
                                    f"(format {CACHE_FORMAT})")
        self.source: str = index["source"]
        self.keys_list: list[str] = index["keys"]
        self.row = {k: i for i, k in enumerate(self.keys_list)}
        self.identity_of: dict[str, str | None] = dict(zip(self.keys_list, index["identities"]))
        self.has_mask: list[bool] = index["has_mask"]
        n, h, w = index["count"], index["height"], index["width"]
        shapes = {"images": (n, h, w, 3), "masks": (n, h, w), "landmarks": (n, 68, 2)}
        self.arrays = {name: np.memmap(self.folder / fname, dtype=dtype, mode="r",
                                       shape=shapes[name])
                       for name, (fname, dtype) in _ARRAYS.items()}

    def __getitem__(self, key: str) -> Record:
        i = self.row[key]
        return Record(key=key, identity=self.identity_of[key],
                      image=np.array(self.arrays["images"][i]),
                      mask=np.array(self.arrays["masks"][i]) if self.has_mask[i] else None,
                      landmarks=np.array(self.arrays["landmarks"][i], dtype=np.float32))

    def __contains__(self, key: object) -> bool:
        return key in self.row  # Mapping's default would read the sample

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_list)

    def __len__(self) -> int:
        return len(self.keys_list)

    def __reduce__(self):
        return (MappedRecords, (str(self.folder),))


def cached_store(samples: Callable[[], Iterable[Mapping]], root: str | os.PathLike,
                 source: str, identities: Mapping[str, Sequence[str]] | None = None
                 ) -> SampleStore:
    """A :class:`SampleStore` over the cache of ``source`` under ``root``: reused when
    complete, else built from ``samples()`` first (only then is it called). ``identities``
    as for :meth:`SampleStore.from_samples` (None: from the samples' meta)."""
    folder = cache_folder(root, source)
    index = _read_index(folder)
    if index is None or index.get("format") != CACHE_FORMAT or index.get("source") != source:
        write_sample_cache(samples(), folder, source)
    records = MappedRecords(folder)
    if identities is None:
        identities = group_by_identity(records.identity_of)
    return SampleStore(records, identities)


__all__ = ["CACHE_FORMAT", "MappedRecords", "cache_folder", "cached_store",
           "write_sample_cache"]
