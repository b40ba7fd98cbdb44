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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra import storage
from infra.config import StorageConfig
from infra.ray_connect import start_or_attach
from preprocessing.config import PreprocessConfig
from preprocessing.datasets import InputFile, list_inputs
from preprocessing.identity import (cluster, folder_identity, label_distances, read_labels)
from preprocessing.manifest import (IDENTITIES_FILE, MANIFEST_FILE, identities_bytes,
                                    manifest_row,
                                    manifest_bytes, write_if_changed)
from preprocessing.ray_data import map_actor_pool
from preprocessing.shards import shard_bytes
from preprocessing.split import split_identities
from recon.progress import Progress

log = logging.getLogger("wildface.preprocess")

PART_SCHEMA = pa.schema([
    ("rid", pa.string()), ("sha256", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("jpg", pa.binary()), ("lmk", pa.binary()),
    ("mask", pa.binary()), ("meta", pa.string()), ("embedding", pa.list_(pa.float32())),
])
META_COLUMNS = ["rid", "sha256", "status", "reason", "meta", "embedding"]


@dataclass
class Plan:
    rows: list[dict]
    shards: dict[str, list[dict]]  # shard name -> [{rid, key, meta}]
    identities: dict[str, dict[str, list[str]]]
    digests: dict[str, str] = field(default_factory=dict)
    label_outliers: list[str] = field(default_factory=list)  # paths far from their identity
    pending: list[str] = field(default_factory=list)  # paths without a record: retry later


def work_dir(output: str, cfg: PreprocessConfig) -> str:
    return storage.join(output, "work", cfg.fingerprint())


# ---------------------------------------------------------------------------------- scan
def scan_inputs(inputs: str | list[str], cfg: PreprocessConfig, fmt: str | None = None,
                threads: int = 8) -> list[InputFile]:
    """Every input with its hashes, sorted by manifest path. ``inputs``: a folder or s3://
    prefix (read with the dataset reader ``fmt``, default ``folders``), or ``NAME=ROOT``
    pairs, one per dataset (:mod:`preprocessing.datasets`)."""
    return list_inputs(inputs, cfg, fmt, threads)


# ------------------------------------------------------------------------------- records
def part_files(work: str) -> list[str]:
    return [u for u in storage.list_files(work) if u.endswith(".parquet")]


def _read_part(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def load_records(work: str) -> dict[str, dict]:
    """{rid: record without image bytes, plus 'part'} from every part (first one wins)."""
    out: dict[str, dict] = {}
    for uri in part_files(work):
        for rec in _read_part(uri, META_COLUMNS).to_pylist():
            if rec["rid"] not in out:
                rec["part"] = uri
                out[rec["rid"]] = rec
    return out


def todo_items(inputs: list[InputFile], done: set[str]) -> list[dict]:
    """One item per rid not yet processed (duplicates of content processed once)."""
    seen: set[str] = set()
    items = []
    for f in inputs:
        if f.reason or f.rid in done or f.rid in seen:  # refused at listing: nothing to make
            continue
        seen.add(f.rid)
        items.append({"uri": f.uri, "rid": f.rid, "sha256": f.sha256, "pts": f.pts or "",
                      "mask": f.mask or "", "guide": f.guide(),
                      "frame": "" if f.frame is None else str(f.frame)})
    return items


def write_part(work: str, records: list[dict]) -> str:
    rids = sorted(r["rid"] for r in records)
    name = hashlib.sha256("\n".join(rids).encode()).hexdigest()[:20]
    uri = storage.join(work, f"part-{name}.parquet")
    table = pa.Table.from_pylist(records, schema=PART_SCHEMA)
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


def process_images(items: list[dict], work: str, cfg: PreprocessConfig,
                   storage_cfg: StorageConfig, use_ray: bool = True,
                   on_progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Run the per-image stages over ``items`` on a Ray Data actor pool (or in this process
    when ``use_ray`` is False). ``on_progress(done, total)`` is called after each batch.
    Returns counts by status (``retry``: transient errors outlasted the retries; those
    images have no record yet)."""
    counts: dict[str, int] = defaultdict(int)
    if not items:
        return dict(counts)
    args = (cfg.model_dump_json(), storage_cfg.model_dump_json(), work)
    t0 = time.perf_counter()
    line = Progress("preprocess", len(items), "images")
    if not use_ray:
        proc = BatchProcessor(*args)
        bs = cfg.ray.batch_size
        for start in range(0, len(items), bs):
            chunk = items[start:start + bs]
            out = proc({k: [it[k] for it in chunk] for k in chunk[0]})
            _count(out, counts)
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
def _identity_mode(cfg: PreprocessConfig, inputs: list[InputFile]) -> str:
    if cfg.identity_source != "auto":
        return cfg.identity_source
    if cfg.labels:
        return "labels"
    if inputs and all(folder_identity(f.rel) for f in inputs):
        return "folder"
    return "cluster"


def plan(inputs: list[InputFile], records: dict[str, dict], cfg: PreprocessConfig) -> Plan:
    """Manifest rows for every input with a record, identities, split and the shard layout;
    inputs without one (transient errors outlasted their retries) are ``pending``."""
    # Folder, label file or clustering name what no dataset labels.
    unlabelled = [f for f in inputs if f.label is None and not f.reason]
    mode = _identity_mode(cfg, unlabelled) if unlabelled else "dataset"
    labels = read_labels(storage.read_bytes(cfg.labels), cfg.labels) if mode == "labels" else {}
    if mode == "labels" and not cfg.labels:
        raise ValueError("identity_source 'labels' needs preprocess.labels")
    if mode == "cluster" and cfg.embedding == "none":
        raise ValueError("clustering identities needs preprocess.embedding 'dlib'")

    rows: list[dict] = []
    first_of: dict[str, str] = {}
    ok: list[tuple[dict, dict]] = []  # (row, record)
    pending: list[str] = []
    for f in sorted(inputs, key=lambda f: f.path):
        source_cols = {"source": f.source, "source_identity": f.label or "", "race": f.race,
                       "frame": f.frame, "dataset_box": f.box, "dataset_landmarks": f.points}
        if f.reason:  # refused at listing (unsafe name, missing file, no label)
            rows.append(manifest_row(f.path, f.reason, f.sha256) | source_cols)
            continue
        rec = records.get(f.rid)
        if rec is None:  # transient errors outlasted the retries: neither ok nor rejected
            pending.append(f.path)
            continue
        meta = json.loads(rec["meta"])
        row = manifest_row(f.path, rec["reason"], f.sha256) | source_cols | {
            "key": f.rid[:16], "n_faces": len(meta.get("faces", [])),
            "detector_score": meta.get("detector_score"),
            "landmark_source": meta.get("landmark_source", "")}
        rows.append(row)
        if f.rid in first_of:
            row["reason"] = f"duplicate of {first_of[f.rid]}"
            continue
        first_of[f.rid] = f.path
        if rec["status"] != "ok":
            continue
        if f.label is not None:
            ident = f.label
        elif mode == "folder":
            ident = folder_identity(f.rel)
        elif mode == "labels":
            ident = labels.get(posixpath.normpath(f.rel))
        else:
            ident = "?"
        if not ident:
            row["reason"] = "no identity label" if mode == "labels" else "not in an identity folder"
            continue
        row.update(status="ok", reason="", identity=ident)
        ok.append((row, rec))

    if ok and cfg.embedding != "none":
        emb = np.array([rec["embedding"] for _, rec in ok], dtype=np.float32)
        if mode == "cluster":
            todo = [i for i, (row, _) in enumerate(ok) if not row["source_identity"]]
            labels_idx = cluster(emb[todo], cfg.cluster_threshold)
            # Named after the smallest key in the cluster: stable whatever the input order.
            names: dict[int, str] = {}
            for i, c in zip(todo, labels_idx):
                names[int(c)] = min(names.get(int(c), ok[i][0]["key"]), ok[i][0]["key"])
            for i, c in zip(todo, labels_idx):
                ok[i][0]["identity"] = f"cluster-{names[int(c)]}"
    # Namespaced by source: two datasets' 'n000002' (or two folders' 'anna') stay two people.
    for row, _ in ok:
        row["source_identity"] = row["identity"]
        if row["source"]:
            row["identity"] = f"{row['source']}/{row['identity']}"
    if ok and cfg.embedding != "none":
        dist = label_distances(emb, [row["identity"] for row, _ in ok])
        for (row, _), d in zip(ok, dist):
            row["identity_distance"] = float(d)

    split_of = split_identities([row["identity"] for row, _ in ok], cfg.val_fraction, cfg.seed)
    by_split: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for row, rec in ok:
        row["split"] = split_of[row["identity"]]
        by_split[row["split"]].append((row, rec))

    shards: dict[str, list[dict]] = {}
    identities: dict[str, dict[str, list[str]]] = {}
    digests: dict[str, str] = {}
    for split in sorted(by_split):
        members = sorted(by_split[split], key=lambda rr: rr[0]["key"])
        groups: dict[str, list[str]] = defaultdict(list)
        for i in range(0, len(members), cfg.shard_size):
            name = f"{split}-{i // cfg.shard_size:06d}.tar"
            entries = []
            h = hashlib.sha256(f"{cfg.fingerprint()}:{name}".encode())
            for row, rec in members[i:i + cfg.shard_size]:
                row["shard"] = f"shards/{name}"
                groups[row["identity"]].append(row["key"])
                meta = json.loads(rec["meta"])
                meta.update(source=row["path"], identity=row["identity"], split=split,
                            key=row["key"], sha256=row["sha256"])
                if row["source"]:
                    meta.update(dataset=row["source"], source_identity=row["source_identity"])
                meta_json = json.dumps(meta, sort_keys=True)
                entries.append({"rid": rec["rid"], "key": row["key"], "part": rec["part"],
                                "json": meta_json})
                h.update(f"{rec['rid']}:{meta_json}".encode())
            shards[name] = entries
            digests[name] = h.hexdigest()
        identities[split] = {k: sorted(v) for k, v in sorted(groups.items())}
    outliers = sorted(r["path"] for r in rows if r["status"] == "ok" and mode != "cluster"
                      and (r["identity_distance"] or 0.0) > cfg.label_check_distance)
    if outliers:
        log.warning("%d images are farther than %.2f from their identity's mean embedding "
                    "(check their labels): %s", len(outliers), cfg.label_check_distance,
                    outliers[:10])
    if pending:
        log.warning("%d images left for the next run after transient errors: %s",
                    len(pending), pending[:10])
    return Plan(rows=rows, shards=shards, identities=identities, digests=digests,
                label_outliers=outliers, pending=pending)


# -------------------------------------------------------------------------------- output
class _PartCache:
    """Recently read parts (with image bytes), by uri."""

    def __init__(self, size: int = 32):
        self.size = size
        self._parts: OrderedDict[str, dict[str, dict]] = OrderedDict()

    def get(self, uri: str) -> dict[str, dict]:
        if uri in self._parts:
            self._parts.move_to_end(uri)
        else:
            recs = _read_part(uri, ["rid", "jpg", "lmk", "mask"]).to_pylist()
            self._parts[uri] = {r["rid"]: r for r in recs}
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
    for name, entries in the_plan.shards.items():
        digest = the_plan.digests[name]
        if state.get(name) == digest and name in existing:
            continue
        samples = []
        for e in entries:
            rec = cache.get(e["part"])[e["rid"]]
            samples.append({"key": e["key"], "jpg": rec["jpg"], "lmk.npy": rec["lmk"],
                            "mask.png": rec["mask"], "json": e["json"].encode()})
        storage.write_bytes(storage.join(shard_dir, name), shard_bytes(samples))
        state[name] = digest
        write_if_changed(state_uri, json.dumps(state, sort_keys=True, indent=1).encode())
        written += 1
        log.info("wrote shard %s (%d samples)", name, len(samples))
    for name, uri in existing.items():
        if name not in the_plan.shards:
            storage.delete(uri)
            state.pop(name, None)
    write_if_changed(state_uri, json.dumps(
        {k: v for k, v in state.items() if k in the_plan.shards}, sort_keys=True, indent=1
    ).encode())
    return written


def write_outputs(output: str, the_plan: Plan) -> dict[str, bool]:
    """Manifest and identities.json (only when changed)."""
    return {
        MANIFEST_FILE: write_if_changed(storage.join(output, MANIFEST_FILE),
                                        manifest_bytes(the_plan.rows)),
        IDENTITIES_FILE: write_if_changed(storage.join(output, IDENTITIES_FILE),
                                          identities_bytes(the_plan.identities)),
    }


def summarise(the_plan: Plan) -> dict:
    ok = [r for r in the_plan.rows if r["status"] == "ok"]
    return {
        "inputs": len(the_plan.rows), "ok": len(ok), "rejected": len(the_plan.rows) - len(ok),
        "identities": {s: len(v) for s, v in the_plan.identities.items()},
        "shards": sorted(the_plan.shards),
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
    records = load_records(work)
    items = todo_items(inputs, set(records))
    process_images(items, work, cfg, storage_cfg, use_ray=use_ray)
    if items:
        records = load_records(work)
    the_plan = plan(inputs, records, cfg)
    n = write_shards(output, the_plan)
    summary = summarise(the_plan) | {"processed": len(items), "shards_written": n}
    summary["files_written"] = [k for k, v in write_outputs(output, the_plan).items() if v]
    log.info("preprocess summary: %s", summary)
    return summary
