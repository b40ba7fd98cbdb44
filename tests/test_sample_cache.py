"""The memory-mapped sample cache (recon/training/sample_cache.py) and the data folders'
stores (flows/samples.py): the same batches as in memory, built once, reused, refused when
inconsistent."""
from __future__ import annotations

import copy
import json
import os
import pickle

import numpy as np
import pytest
import torch

from recon.training.data import (CropAugment, IdentityBatchSampler, SampleStore,
                                 iter_eval_batches, make_train_loader)
from recon.training.sample_cache import (INDEX_FILE, MappedRecords, cache_folder,
                                         cached_store, write_sample_cache)
from shard_fixtures import random_sample, write_train_split


def _samples(n_ids=4, k=3, size=40):
    # Every third sample without a mask: the cache must give "all skin" back for those too.
    return [random_sample(f"p{i}/{j}", f"p{i}", size, seed=10 * i + j, mask=(i + j) % 3 != 0)
            for i in range(n_ids) for j in range(k)]


def _never():
    raise AssertionError("the cache was rebuilt")


def _same_batches(a: SampleStore, b: SampleStore, steps: int = 4) -> None:
    augment = CropAugment(out_size=32)
    sampler = IdentityBatchSampler(a.identities, 2, 1, seed=5)  # K = 1: every identity
    for step, keys in zip(range(steps), sampler.iter_from(0)):
        ba = a.batch(keys[1], augment, True, torch.Generator().manual_seed(step))
        bb = b.batch(keys[1], augment, True, torch.Generator().manual_seed(step))
        assert ba.keys() == bb.keys()
        for name in ba:
            assert torch.equal(ba[name], bb[name]), name


def test_cached_store_gives_the_in_memory_batches(tmp_path):
    samples = _samples()
    memory = SampleStore.from_samples(samples)
    cached = cached_store(lambda: iter(samples), tmp_path, "set-a")
    assert isinstance(cached.records, MappedRecords)
    assert cached.identities == memory.identities and len(cached) == len(memory) == 12
    for key in memory.records:
        m, c = memory.records[key], cached.records[key]
        assert np.array_equal(m.image, c.image) and np.array_equal(m.landmarks, c.landmarks)
        assert (m.mask is None) == (c.mask is None)
        if m.mask is not None:
            assert np.array_equal(m.mask, c.mask)
    _same_batches(memory, cached)
    evals = zip(iter_eval_batches(memory, CropAugment(out_size=32), 5),
                iter_eval_batches(cached, CropAugment(out_size=32), 5))
    for (ka, ba), (kb, bb) in evals:
        assert ka == kb and torch.equal(ba["images"], bb["images"])


def test_cache_is_reused_and_keyed_by_its_source(tmp_path):
    samples = _samples()
    cached_store(lambda: iter(samples), tmp_path, "set-a")
    folder = cache_folder(tmp_path, "set-a")
    stamp = (folder / "images.u8").stat().st_mtime_ns
    again = cached_store(_never, tmp_path, "set-a")  # complete: not rebuilt
    assert (folder / "images.u8").stat().st_mtime_ns == stamp and len(again) == 12
    other = cached_store(lambda: iter(samples[:6]), tmp_path, "set-b")
    assert len(other) == 6 and cache_folder(tmp_path, "set-b") != folder
    # Identity lists given (identities.json): they win over the meta, missing keys dropped.
    lists = {"x": ["p0/0", "p1/1", "gone"], "y": ["p2/2"], "z": ["gone"]}
    named = cached_store(_never, tmp_path, "set-a", lists)
    assert named.identities == {"x": ["p0/0", "p1/1"], "y": ["p2/2"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name,
                                                                 other.records.folder.name])


def test_incomplete_cache_is_rebuilt(tmp_path):
    samples = _samples()
    folder = cache_folder(tmp_path, "set-a")
    folder.mkdir()
    (folder / "images.u8").write_bytes(b"half a write")  # no index.json: never read
    store = cached_store(lambda: iter(samples), tmp_path, "set-a")
    _same_batches(SampleStore.from_samples(samples), store, steps=2)
    with pytest.raises(FileNotFoundError, match="not a complete sample cache"):
        MappedRecords(tmp_path / "missing")


