"""WebDataset shards: the writer (deterministic tar bytes) and the readers training uses.

A sample is ``{key}.jpg`` (RGB crop), ``{key}.lmk.npy`` ((68, 2) float32, normalised crop
coordinates), ``{key}.mask.png`` (L, 255 = skin) and ``{key}.json`` (meta). Decoded samples
are dicts ``{key, image (H, W, 3) uint8, landmarks (68, 2) float32, mask (H, W) uint8,
meta}``.
"""
from __future__ import annotations

import io
import json
import tarfile
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from infra import storage
from preprocessing.manifest import IDENTITIES_FILE

MEMBERS = ("jpg", "lmk.npy", "mask.png", "json")


def shard_bytes(samples: Iterable[dict]) -> bytes:
    """Tar bytes of samples ``{key, jpg, lmk.npy, mask.png, json}`` (bytes values).
    Identical input gives identical bytes (fixed mtime/owner), so rewrites are no-ops."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in MEMBERS:
                data = sample[ext]
                info = tarfile.TarInfo(f"{sample['key']}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def decode_sample(raw: dict) -> dict:
    """A WebDataset raw sample (bytes per extension) -> the training sample format."""
    image = np.array(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"), dtype=np.uint8)
    lmk = np.load(io.BytesIO(raw["lmk.npy"]), allow_pickle=False).astype(np.float32)
    mask = np.array(Image.open(io.BytesIO(raw["mask.png"])).convert("L"), dtype=np.uint8)
    return {"key": raw["__key__"], "image": image, "landmarks": lmk, "mask": mask,
            "meta": json.loads(raw["json"])}


def shard_urls(output: str, split: str) -> list[str]:
    """The ``split`` shards under a preprocessing output: local paths or s3:// URIs, as
    :func:`webdataset` and :func:`iter_samples` take them."""
    names = storage.list_files(storage.join(output, "shards"))
    prefix = f"{split}-"
    return [u for u in names if u.rsplit("/", 1)[-1].startswith(prefix) and u.endswith(".tar")]


def read_split(output: str, split: str) -> tuple[list[str], dict[str, list[str]] | None]:
    """A preprocessing output's ``split`` -> (its shard URIs, sorted; its identity lists from
    ``identities.json``, None without that file). FileNotFoundError when it has no shards.
    Training holds a split as ``SampleStore.from_samples(iter_samples(urls), identities)``."""
    urls = sorted(shard_urls(output, split))
    if not urls:
        raise FileNotFoundError(f"no {split}-*.tar shards under {storage.join(output, 'shards')}")
    ids_uri = storage.join(output, IDENTITIES_FILE)
    identities = (json.loads(storage.read_bytes(ids_uri)).get(split)
                  if storage.exists(ids_uri) else None)
    return urls, identities


def _open_shards(sources: Iterable[dict]) -> Iterator[dict]:
    """WebDataset stage: ``{url}`` -> ``{url, stream}``, the shard read by
    ``infra.storage`` in this process (boto3 for s3://). WebDataset's own opener would hand
    s3:// to a shell (``pipe:``) and cut local paths at ``;``, ``?`` or ``#`` (it parses them
    as URLs); here a shard's name is only ever a name. The stream is closed when the next
    shard is asked for."""
    for source in sources:
        with storage.open_read(source["url"]) as stream:
            yield {**source, "stream": stream}


def _pipeline(shard_stages: list, sample_stages: list):
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return wds.DataPipeline(*shard_stages, _open_shards, tar_file_expander, group_by_keys,
                            *sample_stages, wds.map(decode_sample))


def _uri_list(urls: str | list[str]) -> list[str]:
    # A single URI is one shard: no brace expansion of names (``{a,b}``).
    return [urls] if isinstance(urls, str) else list(urls)


def webdataset(urls: str | list[str], shuffle: int = 0, resampled: bool = False,
               seed: int = 0):
    """A ``webdataset.DataPipeline`` yielding decoded samples (usable in a torch DataLoader;
    shards are split across DataLoader workers, one node only). ``urls``: shard paths or
    s3:// URIs (:func:`shard_urls`); ``shuffle``: sample buffer (and a 100-shard shuffle);
    ``resampled``: shards drawn with replacement, endlessly."""
    import webdataset as wds

    uris = _uri_list(urls)
    shards = [wds.ResampledShards(uris, seed=seed) if resampled else wds.SimpleShardList(uris),
              wds.single_node_only, wds.split_by_worker]
    if shuffle and not resampled:
        shards.append(wds.shuffle(100, seed=seed))
    return _pipeline(shards, [wds.shuffle(shuffle, seed=seed)] if shuffle else [])


def iter_samples(urls: str | list[str]) -> Iterator[dict]:
    """Decoded samples of ``urls`` (shard paths or s3:// URIs) in shard order: all of them,
    also inside a torch.distributed process (a Ray Train worker picks its own shards)."""
    import webdataset as wds

    yield from _pipeline([wds.SimpleShardList(_uri_list(urls))], [])


def to_torch(sample: dict) -> dict:
    """Decoded sample -> tensors: image (3, H, W) float [0, 1], landmarks (68, 2), mask
    (1, H, W) float {0, 1}; key and meta kept."""
    import torch

    return {
        "key": sample["key"],
        "image": torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255.0,
        "landmarks": torch.from_numpy(sample["landmarks"]),
        "mask": torch.from_numpy(sample["mask"]).float()[None] / 255.0,
        "meta": sample["meta"],
    }
