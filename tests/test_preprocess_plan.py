"""Whole-dataset planning on synthetic records: identity sources, duplicates, split and
shard layout (no models)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from preprocessing.config import PreprocessConfig
from preprocessing.datasets import listing_table
from preprocessing.pipeline import PART_SCHEMA, RECORD_COLUMNS, plan


class _Plan:
    """A plan's tables as the rows and dicts these tests read."""

    def __init__(self, p):
        self.rows = p.manifest.to_pylist()
        self.identities: dict[str, dict[str, list[str]]] = {}
        for r in p.identities.to_pylist():
            by_id = self.identities.setdefault(r["split"], {})
            by_id.setdefault(r["identity"], []).append(r["key"])
        self.shards = {name: t.to_pylist() for name, t in p.shard_entries()}
        self.digests, self.label_outliers = p.digests, p.label_outliers


def _plan(inputs: list[dict], records: dict[str, dict], cfg: PreprocessConfig) -> _Plan:
    listing = listing_table({k: [f[k] for f in inputs] for k in inputs[0]})
    table = pa.Table.from_pylist(list(records.values()), schema=pa.schema(
        [PART_SCHEMA.field(c) for c in RECORD_COLUMNS] + [("part", pa.string())]))
    return _Plan(plan(listing, table, cfg))


def _dataset(paths: list[str], person: list[int], dup: dict[int, int] | None = None):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(person) + 1, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    inputs, records = [], {}
    for i, (p, who) in enumerate(zip(paths, person)):
        rid = hashlib.sha256(str((dup or {}).get(i, i)).encode()).hexdigest()
        inputs.append({"uri": f"/in/{p}", "rel": p, "sha256": rid, "rid": rid})
        emb = centres[who] + rng.normal(scale=0.01, size=128)
        records[rid] = {"rid": rid, "status": "ok", "reason": "", "n_faces": 1,
                        "detector_score": 1.0, "landmark_source": "",
                        "embedding": emb.tolist(), "part": "p"}
    return sorted(inputs, key=lambda f: f["rel"]), records


def test_clustering_groups_people_and_split_is_disjoint():
    person = [0, 1, 2, 3, 4] * 4
    paths = [f"img{i:02d}.jpg" for i in range(20)]
    inputs, records = _dataset(paths, person)
    cfg = PreprocessConfig(shard_size=3)
    p = _plan(inputs, records, cfg)
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
    again = _plan(list(reversed(inputs)), records, cfg)
    assert sorted(again.rows, key=lambda r: r["path"]) == sorted(p.rows, key=lambda r: r["path"])
    assert again.digests == p.digests


def test_labels_missing_label_and_duplicates(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,identity\na/1.jpg,ann\na/2.jpg,ann\na/4.jpg,ann\na/5.jpg,ann\n"
                      "b/1.jpg,bo\nb/3.jpg,ann\n")
    inputs, records = _dataset(["a/1.jpg", "a/2.jpg", "a/4.jpg", "a/5.jpg", "b/1.jpg",
                                "b/2.jpg", "b/3.jpg"], [0, 0, 0, 0, 1, 1, 1], dup={1: 0})
    p = _plan(inputs, records, PreprocessConfig(labels=str(labels)))
    rows = {r["path"]: r for r in p.rows}
    assert rows["a/1.jpg"]["status"] == "ok" and rows["a/1.jpg"]["identity"] == "ann"
    assert rows["a/2.jpg"]["reason"] == "duplicate of a/1.jpg"
    assert rows["b/2.jpg"]["reason"] == "no identity label"
    # b/3.jpg is labelled 'ann' but is person 1: flagged by the embedding check.
    assert p.label_outliers == ["b/3.jpg"]
    assert rows["b/3.jpg"]["identity_distance"] > 0.6


def test_folder_mode_needs_folders():
    inputs, records = _dataset(["top.jpg", "x/1.jpg"], [0, 1])
    p = _plan(inputs, records, PreprocessConfig(identity_source="folder"))
    rows = {r["path"]: r for r in p.rows}
    assert rows["top.jpg"]["reason"] == "not in an identity folder"
    assert rows["x/1.jpg"]["identity"] == "x"
    with pytest.raises(ValueError):
        _plan(inputs, records, PreprocessConfig(identity_source="cluster", embedding="none"))


