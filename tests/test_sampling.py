"""Source-weighted identity batches (recon/training/data.py IdentityBatchSampler with
``data.sources``) and their config (recon/config.py DataConfig)."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from recon.config import DataConfig, SourceSampling
from recon.training.data import IdentityBatchSampler, identity_source


def _mixed():
    """vggface2: 30 people x 6 images, bupt: 20 x 4, aflw: 40 single faces."""
    ids = {f"vggface2/n{i:06d}": [f"v{i}_{j}" for j in range(6)] for i in range(30)}
    ids |= {f"bupt/a{i}": [f"b{i}_{j}" for j in range(4)] for i in range(20)}
    ids |= {f"aflw/{i}": [f"a{i}"] for i in range(40)}
    return ids


WEIGHTS = {"vggface2": 0.6, "bupt": 0.3, "aflw": 0.1}


def _sampler(k: int, n: int = 4, **kw):
    sources = {s: SourceSampling(weight=w) for s, w in WEIGHTS.items()}
    return IdentityBatchSampler(_mixed(), n, k, seed=kw.pop("seed", 11), sources=sources, **kw)


def _sources_of(sampler, batches):
    owner = {key: name for name, keys in sampler.identities.items() for key in keys}
    return [identity_source(owner[b[i]]) for b in batches for i in range(0, len(b), sampler.k)]


def test_drawn_sources_follow_the_weights():
    # K = 1: every source eligible. 500 batches x 4 slots = 2000 draws; each count within
    # 4 binomial standard deviations of n * w (the slot draws are independent while every
    # source still has identities left, which 4 slots never exhaust).
    s = _sampler(k=1)
    batches = [s.weighted_batch(g) for g in range(500)]
    drawn = _sources_of(s, batches)
    n = len(drawn)
    assert n == 2000
    for source, w in WEIGHTS.items():
        count = drawn.count(source)
        assert abs(count - n * w) < 4 * math.sqrt(n * w * (1 - w)), (source, count)
    # Pearson's chi-square, 2 degrees of freedom: 13.8 is its 0.999 quantile.
    chi2 = sum((drawn.count(s) - n * w) ** 2 / (n * w) for s, w in WEIGHTS.items())
    assert chi2 < 13.8


def test_single_image_identities_only_in_k1_batches():
    s = _sampler(k=2)
    assert not any(name.startswith("aflw/") for name in s.names)
    drawn = _sources_of(s, [s.weighted_batch(g) for g in range(200)])
    assert "aflw" not in drawn
    # The weight of the missing source is shared by the others in their ratio (0.6 : 0.3).
    assert abs(drawn.count("vggface2") / len(drawn) - 2 / 3) < 0.06
    for batch in [s.weighted_batch(g) for g in range(50)]:
        groups = [batch[i:i + 2] for i in range(0, len(batch), 2)]
        assert all(len(set(g)) == 2 for g in groups)  # two different images per person
    assert any(n.startswith("aflw/") for n in _sampler(k=1).names)


def test_unweighted_sampler_also_skips_identities_with_fewer_than_k_images():
    ids = {"a": ["a1"], "b": ["b1", "b2"], "c": ["c1", "c2", "c3"], "d": ["d1", "d2"]}
    s = IdentityBatchSampler(ids, 1, 2, seed=0)
    assert s.names == ["b", "c", "d"]
    assert {k[0] for batch in s.epoch(0) for k in batch} == {"b", "c", "d"}
    with pytest.raises(ValueError, match="at least 3 images"):
        IdentityBatchSampler(ids, 2, 3)


def test_cap_keeps_a_fixed_seeded_subset():
    ids = {f"vggface2/n{i}": [f"{i}_{j:02d}" for j in range(20)] for i in range(6)}
    cap = {"vggface2": SourceSampling(max_images_per_identity=5)}
    s = IdentityBatchSampler(ids, 2, 3, seed=4, sources=cap)
    assert all(len(keys) == 5 for keys in s.identities.values())
    used = {k for g in range(100) for k in s.weighted_batch(g)}
    assert used == {k for keys in s.identities.values() for k in keys}  # never past the cap
    again = IdentityBatchSampler({n: v[::-1] for n, v in ids.items()}, 2, 3, seed=4, sources=cap)
    assert again.identities == s.identities  # not the input order, only the seed
    # Without weights (no `sources`) the default source's cap applies as well.
    plain = IdentityBatchSampler(ids, 2, 3, seed=4,
                                 default_source=SourceSampling(max_images_per_identity=4))
    assert all(len(keys) == 4 for keys in plain.identities.values())


def test_same_seed_same_batches_and_resume_matches():
    a, b = _sampler(k=2), _sampler(k=2)
    assert a.epoch(0) == b.epoch(0) and a.epoch(2) == b.epoch(2)
    assert a.epoch(0) != a.epoch(1)
    assert _sampler(k=2, seed=12).epoch(0) != a.epoch(0)
    stream = a.iter_from(0)
    first = [next(stream) for _ in range(3 * a.batches_per_epoch + 2)]
    assert [s for s, _ in first] == list(range(len(first)))
    resumed = b.iter_from(9)
    assert [next(resumed) for _ in range(len(first) - 9)] == first[9:]
    assert [keys for _, keys in first[:a.batches_per_epoch]] == a.epoch(0)


def test_ranks_take_interleaved_global_batches():
    whole = _sampler(k=2)
    r0, r1 = _sampler(k=2, rank=0, world_size=2), _sampler(k=2, rank=1, world_size=2)
    g = [whole.weighted_batch(i) for i in range(2 * r0.batches_per_epoch)]
    assert r0.epoch(0) == g[0::2] and r1.epoch(0) == g[1::2]
    s1 = r1.iter_from(1)
    assert next(s1) == (1, g[3])


def test_data_config_refuses_bad_sampling():
    ok = DataConfig(sources={"vggface2": {"weight": 0.5, "max_images_per_identity": 50},
                             "aflw": {"weight": 0}})
    assert ok.sources["vggface2"].max_images_per_identity == 50
    assert ok.default_source.weight == 1.0
    for bad in ({"vggface2": {"weight": -1}}, {"vggface2": {"wieght": 1}},
                {"vggface2": {"max_images_per_identity": 0}}, {"VGG Face": {"weight": 1}},
                {"aflw": {"weight": 0}}):
        with pytest.raises(ValidationError):
            DataConfig(sources=bad)
    with pytest.raises(ValidationError):
        DataConfig(default_source={"weight": -0.5})


def test_identity_source():
    assert identity_source("vggface2/n000002") == "vggface2"
    assert identity_source("anna") == ""


def test_rank_part_counts_only_identities_with_k_images(tmp_path):
    """A rank reads only its own shards when they hold N identities of at least K images."""
    from flows.samples import rank_store
    from shard_fixtures import random_sample, write_train_split

    # Shards of 2 samples: rank 0 gets shards 0 and 2 (p0 x 2, p2 x 1, p3 x 1), rank 1
    # shards 1 and 3 (p1 x 2, p4 x 2).
    keys = ["p0/0", "p0/1", "p1/0", "p1/1", "p2/0", "p3/0", "p4/0", "p4/1"]
    samples = [random_sample(k, k.split("/")[0], 32, seed=i) for i, k in enumerate(keys)]
    data = str(write_train_split(tmp_path / "data", samples, per_shard=2, manifest=True))
    store, own = rank_store(data, 0, 2, 2, k_images=2)
    assert not own and len(store) == 8  # 1 identity of 2+ images: the whole split
    store, own = rank_store(data, 1, 2, 2, k_images=2)
    assert own and sorted(store.identities) == ["p1", "p4"]
    store, own = rank_store(data, 0, 2, 2, k_images=1)
    assert own and sorted(store.identities) == ["p0", "p2", "p3"]


@pytest.mark.slow
def test_seed_recipe_trains_a_step_on_a_mixed_preprocessed_set(tmp_path, monkeypatch):
    """`wildface train --config seed` on shards of three sources (networks shrunk to
    seconds): AFLW's single faces stay out of its 2 x 2 batches."""
    from typer.testing import CliRunner

    from flows.cli.main import app
    from recon.training.trainer import Trainer
    from shard_fixtures import random_sample, write_train_split

    people = [(f"vggface2/n{i:06d}", 3) for i in range(2)] + [("celeba/17", 2)] + \
        [(f"aflw/{i}", 1) for i in range(3)]
    samples = [random_sample(f"{name.replace('/', '-')}-{j}", name, seed=n * 10 + j)
               for n, (name, count) in enumerate(people) for j in range(count)]
    data = write_train_split(tmp_path / "data", samples, per_shard=4, manifest=True)
    drawn: list[str] = []
    run = Trainer.run

    def record(self, steps=None):
        drawn.extend(self.sampler.names)
        return run(self, steps)

    monkeypatch.setattr(Trainer, "run", record)
    tiny = ["face_model.n_shape=20", "face_model.n_exp=10", "face_model.n_tex=10",
            "model.backbone=mobilenet_v3_small", "model.hidden=32", "model.image_size=64",
            "model.uv_size=32", "model.n_detail=8", "loss.identity=0", "train.steps=1",
            "train.checkpoint_every=1", "train.amp=false"]
    args = ["train", "--config", "seed", "--stage", "coarse", "--data", str(data),
            "--out", str(tmp_path / "run"), "--device", "cpu"]
    res = CliRunner().invoke(app, args + [w for o in tiny for w in ("--set", o)])
    assert res.exit_code == 0, res.output
    assert sorted(drawn) == ["celeba/17", "vggface2/n000000", "vggface2/n000001"]
    assert (tmp_path / "run" / "checkpoints" / "coarse-000000001.pt").is_file()