def test_bad_samples_are_refused_and_leave_nothing_behind(tmp_path):
    samples = _samples()
    mixed = samples[:5] + [random_sample("p9/0", "p9", size=48)]
    with pytest.raises(ValueError, match=r"sample p9/0: image 48x48, but the cache's "
                                         r"samples are 40x40"):
        cached_store(lambda: iter(mixed), tmp_path, "mixed")
    with pytest.raises(ValueError, match="sample p0/1 appears twice"):
        write_sample_cache(samples[:2] + samples[1:2], tmp_path / "dup", "dup")
    with pytest.raises(ValueError, match="no samples"):
        write_sample_cache([], tmp_path / "empty", "empty")
    assert list(tmp_path.iterdir()) == []  # no cache, no partial folder


def test_two_writers_of_one_cache_both_succeed(tmp_path):
    # Ranks of a node that read the whole split build the same cache; the second rename
    # finds the first one's folder and keeps it.
    samples = _samples()
    folder = cache_folder(tmp_path, "set-a")
    write_sample_cache(iter(samples), folder, "set-a")
    index = (folder / INDEX_FILE).read_text()
    write_sample_cache(iter(samples), folder, "set-a")
    assert (folder / INDEX_FILE).read_text() == index
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_mapped_records_pickle_as_their_folder(tmp_path):
    samples = _samples()
    store = cached_store(lambda: iter(samples), tmp_path, "set-a")
    assert len(pickle.dumps(store.records)) < 1000  # the folder, not the 12 x 40 x 40 x 3 pixels
    back = copy.deepcopy(store.records)  # the same __reduce__ as unpickling: reopens the folder
    assert back is not store.records and back.folder == store.records.folder
    assert np.array_equal(back["p3/2"].image, store.records["p3/2"].image)


def test_loader_workers_read_the_cache(tmp_path):
    samples = _samples()
    memory = SampleStore.from_samples(samples)
    cached = cached_store(lambda: iter(samples), tmp_path, "set-a")
    augment = CropAugment(out_size=32)

    def first(store, workers):
        sampler = IdentityBatchSampler(store.identities, 2, 2, seed=1)
        loader = make_train_loader(store, sampler, augment, start_step=3, num_workers=workers)
        out = []
        for step, batch in loader:
            out.append((step, batch["images"]))
            if len(out) == 3:
                return out

    for (sa, ia), (sb, ib) in zip(first(memory, 0), first(cached, 2)):
        assert sa == sb and torch.equal(ia, ib)


# -- flows/samples.py: the stores of data folders ---------------------------------------------
def test_rank_stores_of_shards_in_the_cache_match_memory(tmp_path):
    from flows.samples import rank_store

    samples = [s for s in _samples(n_ids=4, k=3) if s["mask"] is not None]
    write_train_split(tmp_path / "data", samples, per_shard=3)
    data, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    for rank in (0, 1):
        memory, own_m = rank_store(data, rank, 2, 1)
        cached, own_c = rank_store(data, rank, 2, 1, cache)
        assert own_m and own_c and isinstance(cached.records, MappedRecords)
        assert cached.identities == memory.identities
        _same_batches(memory, cached, steps=2)
    assert len(os.listdir(cache)) == 2  # one cache per rank's part
    whole, own = rank_store(data, 0, 1, 2, cache)
    assert not own and len(whole) == len(samples) and len(os.listdir(cache)) == 3
    # A rewritten shard (new size / mtime) is a new source: its cache is rebuilt.
    shard = tmp_path / "data" / "shards" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 1024)
    rank_store(data, 0, 1, 2, cache)
    assert len(os.listdir(cache)) == 4


def test_rank_store_counts_a_parts_identities_in_the_manifest(tmp_path):
    from flows.samples import rank_store

    # 4 identities x 2 images, a shard each: each of 2 ranks' parts holds 2 identities.
    samples = [random_sample(f"p{i}/{j}", f"p{i}", 40, seed=10 * i + j)
               for i in range(4) for j in range(2)]
    write_train_split(tmp_path / "data", samples, per_shard=2, manifest=True)
    data, cache = str(tmp_path / "data"), tmp_path / "cache"
    store, own = rank_store(data, 1, 2, 3, str(cache))
    assert not own and sorted(store.identities) == ["p0", "p1", "p2", "p3"]
    assert len(os.listdir(cache)) == 1  # the whole split only: no cache of the too-small part
    store, own = rank_store(data, 1, 2, 2, str(cache))
    assert own and sorted(store.identities) == ["p1", "p3"]