def test_plan_of_a_large_listing_is_column_wise_and_keeps_the_rules():
    """100 k VGGFace2 names planned from Arrow columns: no Python object per input (the
    Python heap stays far below one dict an input), and every rule of the small plans
    above against a per-row reference: a duplicate points to its first path, a refused
    input and a rejected record stay rows, an input without a record waits, identities
    are namespaced by source and one split each, shards hold shard_size keys in order."""
    import tracemalloc

    import pyarrow.compute as pc

    from benchmarks.listing import vggface2_names
    from preprocessing.manifest import SCHEMA, identities_bytes
    from preprocessing.split import split_identities

    n = 100_000
    rel = vggface2_names(n)
    rid = np.char.mod("%064x", np.arange(n))
    rid[7] = rid[3]  # the same bytes under two names
    refused, pending, bad = 11, 12, 13
    listing = listing_table({
        "rel": rel, "source": pa.repeat("vggface2", n),
        "label": pc.struct_field(pc.extract_regex(rel, r"^[^/]+/(?P<l>[^/]+)/"), [0]),
        "reason": pa.array(np.where(np.arange(n) == refused, "listed but missing", "")),
        "sha256": pa.array(rid), "rid": pa.array(rid)})
    listing = listing.set_column(0, "path", pc.binary_join_element_wise(
        "vggface2", listing["path"], "/"))
    has = np.ones(n, bool)
    has[[refused, pending, 7]] = False
    status = np.where(np.arange(n) == bad, "rejected", "ok")[has]
    records = pa.table({
        "rid": pa.array(rid[has]), "status": pa.array(status),
        "reason": pa.array(np.where(status == "ok", "", "no face found")),
        "n_faces": pa.array(np.ones(has.sum(), np.int32)),
        "detector_score": pa.array(np.ones(has.sum(), np.float32)),
        "landmark_source": pa.repeat("detector", int(has.sum())),
        "embedding": pa.nulls(int(has.sum()), pa.list_(pa.float32())),
        "part": pa.repeat("part-0.parquet", int(has.sum()))})
    cfg = PreprocessConfig(embedding="none", shard_size=500, seed=4)

    tracemalloc.start()
    try:
        p = plan(listing, records, cfg)
        heap = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(p.manifest, pa.Table) and p.manifest.schema == SCHEMA
    # numpy's arrays count here too; a dict an input alone would take ~1 kB each.
    assert heap < 100 * n, heap

    m = p.manifest.to_pydict()  # the per-row reference reads plain Python lists
    names = listing["path"].to_pylist()
    assert p.pending == [names[pending]]
    assert m["path"] == sorted(names[:pending] + names[pending + 1:])
    row = {path: i for i, path in enumerate(m["path"])}
    assert m["reason"][row[names[7]]] == f"duplicate of {names[3]}"  # sorted: 3 before 7
    assert m["reason"][row[names[refused]]] == "listed but missing"
    assert (m["status"][row[names[bad]]], m["reason"][row[names[bad]]]) == \
        ("rejected", "no face found")
    ok = [i for i, status in enumerate(m["status"]) if status == "ok"]
    assert len(ok) == n - 4  # less the duplicate, the refused, the rejected, the pending
    for i in ok:
        folder = m["path"][i].split("/")[2]
        assert (m["identity"][i], m["source_identity"][i]) == (f"vggface2/{folder}", folder)
    of = split_identities([m["identity"][i] for i in ok], 0.2, 4)
    assert all(m["split"][i] == of[m["identity"][i]] for i in ok)
    groups: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "val"):
        keys = sorted((m["key"][i], i) for i in ok if m["split"][i] == split)
        assert [m["shard"][i] for _, i in keys] == \
            [f"shards/{split}-{j // 500:06d}.tar" for j in range(len(keys))]
        for key, i in keys:
            groups.setdefault(split, {}).setdefault(m["identity"][i], []).append(key)
    assert list(p.digests) == sorted({m["shard"][i][len("shards/"):] for i in ok})
    assert identities_bytes(p.identities) == json.dumps(groups, sort_keys=True,
                                                        indent=1).encode()
    # The per-input sample fields the shards' metas take, by shard.
    name, first_shard = next(p.shard_entries())
    assert name == "train-000000.tar" and first_shard.num_rows == 500
    assert first_shard["key"].to_pylist() == sorted(m["key"][i] for i in ok
                                                    if m["split"][i] == "train")[:500]
