"""The preprocessing pipeline: per-image work on Ray Data actor pools, whole-dataset work
(identities, split, shards, manifest) on the driver. Restartable and idempotent:

- Inputs are listed by the dataset readers (:mod:`preprocessing.datasets`) and hashed; an
  input's record id (``rid``) is the sha256 of its bytes (and of its annotation sidecars,
  its dataset's box and landmarks, its video frame index). Ray actors write records in atomic Parquet parts under
  ``DST/work/<config fingerprint>/``; a rerun or a resumed run processes only the rids that
  no part holds yet.
- Shards are planned deterministically (keys sorted within a split) and written as
  deterministic tar bytes; a shard whose digest is recorded in ``DST/work/shards.json`` and
  exists is skipped. Manifest and identities.json are rewritten only when they change.

Stages are separate functions so the Prefect flow can run each as a task.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra import storage
from infra.config import StorageConfig
from infra.ray_connect import start_or_attach
from preprocessing.config import PreprocessConfig
from preprocessing.datasets import guides, list_inputs, replace_rows
from preprocessing.identity import cluster, folder_identity, label_distances, read_labels
from preprocessing.manifest import (IDENTITIES_FILE, MANIFEST_FILE, identities_bytes,
                                    manifest_table, sort_by_path, table_bytes,
                                    write_if_changed)
from preprocessing.ray_data import map_actor_pool
from preprocessing.shards import shard_bytes
from preprocessing.split import split_column
from recon.progress import Progress

log = logging.getLogger("wildface.preprocess")

PART_SCHEMA = pa.schema([
    ("rid", pa.string()), ("sha256", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("jpg", pa.binary()), ("lmk", pa.binary()),
    ("mask", pa.binary()), ("meta", pa.string()), ("embedding", pa.list_(pa.float32())),
    # The manifest's columns from ``meta``: the plan reads these, never millions of metas.
    ("n_faces", pa.int32()), ("detector_score", pa.float32()), ("landmark_source", pa.string()),
])
#: What the plan reads of a record (``load_records``), beside the part that holds it.
RECORD_COLUMNS = ["rid", "status", "reason", "n_faces", "detector_score", "landmark_source",
                  "embedding"]


#: The manifest's columns a sample's meta holds (beside its record's own).
SAMPLE_FIELDS = ["path", "identity", "split", "key", "sha256", "source", "source_identity"]


@dataclass
class Plan:
    """Everything the outputs need, column-wise (a row per input or per sample, no Python
    object each)."""

    manifest: pa.Table  # preprocessing.manifest.SCHEMA, sorted by path
    shards: pa.Table  # a row per sample by shard and key: shard (name), row (of the
    #                   manifest), part (the record's)
    digests: dict[str, str] = field(default_factory=dict)  # shard name -> digest, in order
    label_outliers: list[str] = field(default_factory=list)  # paths far from their identity
    pending: list[str] = field(default_factory=list)  # paths without a record: retry later

    def shard_entries(self) -> Iterator[tuple[str, pa.Table]]:
        """(shard name, its samples: ``SAMPLE_FIELDS`` and ``part``) in order."""
        columns = self.manifest.select(SAMPLE_FIELDS)
        for name, (a, b) in zip(self.digests, _runs(self.shards["shard"])):
            part = self.shards.slice(a, b - a)
            yield name, columns.take(part["row"]).append_column("part", part["part"])

    @property
    def identities(self) -> pa.Table:
        """split, identity, key of every sample, sorted so (identities.json's order)."""
        rows = self.shards["row"].to_numpy()
        # The samples are by split and key: a stable sort by split and identity keeps the
        # keys in order, on integer ranks rather than strings.
        order = np.lexsort((_ranks(self.manifest["identity"])[rows],
                            _ranks(self.manifest["split"])[rows]))
        return self.manifest.select(["split", "identity", "key"]).take(rows[order])


def work_dir(output: str, cfg: PreprocessConfig) -> str:
    return storage.join(output, "work", cfg.fingerprint())


# ---------------------------------------------------------------------------------- scan
def scan_inputs(inputs: str | list[str], cfg: PreprocessConfig, fmt: str | None = None,
                threads: int = 8) -> pa.Table:
    """Every input with its hashes, sorted by manifest path (the listing's table,
    :data:`preprocessing.datasets.LISTING_SCHEMA`). ``inputs``: a folder or s3:// prefix
    (read with the dataset reader ``fmt``, default ``folders``), or ``NAME=ROOT`` pairs, one
    per dataset (:mod:`preprocessing.datasets`)."""
    return list_inputs(inputs, cfg, fmt, threads)


# ------------------------------------------------------------------------------- records
def part_files(work: str) -> list[str]:
    return [u for u in storage.list_files(work) if u.endswith(".parquet")]


def _read_part(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def _meta_columns(metas: list[str]) -> dict[str, list]:
    """The manifest's columns of each record's meta JSON."""
    parsed = [json.loads(m) for m in metas]
    return {"n_faces": [len(m.get("faces", [])) for m in parsed],
            "detector_score": [m.get("detector_score") for m in parsed],
            "landmark_source": [m.get("landmark_source", "") for m in parsed]}


def _codes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) int codes of a column's values, numbered as they first appear."""
    coded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
    coded = coded.combine_chunks() if isinstance(coded, pa.ChunkedArray) else coded
    return coded.indices.to_numpy(zero_copy_only=False)


def _ranks(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) each row's rank among the column's distinct values in sorted order."""
    coded = pc.dictionary_encode(values)
    coded = coded.combine_chunks() if isinstance(coded, pa.ChunkedArray) else coded
    rank = np.empty(len(coded.dictionary), np.int64)
    rank[np.asarray(pc.sort_indices(coded.dictionary))] = np.arange(len(rank))
    return rank[coded.indices.to_numpy(zero_copy_only=False)]


def _first_rows(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(K,) positions of the first row of each distinct value, ascending."""
    # dictionary_encode numbers values as they first appear: first rows come out ascending.
    return np.unique(_codes(values), return_index=True)[1]


def load_records(work: str, columns: list[str] = RECORD_COLUMNS) -> pa.Table:
    """``columns`` of every record (without image bytes), plus ``part`` (the uri of the part
    holding it). A rid in two parts has two rows: the first one counts (``index_in``'s first
    match, in the plan)."""
    uris = part_files(work)
    tables = []
    for i, uri in enumerate(uris):
        data = storage.read_bytes(uri)
        names = pq.read_schema(io.BytesIO(data)).names
        # The few distinct statuses and landmark sources as dictionaries: 4 bytes a record.
        t = pq.read_table(io.BytesIO(data), columns=[c for c in columns if c in names] + (
            ["meta"] if not set(columns) <= set(names) else []),
            read_dictionary=[c for c in ("status", "landmark_source") if c in names])
        if "meta" in t.column_names:  # a part of before: its manifest columns from the metas
            extra = _meta_columns(t["meta"].to_pylist())
            for c in set(columns) - set(names):
                column = pa.array(extra[c], PART_SCHEMA.field(c).type)
                t = t.append_column(c, column.dictionary_encode()
                                    if c == "landmark_source" else column)
        tables.append(t.select(columns).append_column(
            "part", pa.repeat(pa.scalar(i, pa.int32()), t.num_rows)))
    schema = pa.schema([PART_SCHEMA.field(c) for c in columns] + [("part", pa.int32())])
    records = pa.concat_tables(tables) if tables else schema.empty_table()
    # One dictionary of part uris: a column of them would repeat each uri per record.
    part = pa.DictionaryArray.from_arrays(records["part"].combine_chunks(),
                                          pa.array(uris, pa.string()))
    return records.set_column(records.num_columns - 1, "part", part)


def todo_items(inputs: pa.Table, records: pa.Table) -> pa.Table:
    """One row per rid not yet in ``records`` (duplicates of content processed once), with
    the string columns the per-image stage reads ('' for none)."""
    todo = pc.and_(pc.equal(inputs["reason"], ""),  # refused at listing: nothing to make
                   pc.invert(pc.is_in(inputs["rid"], value_set=records["rid"])))
    # Copied only when some rows drop out (the first run of a dataset keeps them all).
    todo = inputs if pc.all(todo).as_py() is not False else inputs.filter(todo)
    first = _first_rows(todo["rid"])
    todo = todo if len(first) == todo.num_rows else todo.take(first)
    return pa.table({
        "uri": todo["uri"], "rid": todo["rid"], "sha256": todo["sha256"],
        "pts": pc.fill_null(todo["pts"], ""), "mask": pc.fill_null(todo["mask"], ""),
        "guide": guides(todo["box"], todo["points"]),
        "frame": pc.fill_null(pc.cast(todo["frame"], pa.string()), "")})


def write_part(work: str, records: list[dict]) -> str:
    rids = sorted(r["rid"] for r in records)
    name = hashlib.sha256("\n".join(rids).encode()).hexdigest()[:20]
    uri = storage.join(work, f"part-{name}.parquet")
    columns = _meta_columns([r["meta"] for r in records])
    table = pa.Table.from_pylist([r | {k: v[i] for k, v in columns.items()}
                                  for i, r in enumerate(records)], schema=PART_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri


class BatchProcessor:
    """Callable class for ``map_batches``: models loaded once per actor; each batch becomes
    one atomic part file. Returns {rid, status} rows for progress."""

    def __init__(self, cfg_json: str, storage_json: str, work: str):
        from infra.offline import apply_offline_env
        from preprocessing.sample import RETRY, SampleMaker

        apply_offline_env()
        import cv2

        cv2.setNumThreads(1)  # actors share the cores: no intra-op thread pools
        storage.configure(StorageConfig.model_validate_json(storage_json))
        self.maker = SampleMaker(PreprocessConfig.model_validate_json(cfg_json))
        self.work = work
        self.retry = RETRY

    def __call__(self, batch: dict) -> dict:
        n = len(batch["rid"])
        items = [{k: (str(batch[k][i]) or None) for k in batch} for i in range(n)]
        records = [self.maker.make(it) for it in items]
        # A transient failure is not a property of the photo: no record, so the next run
        # processes it again instead of rejecting it for good.
        stored = [r for r in records if r["status"] != self.retry]
        if stored:
            write_part(self.work, stored)
        return {"rid": np.array([r["rid"] for r in records]),
                "status": np.array([r["status"] for r in records]),
                "reason": np.array([r["reason"] if r["status"] == self.retry else "" for r in records])}


def _count(batch: dict, counts: dict[str, int]) -> None:
    """Add a processed batch's statuses to ``counts``; log what is left for the next run."""
    for rid, status, reason in zip(batch["rid"], batch["status"], batch["reason"]):
        counts[str(status)] += 1
        if reason:
            log.warning("image %s left for the next run after transient errors: %s", rid, reason)


def process_images(items: pa.Table, work: str, cfg: PreprocessConfig,
                   storage_cfg: StorageConfig, use_ray: bool = True,
                   on_progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Run the per-image stages over ``items`` (:func:`todo_items`) on a Ray Data actor pool
    (or in this process when ``use_ray`` is False). ``on_progress(done, total)`` is called after each batch.
    Returns counts by status (``retry``: transient errors outlasted the retries; those
    images have no record yet)."""
    counts: dict[str, int] = defaultdict(int)
    if not len(items):
        return dict(counts)
    args = (cfg.model_dump_json(), storage_cfg.model_dump_json(), work)
    t0 = time.perf_counter()
    line = Progress("preprocess", len(items), "images")
    if not use_ray:
        proc = BatchProcessor(*args)
        bs = cfg.ray.batch_size
        for start in range(0, len(items), bs):
            chunk = items.slice(start, bs)
            _count(proc(chunk.to_pydict()), counts)
            line.update(start + len(chunk))
            if on_progress:
                on_progress(start + len(chunk), len(items))
        return dict(counts)

    started = start_or_attach(cfg.ray, log_to_driver=False)
    try:
        done = 0
        for batch in map_actor_pool(items, BatchProcessor, args, workers=cfg.ray.workers,
                                    cpus=cfg.ray.cpus_per_worker, gpus=cfg.ray.gpus_per_worker,
                                    batch_size=cfg.ray.batch_size):
            _count(batch, counts)
            done += len(batch["status"])
            line.update(done)
            if on_progress:
                on_progress(done, len(items))
    finally:
        if started:
            import ray

            ray.shutdown()
    log.info("per-image stages: %d images in %.1fs", len(items), time.perf_counter() - t0)
    return dict(counts)


# ---------------------------------------------------------------------------------- plan
def _identity_mode(cfg: PreprocessConfig, rels: pa.Array | pa.ChunkedArray) -> str:
    """rels: the inputs that no dataset labels."""
    if cfg.identity_source != "auto":
        return cfg.identity_source
    if cfg.labels:
        return "labels"
    if len(rels) and pc.all(pc.is_valid(folder_identity(rels))).as_py():
        return "folder"
    return "cluster"


def _rel(listing: pa.Table) -> pa.Array | pa.ChunkedArray:
    """Each row's path relative to its source's root: the path less ``<source>/``."""
    return pc.if_else(pc.equal(listing["source"], ""), listing["path"],
                      pc.replace_substring_regex(listing["path"], "^[^/]*/", "",
                                                 max_replacements=1))


def _runs(values: pa.Array | pa.ChunkedArray) -> list[tuple[int, int]]:
    """[(start, stop)] of the runs of equal neighbours of a sorted column."""
    codes = _codes(values)
    edges = np.flatnonzero(np.diff(codes)) + 1
    return list(zip(np.r_[0, edges].tolist(), np.r_[edges, len(codes)].tolist()))


def _mask(n: int, rows: np.ndarray) -> pa.Array:
    """(n,) booleans, True at ``rows``."""
    out = np.zeros(n, bool)
    out[rows] = True
    return pa.array(out)


def _scatter(mask: pa.Array, values: pa.Array | pa.ChunkedArray, fill: pa.Scalar) -> pa.Array:
    """``values`` at the rows where ``mask`` holds (in row order), ``fill`` elsewhere (the
    values themselves when it holds everywhere)."""
    if len(values) == len(mask):
        return values
    return replace_rows(pa.repeat(fill, len(mask)), mask, values)


def plan(inputs: pa.Table, records: pa.Table, cfg: PreprocessConfig) -> Plan:
    """Manifest rows for every input with a record, identities, split and the shard layout;
    inputs without one (transient errors outlasted their retries) are ``pending``.

    inputs: the listing (:func:`scan_inputs`); records: :func:`load_records`. The manifest
    shares the listing's columns (path, sha256, source, ...) rather than copying them."""
    inputs = sort_by_path(inputs)
    listed = pc.equal(inputs["reason"], "")
    # Folder, label file or clustering name what no dataset labels.
    unlabelled = pc.and_(listed, inputs["label"].is_null())
    mode = (_identity_mode(cfg, _rel(inputs.filter(unlabelled)))
            if pc.any(unlabelled).as_py() else "dataset")
    if mode == "labels" and not cfg.labels:
        raise ValueError("identity_source 'labels' needs preprocess.labels")
    labels = read_labels(storage.read_bytes(cfg.labels), cfg.labels) if mode == "labels" else {}
    if mode == "cluster" and cfg.embedding == "none":
        raise ValueError("clustering identities needs preprocess.embedding 'dlib'")

    at = pc.index_in(inputs["rid"], value_set=records["rid"])
    # Transient errors outlasted the retries: neither ok nor rejected, not in the manifest.
    waiting = pc.and_(listed, at.is_null())
    pending = pc.filter(inputs["path"], waiting).to_pylist()
    rows = inputs
    if pending:
        rows, at = inputs.filter(pc.invert(waiting)), pc.filter(at, pc.invert(waiting))
    n = rows.num_rows
    rec = records.select(["status", "reason", "n_faces", "detector_score", "landmark_source",
                          "part"] + (["embedding"] if cfg.embedding != "none" else [])).take(at)

    # Duplicates of content: the first path of a record's rid is its row, the others point
    # to it.
    with_rec = np.flatnonzero(np.asarray(at.is_valid()))
    record_of = np.asarray(at.drop_null())
    first = with_rec.copy()
    shared = np.flatnonzero(np.bincount(record_of, minlength=records.num_rows)[record_of] > 1)
    if len(shared):  # only the rows whose record another row shares
        _, lead, which = np.unique(record_of[shared], return_index=True, return_inverse=True)
        first[shared] = with_rec[shared][lead[which]]
    del record_of, shared
    dup = with_rec[first != with_rec]
    reason = pc.coalesce(rec["reason"], rows["reason"])
    reason = replace_rows(reason, _mask(n, dup), pc.binary_join_element_wise(
        "duplicate of ", pc.take(rows["path"], first[first != with_rec]), ""))
    candidate = np.zeros(n, bool)
    candidate[with_rec[first == with_rec]] = True
    candidate &= np.asarray(pc.fill_null(pc.equal(rec["status"], "ok"), False))

    ident = rows["label"]
    if mode == "folder":
        ident = pc.coalesce(ident, folder_identity(_rel(rows)))
    elif mode == "labels":
        need = _mask(n, np.flatnonzero(candidate & np.asarray(ident.is_null())))
        names = [labels.get(posixpath.normpath(r))
                 for r in pc.filter(_rel(rows), need).to_pylist()]
        ident = pc.coalesce(ident, _scatter(need, pa.array(names, pa.string()),
                                            pa.scalar(None, pa.string())))
    elif mode == "cluster":
        ident = pc.fill_null(ident, "?")
    unnamed = candidate & ~np.asarray(pc.fill_null(pc.not_equal(ident, ""), False))
    reason = pc.if_else(pa.array(unnamed), "no identity label" if mode == "labels"
                        else "not in an identity folder", reason)
    ok_rows = np.flatnonzero(candidate & ~unnamed)
    is_ok = _mask(n, ok_rows)

    def of_ok(column):  # a column's ok rows (all of it, uncopied, when every row is ok)
        return column if len(ok_rows) == n else pc.take(column, ok_rows)

    key = pc.utf8_slice_codeunits(rows["rid"], 0, 16)  # '' where refused at listing
    key_ok, ident, source = of_ok(key), of_ok(ident), of_ok(rows["source"])
    emb = None
    if len(ok_rows) and cfg.embedding != "none":
        emb = pc.list_flatten(of_ok(rec["embedding"])).to_numpy().reshape(len(ok_rows), -1)
        todo = np.flatnonzero(np.asarray(of_ok(rows["label"]).is_null()))
        if mode == "cluster" and len(todo):
            found = cluster(emb[todo], cfg.cluster_threshold)
            # Named after the smallest key in the cluster: stable whatever the input order.
            by_key = np.asarray(pc.sort_indices(pc.take(key_ok, todo)))
            _, lead = np.unique(found[by_key], return_index=True)
            lead_of = np.empty(found.max() + 1, np.int64)
            lead_of[found[by_key][lead]] = todo[by_key][lead]
            ident = replace_rows(ident, _mask(len(ok_rows), todo), pc.binary_join_element_wise(
                "cluster-", pc.take(key_ok, lead_of[found]), ""))
    # Namespaced by source: two datasets' 'n000002' (or two folders' 'anna') stay two people.
    identity = pc.if_else(pc.equal(source, ""), ident,
                          pc.binary_join_element_wise(source, ident, "/"))
    distance = None
    if emb is not None:
        distance = pa.array(label_distances(emb, identity.to_pylist()), pa.float32())
    split = split_column(identity, cfg.val_fraction, cfg.seed)

    # Shards: a split's samples by key, shard_size each.
    order = np.asarray(pc.sort_indices(pa.table({"split": split, "key": key_ok}),
                                       sort_keys=[("split", "ascending"), ("key", "ascending")]))
    in_order = pc.take(split, order)
    names, number = [], np.zeros(len(order), np.int32)
    for (a, b), split_name in zip(_runs(in_order), pc.unique(in_order).to_pylist()):
        number[a:b] = len(names) + np.arange(b - a) // cfg.shard_size
        names += [f"{split_name}-{i:06d}.tar" for i in range((b - a - 1) // cfg.shard_size + 1)]
    shard_of_ok = np.empty_like(number)
    shard_of_ok[order] = number
    shard = pc.take(pa.array([f"shards/{s}" for s in names], pa.string()), shard_of_ok)

    manifest = manifest_table({
        "path": rows["path"], "status": pc.if_else(is_ok, "ok", "rejected"),
        "reason": pc.if_else(is_ok, "", reason),
        "identity": _scatter(is_ok, identity, pa.scalar("")),
        "split": _scatter(is_ok, split, pa.scalar("")),
        "shard": _scatter(is_ok, shard, pa.scalar("")),
        "key": key, "sha256": rows["sha256"], "n_faces": pc.fill_null(rec["n_faces"], 0),
        "detector_score": rec["detector_score"],
        "landmark_source": pc.fill_null(rec["landmark_source"].cast(pa.string()), ""),
        "identity_distance": (pa.nulls(n, pa.float32()) if distance is None else
                              _scatter(is_ok, distance, pa.scalar(None, pa.float32()))),
        "source": rows["source"],
        "source_identity": (ident if len(ok_rows) == n else
                            replace_rows(pc.fill_null(rows["label"], ""), is_ok, ident)),
        "race": rows["race"], "frame": rows["frame"],
        "dataset_box": rows["box"], "dataset_landmarks": rows["points"]})
    sample_rows = ok_rows[order]
    shards = pa.table({"shard": pa.DictionaryArray.from_arrays(number, names),
                       "row": sample_rows, "part": pc.take(rec["part"], sample_rows)})
    return Plan(manifest=manifest, shards=shards,
                digests=_digests(cfg, names, rows["rid"], manifest, shards),
                label_outliers=_outliers(cfg, mode, of_ok(rows["path"]), distance),
                pending=_pending(pending))


def _digests(cfg: PreprocessConfig, names: list[str], rid: pa.ChunkedArray,
             manifest: pa.Table, shards: pa.Table) -> dict[str, str]:
    """{shard name: digest of what its bytes depend on: its records and the meta fields of
    its samples}; the samples' fields taken a block of shards at a time."""
    digests = {}
    fingerprint = cfg.fingerprint()
    runs = _runs(shards["shard"])
    block = max(1, 65536 // cfg.shard_size)
    for first in range(0, len(runs), block):
        runs_here = runs[first:first + block]
        start, stop = runs_here[0][0], runs_here[-1][1]
        rows = shards["row"].slice(start, stop - start)
        lines = pc.binary_join_element_wise(pc.take(rid, rows), *(
            pc.take(manifest[c], rows) for c in SAMPLE_FIELDS), ":")
        for name, (a, b) in zip(names[first:first + block], runs_here):
            h = hashlib.sha256(f"{fingerprint}:{name}".encode())
            h.update("\n".join(lines.slice(a - start, b - a).to_pylist()).encode())
            digests[name] = h.hexdigest()
    return digests


def _outliers(cfg: PreprocessConfig, mode: str, paths: pa.ChunkedArray,
              distance: pa.Array | None) -> list[str]:
    """The paths of labelled images farther than ``label_check_distance`` from their
    identity's mean embedding (logged)."""
    outliers = []
    if distance is not None and mode != "cluster":
        outliers = sorted(pc.filter(paths, pc.greater(distance, cfg.label_check_distance))
                          .to_pylist())
    if outliers:
        log.warning("%d images are farther than %.2f from their identity's mean embedding "
                    "(check their labels): %s", len(outliers), cfg.label_check_distance,
                    outliers[:10])
    return outliers


def _pending(pending: list[str]) -> list[str]:
    if pending:
        log.warning("%d images left for the next run after transient errors: %s",
                    len(pending), pending[:10])
    return pending


# -------------------------------------------------------------------------------- output
class _PartCache:
    """Recently read parts (with image bytes and meta), by uri; their records by key (the
    rid's first 16 hex digits, as the manifest's)."""

    def __init__(self, size: int = 32):
        self.size = size
        self._parts: OrderedDict[str, dict[str, dict]] = OrderedDict()

    def get(self, uri: str) -> dict[str, dict]:
        if uri in self._parts:
            self._parts.move_to_end(uri)
        else:
            recs = _read_part(uri, ["rid", "jpg", "lmk", "mask", "meta"]).to_pylist()
            self._parts[uri] = {r["rid"][:16]: r for r in recs}
            if len(self._parts) > self.size:
                self._parts.popitem(last=False)
        return self._parts[uri]


def write_shards(output: str, the_plan: Plan) -> int:
    """Write the planned shards that are missing or changed; delete stale ones. Returns the
    number of shards written."""
    shard_dir = storage.join(output, "shards")
    state_uri = storage.join(output, "work", "shards.json")
    state = json.loads(storage.read_bytes(state_uri)) if storage.exists(state_uri) else {}
    existing = {u.rsplit("/", 1)[-1]: u for u in storage.list_files(shard_dir)}
    cache = _PartCache()
    written = 0
    for name, entries in the_plan.shard_entries():
        digest = the_plan.digests[name]
        if state.get(name) == digest and name in existing:
            continue
        samples = []
        for e in entries.to_pylist():  # one shard's samples at a time
            rec = cache.get(e["part"])[e["key"]]
            meta = json.loads(rec["meta"])
            meta.update(source=e["path"], identity=e["identity"], split=e["split"],
                        key=e["key"], sha256=e["sha256"])
            if e["source"]:
                meta.update(dataset=e["source"], source_identity=e["source_identity"])
            samples.append({"key": e["key"], "jpg": rec["jpg"], "lmk.npy": rec["lmk"],
                            "mask.png": rec["mask"],
                            "json": json.dumps(meta, sort_keys=True).encode()})
        storage.write_bytes(storage.join(shard_dir, name), shard_bytes(samples))
        state[name] = digest
        write_if_changed(state_uri, json.dumps(state, sort_keys=True, indent=1).encode())
        written += 1
        log.info("wrote shard %s (%d samples)", name, len(samples))
    for name, uri in existing.items():
        if name not in the_plan.digests:
            storage.delete(uri)
            state.pop(name, None)
    write_if_changed(state_uri, json.dumps(
        {k: v for k, v in state.items() if k in the_plan.digests}, sort_keys=True, indent=1
    ).encode())
    return written


def write_outputs(output: str, the_plan: Plan) -> dict[str, bool]:
    """Manifest and identities.json (only when changed)."""
    return {
        MANIFEST_FILE: write_if_changed(storage.join(output, MANIFEST_FILE),
                                        table_bytes(the_plan.manifest)),
        IDENTITIES_FILE: write_if_changed(storage.join(output, IDENTITIES_FILE),
                                          identities_bytes(the_plan.identities)),
    }


def summarise(the_plan: Plan) -> dict:
    n = the_plan.manifest.num_rows
    ok = pc.sum(pc.equal(the_plan.manifest["status"], "ok")).as_py() or 0
    samples = the_plan.manifest.select(["split", "identity"]).take(the_plan.shards["row"])
    per_split = samples.group_by("split").aggregate([("identity", "count_distinct")])
    return {
        "inputs": n, "ok": ok, "rejected": n - ok,
        "identities": dict(zip(per_split["split"].to_pylist(),
                               per_split["identity_count_distinct"].to_pylist())),
        "shards": sorted(the_plan.digests),
        "label_outliers": len(the_plan.label_outliers),
        "retry_later": len(the_plan.pending),
    }


def run(input_root: str | list[str], output: str, cfg: PreprocessConfig,
        storage_cfg: StorageConfig | None = None, use_ray: bool = True,
        fmt: str | None = None) -> dict:
    """All stages in order (the Prefect flow runs the same functions as tasks), holding
    ``output``'s lock (``infra.storage.output_lock``: OutputLocked at once while another run
    writes a local ``output``)."""
    storage_cfg = storage_cfg or StorageConfig()
    storage.configure(storage_cfg)
    with storage.output_lock(output):
        return _run_stages(input_root, output, cfg, storage_cfg, use_ray, fmt)


def _run_stages(input_root: str | list[str], output: str, cfg: PreprocessConfig,
                storage_cfg: StorageConfig, use_ray: bool, fmt: str | None) -> dict:
    inputs = scan_inputs(input_root, cfg, fmt)
    work = work_dir(output, cfg)
    items = todo_items(inputs, load_records(work, ["rid"]))
    process_images(items, work, cfg, storage_cfg, use_ray=use_ray)
    the_plan = plan(inputs, load_records(work), cfg)
    n = write_shards(output, the_plan)
    summary = summarise(the_plan) | {"processed": len(items), "shards_written": n}
    summary["files_written"] = [k for k, v in write_outputs(output, the_plan).items() if v]
    log.info("preprocess summary: %s", summary)
    return summary