def test_rank_store_of_a_synth_folder_in_the_cache(tmp_path):
    from flows.samples import rank_store
    from reconstruct_fixtures import make_synth

    data = str(make_synth(tmp_path / "synth", identities=4, images=2, size=64))
    memory, _ = rank_store(data, 1, 2, 2)
    cached, own = rank_store(data, 1, 2, 2, str(tmp_path / "cache"))
    assert own and sorted(cached.identities) == sorted(memory.identities)
    assert sorted(cached.identities) == ["id0001", "id0003"]  # rank 1 of 2: its own half
    _same_batches(memory, cached, steps=2)


def test_cache_dir_must_be_local():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="cache_dir"):
        load_config(None, ["data.cache_dir=s3://bucket/cache"])


def test_training_workers_get_absolute_paths(tmp_path, monkeypatch):
    # Ray Train runs each worker in a folder of its own; the driver resolves local paths.
    from flows.config import load_config, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(None, [
        "data.cache_dir=cache", "face_model.path=flame/generic_model.pkl",
        "face_model.landmarks=~/lmk.npy", "identity.weights=w/facenet.safetensors",
        "identity.store=s3://bucket/store", "perceptual.store=store"]))
    assert cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.face_model.path == str(tmp_path / "flame" / "generic_model.pkl")
    assert cfg.face_model.landmarks == os.path.expanduser("~/lmk.npy")
    assert cfg.identity.weights == str(tmp_path / "w" / "facenet.safetensors")
    assert cfg.identity.store == "s3://bucket/store" and cfg.perceptual.store == str(
        tmp_path / "store")
    assert cfg.model.backbone_weights is None and cfg.perceptual.weights is None
    assert with_absolute_paths(load_config(None, [])).face_model.path == "demo-head"


def test_wildface_train_on_the_cache_trains_as_in_memory(tmp_path):
    from typer.testing import CliRunner

    from flows.cli.main import app
    from reconstruct_fixtures import TINY, make_synth

    data = str(make_synth(tmp_path / "synth", identities=4, images=2, size=64))
    sets = [f"{k}={v}" for k, v in {**TINY, "train.steps": 2}.items()]

    def train(out, *extra):
        args = ["train", "--stage", "coarse", "--data", data, "--out", str(out),
                "--device", "cpu"]
        for s in sets + list(extra):
            args += ["--set", s]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "8 training images of 4 identities" in result.output
        lines = (out / "coarse-log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if "time" not in k and "per_s"
                 not in k} for line in lines]

    memory = train(tmp_path / "memory")
    cached = train(tmp_path / "cached", f"data.cache_dir={tmp_path / 'cache'}")
    assert len(memory) == 2 and memory == cached  # the same losses, step by step
    assert (tmp_path / "cached" / "checkpoints" / "coarse-000000002.pt").is_file()
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_the_cache_folder_does_not_rename_a_training_run(tmp_path):
    # A run resumed with another cache (or none) is the same run; another lr is not.
    from flows.config import load_config
    from flows.train import default_run_name
    from reconstruct_fixtures import make_synth

    data = str(make_synth(tmp_path / "synth", identities=2, images=1, size=64))
    names = {sets: default_run_name(load_config(None, list(sets)), data, "coarse", None)
             for sets in [(), ("data.cache_dir=/a",), ("data.cache_dir=/b",),
                          ("train.lr=0.123",)]}
    assert len(set(names.values())) == 2
    assert names[()] == names[("data.cache_dir=/a",)] != names[("train.lr=0.123",)]


def test_a_killed_writers_partial_copy_is_removed_by_the_next_build(tmp_path):
    import socket
    import subprocess
    import sys

    samples = _samples()
    folder = cache_folder(tmp_path, "set-a")
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".{folder.name}.partial-{host}-{dead}-0badf00d"
    live = tmp_path / f".{folder.name}.partial-{host}-{os.getpid()}-0000beef"
    for path in (stale, live):
        path.mkdir()
        (path / "images.u8").write_bytes(b"\0" * 4096)
    cached_store(lambda: iter(samples), tmp_path, "set-a")
    assert not stale.exists()  # its writer is gone: reclaimed
    assert live.exists()  # a live writer's (here: this process) is left alone
