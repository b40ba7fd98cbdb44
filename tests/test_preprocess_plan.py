"""Whole-dataset planning on synthetic records: identity sources, duplicates, split and
shard layout (no models)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from preprocessing.config import PreprocessConfig
from preprocessing.pipeline import InputFile, plan


def _dataset(paths: list[str], person: list[int], dup: dict[int, int] | None = None):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(person) + 1, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    inputs, records = [], {}
    for i, (p, who) in enumerate(zip(paths, person)):
        rid = hashlib.sha256(str((dup or {}).get(i, i)).encode()).hexdigest()
        inputs.append(InputFile(uri=f"/in/{p}", rel=p, sha256=rid, rid=rid))
        emb = centres[who] + rng.normal(scale=0.01, size=128)
        records[rid] = {"rid": rid, "sha256": rid, "status": "ok", "reason": "",
                        "meta": json.dumps({"faces": [{}], "detector_score": 1.0}),
                        "embedding": emb.tolist(), "part": "p"}
    return sorted(inputs, key=lambda f: f.rel), records


def test_clustering_groups_people_and_split_is_disjoint():
    person = [0, 1, 2, 3, 4] * 4
    paths = [f"img{i:02d}.jpg" for i in range(20)]
    inputs, records = _dataset(paths, person)
    cfg = PreprocessConfig(shard_size=3)
    p = plan(inputs, records, cfg)
    ids = {r["path"]: r["identity"] for r in p.rows}
    for a in range(20):
        for b in range(20):
            assert (ids[paths[a]] == ids[paths[b]]) == (person[a] == person[b])
    assert len(set(ids.values())) == 5
    splits = {r["identity"]: r["split"] for r in p.rows}
    assert sorted(splits.values()).count("val") == 1
    for split, groups in p.identities.items():
        for ident, keys in groups.items():
            assert splits[ident] == split and len(keys) == 4
    # Shards hold sorted keys, shard_size each, and every ok row points to one.
    assert all(len(v) <= 3 for v in p.shards.values())
    assert {r["shard"] for r in p.rows} == {f"shards/{n}" for n in p.shards}
    # Same inputs in another order: the same plan.
    again = plan(list(reversed(inputs)), records, cfg)
    assert sorted(again.rows, key=lambda r: r["path"]) == sorted(p.rows, key=lambda r: r["path"])
    assert again.digests == p.digests


def test_labels_missing_label_and_duplicates(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,identity\na/1.jpg,ann\na/2.jpg,ann\na/4.jpg,ann\na/5.jpg,ann\n"
                      "b/1.jpg,bo\nb/3.jpg,ann\n")
    inputs, records = _dataset(["a/1.jpg", "a/2.jpg", "a/4.jpg", "a/5.jpg", "b/1.jpg",
                                "b/2.jpg", "b/3.jpg"], [0, 0, 0, 0, 1, 1, 1], dup={1: 0})
    p = plan(inputs, records, PreprocessConfig(labels=str(labels)))
    rows = {r["path"]: r for r in p.rows}
    assert rows["a/1.jpg"]["status"] == "ok" and rows["a/1.jpg"]["identity"] == "ann"
    assert rows["a/2.jpg"]["reason"] == "duplicate of a/1.jpg"
    assert rows["b/2.jpg"]["reason"] == "no identity label"
    # b/3.jpg is labelled 'ann' but is person 1: flagged by the embedding check.
    assert p.label_outliers == ["b/3.jpg"]
    assert rows["b/3.jpg"]["identity_distance"] > 0.6


def test_folder_mode_needs_folders():
    inputs, records = _dataset(["top.jpg", "x/1.jpg"], [0, 1])
    p = plan(inputs, records, PreprocessConfig(identity_source="folder"))
    rows = {r["path"]: r for r in p.rows}
    assert rows["top.jpg"]["reason"] == "not in an identity folder"
    assert rows["x/1.jpg"]["identity"] == "x"
    with pytest.raises(ValueError):
        plan(inputs, records, PreprocessConfig(identity_source="cluster", embedding="none"))
