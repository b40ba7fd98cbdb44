"""The training samples of a data folder: a preprocessing output (shards + identities.json,
local or s3://) or a ``wildface synth`` folder, held in memory or in a local memory-mapped
cache (``data.cache_dir``, :mod:`recon.training.sample_cache`).

Used by ``wildface train`` (one process) and by each Ray Train worker (:mod:`flows.train`);
no Prefect or Ray here, so the CLI stays light.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from infra import storage


def is_synth_folder(data: str) -> bool:
    from recon.synth.generate import PARAMS_FILE

    return not storage.is_s3(data) and (Path(data) / PARAMS_FILE).is_file()


def synth_digest(data: str) -> str:
    """sha256 of a synth folder's ``params.json`` (its ground truth: names the set)."""
    from recon.synth.generate import PARAMS_FILE

    return hashlib.sha256((Path(data) / PARAMS_FILE).read_bytes()).hexdigest()


def _shards_source(urls: Sequence[str]) -> str:
    # Local shards also by size and mtime, so a rewritten shard invalidates its cache.
    def stamp(url: str) -> list:
        try:
            st = os.stat(url)
        except OSError:
            return [url]
        return [url, st.st_size, st.st_mtime_ns]

    return json.dumps({"shards": [stamp(u) for u in urls]})


def _store(samples: Callable[[], Iterable[Mapping]], source: str,
           identities: Mapping[str, Sequence[str]] | None, cache_dir: str | None):
    from recon.training.data import SampleStore
    from recon.training.sample_cache import cached_store

    if cache_dir is None:
        return SampleStore.from_samples(samples(), identities)
    return cached_store(samples, cache_dir, source, identities)


def _identities_in(data: str, part: Sequence[str], k_images: int = 1) -> int | None:
    """How many identities with at least ``k_images`` images the shards ``part`` of a
    preprocessing output hold, counted in its manifest (no shard is read); None when it has
    no manifest."""
    from preprocessing.manifest import MANIFEST_FILE, read_manifest

    if not storage.exists(storage.join(data, MANIFEST_FILE)):
        return None
    rows = read_manifest(data)
    # Manifest shards are relative ("shards/train-000000.tar"); URLs end with the same name.
    names = {url.rsplit("/", 1)[-1] for url in part}
    in_part = rows["shard"].map(lambda shard: shard.rsplit("/", 1)[-1] in names)
    sizes = rows.loc[(rows["status"] == "ok") & in_part, "identity"].value_counts()
    return int((sizes >= k_images).sum())


def rank_store(data: str, rank: int, world: int, n_identities: int,
               cache_dir: str | None = None, k_images: int = 1):
    """The samples rank ``rank`` of ``world`` trains on -> (SampleStore, own_shards).

    ``own_shards`` True: the rank read only its own part (shards ``r::W`` of a preprocessing
    output, identities ``r::W`` of a synth folder) and draws batches from all of it; False:
    the parts would hold fewer than ``n_identities`` identities (of at least ``k_images``
    images: the batches' K, see :class:`recon.training.data.IdentityBatchSampler`) each, so
    every rank read the whole split and the trainer strides batches by rank. ``cache_dir``: keep the samples in
    a memory-mapped cache there (built on first use, reused after) instead of in memory.
    """
    if is_synth_folder(data):
        from recon.synth import iter_samples
        from recon.synth.samples import load_params

        names = sorted(load_params(data)["identities"])
        mine = names[rank::world]
        root = str(Path(data).resolve())
        digest = synth_digest(data)

        def source(part: Sequence[str]) -> str:
            return json.dumps({"synth": root, "params_sha256": digest, "identities": list(part)})

        if world > 1 and len(mine) >= n_identities:
            return _store(lambda: iter_samples(data, set(mine)), source(mine), None,
                          cache_dir), True
        return _store(lambda: iter_samples(data), source(names), None, cache_dir), False

    from preprocessing.shards import iter_samples, read_split

    urls, identities = read_split(data, "train")
    if world > 1 and len(urls) >= world:
        part = urls[rank::world]
        # The manifest says whether the part is enough before anything is decoded or cached.
        counted = _identities_in(data, part, k_images)
        if counted is None or counted >= n_identities:
            store = _store(lambda: iter_samples(part), _shards_source(part), identities,
                           cache_dir)
            if sum(len(keys) >= k_images for keys in store.identities.values()) >= n_identities:
                return store, True
    return _store(lambda: iter_samples(urls), _shards_source(urls), identities,
                  cache_dir), False
