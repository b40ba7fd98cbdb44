"""Identity-grouped batches and DECA's crop augmentation (recon/training/data.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.render.cameras import image_to_pixel
from recon.training.data import (CropAugment, IdentityBatchSampler, SampleStore,
                                 record_from_sample, warp_crops)
from shard_fixtures import random_sample, write_train_split


def _identities(sizes):
    return {f"p{i:02d}": [f"p{i:02d}/{j}" for j in range(n)] for i, n in enumerate(sizes)}


def test_sampler_groups_n_identities_of_k_images():
    ids = _identities([5, 6, 4, 7, 4, 9, 8, 5, 4])
    sampler = IdentityBatchSampler(ids, n_identities=3, k_images=4, seed=1)
    assert len(sampler) == 3
    seen = []
    for batch in sampler.epoch(0):
        assert len(batch) == 12
        groups = [batch[i:i + 4] for i in range(0, 12, 4)]
        owners = [{k.split("/")[0] for k in g} for g in groups]
        assert all(len(o) == 1 for o in owners)  # K consecutive keys of one identity
        names = [o.pop() for o in owners]
        assert len(set(names)) == 3  # N distinct identities
        seen += names
        for name, g in zip(names, groups):
            assert len(set(g)) == 4  # without replacement
            assert set(g) <= set(ids[name])
    assert len(set(seen)) == 9  # every identity once per epoch


def test_sampler_deterministic_epoch_aware_and_resumable():
    ids = _identities([4] * 10)
    a = IdentityBatchSampler(ids, 2, 3, seed=7)
    b = IdentityBatchSampler(ids, 2, 3, seed=7)
    assert a.epoch(0) == b.epoch(0) and a.epoch(3) == b.epoch(3)
    assert a.epoch(0) != a.epoch(1)
    assert IdentityBatchSampler(ids, 2, 3, seed=8).epoch(0) != a.epoch(0)
    stream = a.iter_from(0)
    first = [next(stream) for _ in range(12)]
    assert [s for s, _ in first] == list(range(12))
    resumed = a.iter_from(7)
    assert [next(resumed) for _ in range(5)] == first[7:]


def test_sampler_ranks_partition_batches():
    ids = _identities([3] * 12)
    full = IdentityBatchSampler(ids, 2, 2, seed=3).epoch(4)
    r0 = IdentityBatchSampler(ids, 2, 2, seed=3, rank=0, world_size=2).epoch(4)
    r1 = IdentityBatchSampler(ids, 2, 2, seed=3, rank=1, world_size=2).epoch(4)
    assert r0 == full[0::2] and r1 == full[1::2] and len(r0) == len(r1) == 3


def test_sampler_too_few_identities_is_an_error():
    with pytest.raises(ValueError, match="identities"):
        IdentityBatchSampler(_identities([3, 3]), 3, 2)


def _dot_images(landmarks: torch.Tensor, size: int, which: list[int]) -> torch.Tensor:
    """One image per landmark index in ``which``: a Gaussian dot at that landmark."""
    px = image_to_pixel(landmarks, size, size)  # (B, 68, 2) column, row
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                            torch.arange(size, dtype=torch.float64), indexing="ij")
    imgs = []
    for b, idx in enumerate(which):
        c, r = px[b, idx]
        imgs.append(torch.exp(-((xx - c) ** 2 + (yy - r) ** 2) / (2 * 2.0**2)))
    return torch.stack(imgs)[:, None].expand(-1, 3, -1, -1).contiguous()


def _centroid(img: torch.Tensor) -> torch.Tensor:
    w = img[0] * (img[0] > 0.05)
    H, W = w.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=w.dtype), torch.arange(W, dtype=w.dtype),
                            indexing="ij")
    return torch.stack([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


@pytest.mark.parametrize("train", [True, False])
def test_augmentation_moves_landmarks_with_the_image(train):
    g = torch.Generator().manual_seed(0)
    B, S, out = 6, 256, 96
    lmk = (torch.rand(B, 68, 2, generator=g, dtype=torch.float64) - 0.5) * 0.7
    which = [0, 8, 16, 30, 48, 54]
    images = _dot_images(lmk, S, which)
    masks = (images[:, :1] > 0.5).double()
    aug = CropAugment(out_size=out, shift=0.1)
    o_img, o_mask, o_lmk = aug(images, masks, lmk, train=train, generator=g)
    assert o_img.shape == (B, 3, out, out) and o_mask.shape == (B, 1, out, out)
    expected = image_to_pixel(o_lmk, out, out)
    for b, idx in enumerate(which):
        got = _centroid(o_img[b])
        assert torch.allclose(got, expected[b, idx], atol=0.25), (got, expected[b, idx])
        # the mask (the dot's core) sits on the same landmark
        assert o_mask[b, 0].sum() > 0
        assert torch.allclose(_centroid(o_mask[b].expand(3, -1, -1)), expected[b, idx], atol=0.6)
    # crop scale relative to the landmark box: U[1.4, 1.8] when training, fixed otherwise
    side = (o_lmk.amax(1) - o_lmk.amin(1)).amax(-1)  # box size in crop units (crop = 2)
    scale = 2 / side
    if train:
        assert ((scale >= 1.4 - 1e-6) & (scale <= 1.8 + 1e-6)).all() and scale.std() > 0.01
    else:
        assert torch.allclose(scale, torch.full_like(scale, 1.6))
        assert torch.allclose((o_lmk.amax(1) + o_lmk.amin(1)) / 2, torch.zeros(B, 2, dtype=o_lmk.dtype), atol=1e-9)


def test_warp_identity_window_keeps_image():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 32, 32, generator=g)
    mask = torch.ones(2, 1, 32, 32)
    lmk = torch.rand(2, 68, 2, generator=g) - 0.5
    o_img, o_mask, o_lmk = warp_crops(img, mask, lmk, torch.zeros(2, 2), torch.ones(2), 32)
    assert torch.allclose(o_img, img, atol=1e-5) and torch.equal(o_lmk, lmk)
    assert o_mask.min() == 1


def test_store_batches_collate_in_the_step_format():
    samples = [random_sample(f"p{i}/{j}", f"p{i}", seed=10 * i + j)
               for i in range(4) for j in range(3)]
    store = SampleStore.from_samples(samples)
    assert list(store.identities) == ["p0", "p1", "p2", "p3"]
    sampler = IdentityBatchSampler(store.identities, 2, 2, seed=0)
    keys = sampler.epoch(0)[0]
    batch = store.batch(keys, CropAugment(out_size=48), train=True,
                        generator=torch.Generator().manual_seed(0))
    assert batch["images"].shape == (4, 3, 48, 48) and batch["images"].dtype == torch.float32
    assert batch["landmarks"].shape == (4, 68, 2) and batch["masks"].shape == (4, 1, 48, 48)
    ident = batch["identity"]
    assert ident.dtype == torch.long and ident[0] == ident[1] and ident[2] == ident[3]
    assert ident[0] != ident[2]
    again = store.batch(keys, CropAugment(out_size=48), train=True,
                        generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    # identity lists (identities.json) take precedence and drop unknown keys
    store2 = SampleStore.from_samples(samples, {"a": ["p0/0", "p0/1", "missing"], "b": ["p1/0"]})
    assert store2.identities == {"a": ["p0/0", "p0/1"], "b": ["p1/0"]}


def test_record_validation():
    bad = random_sample("k", "p")
    bad["landmarks"] = np.zeros((5, 2))
    with pytest.raises(ValueError, match="landmarks"):
        record_from_sample(bad)


def test_store_reads_preprocessing_shards(tmp_path):
    from preprocessing.shards import iter_samples, read_split

    samples = [random_sample(f"k{i}", f"p{i // 2}", size=32, seed=i) for i in range(4)]
    write_train_split(tmp_path, samples, per_shard=4)
    urls, identities = read_split(str(tmp_path), "train")
    assert identities == {"p0": ["k0", "k1"], "p1": ["k2", "k3"]}
    store = SampleStore.from_samples(iter_samples(urls), identities)
    assert sorted(store.records) == ["k0", "k1", "k2", "k3"]
    assert store.identities == {"p0": ["k0", "k1"], "p1": ["k2", "k3"]}
    rec = store.records["k2"]
    assert rec.image.shape == (32, 32, 3)
    assert np.array_equal(rec.landmarks, random_sample("k2", "p1", 32, 2)["landmarks"])
    with pytest.raises(FileNotFoundError, match="no val-"):
        read_split(str(tmp_path), "val")
    (tmp_path / "identities.json").unlink()  # then the samples' meta names the identities
    urls, identities = read_split(str(tmp_path), "train")
    assert identities is None
    assert SampleStore.from_samples(iter_samples(urls)).identities == store.identities


def test_loader_workers_do_not_change_the_stream():
    from recon.training.data import make_train_loader

    samples = [random_sample(f"p{i}/{j}", f"p{i}", size=32, seed=10 * i + j)
               for i in range(4) for j in range(2)]
    store = SampleStore.from_samples(samples)
    sampler = IdentityBatchSampler(store.identities, 2, 2, seed=4)
    aug = CropAugment(out_size=24)

    def take(workers, start):
        it = iter(make_train_loader(store, sampler, aug, start_step=start, num_workers=workers))
        return [next(it) for _ in range(5)]

    serial, parallel = take(0, 3), take(2, 3)
    assert [s for s, _ in serial] == [s for s, _ in parallel] == [3, 4, 5, 6, 7]
    for (_, a), (_, b) in zip(serial, parallel):
        assert all(torch.equal(a[k], b[k]) for k in a)
