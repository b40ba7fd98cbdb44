"""Dataset readers: each public face dataset read in the layout it is distributed in, listed
column-wise as one Arrow table (:data:`LISTING_SCHEMA`, a row per input) that the rest of the
pipeline consumes unchanged: millions of images without a Python object each.

``--input ROOT`` (optionally ``--format NAME``) or several ``--input NAME=ROOT`` pairs:

- ``folders``: ``<identity>/<image>`` (identity from the folder, a label file or clustering,
  decided in :func:`preprocessing.pipeline.plan`), with ``.pts`` / ``.mask.png`` sidecars;
- ``vggface2``: ``train/`` and ``test/`` ``n000002/0001_01.jpg``; the loose boxes and 5
  landmarks of ``bb_landmark/loose_bb_{train,test}.csv`` / ``loose_landmark_{train,test}.csv``;
- ``celeba``: ``img_celeba/`` or ``img_align_celeba/`` (also under ``Img/``) with
  ``identity_CelebA.txt``, ``list_bbox_celeba.txt`` and ``list_landmarks_(align_)celeba.txt``
  (also under ``Anno/``);
- ``aflw``: ``aflw.sqlite`` (also under ``data/``) and its ``flickr/<0|2|3>/`` images; each
  face is one entry (``path#face=<face_id>``) and its own identity;
- ``bupt``: BUPT-Balancedface ``<race>/<identity>/<image>``, the race kept;
- ``voxceleb2``: ``id<nnnnn>/<video>/<clip>.mp4`` (any folders above), frames sampled at
  ``preprocess.video_fps`` (``path#frame=<index>``), identity = the speaker.

A dataset's labels are namespaced by its source (``vggface2/n000002``) so two sources never
merge an identity by accident. Names read from a dataset's files (csv, txt, sqlite) are
checked with :func:`recon.formats.files.check_name` before a path is built from them; a refused
name, a listed file that is absent and an image without a label become rejected entries
(column ``reason``), accounted for in the manifest like any other bad input.

Coordinates are the photo's pixels, 0-based, x right, y down; boxes are ``(x0, y0, x1, y1)``;
dataset landmarks keep the dataset's own point order, NaN where a point is not annotated.
"""
from __future__ import annotations

import array
import csv
import hashlib
import io
import json
import logging
import math
import posixpath
import re
import sqlite3
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.request import pathname2url

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra import storage
from preprocessing import annotations
from preprocessing.config import PreprocessConfig
from preprocessing.decode import Rejected
from preprocessing.manifest import sort_by_path
from recon.formats.files import UnsafeName, check_name
from recon.inference.video import read_frames, video_fps

log = logging.getLogger("wildface.preprocess")

Box = tuple[float, float, float, float]
Points = tuple[tuple[float, float], ...]

#: The 5 points of VGGFace2's and CelebA's files, in their column order (image left/right).
FIVE_POINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
#: AFLW's 21 points, ``FeatureCoords.feature_id`` 1..21 (its ``FeatureCoordTypes`` table).
AFLW_POINTS = ("LeftBrowLeftCorner", "LeftBrowCenter", "LeftBrowRightCorner",
               "RightBrowLeftCorner", "RightBrowCenter", "RightBrowRightCorner",
               "LeftEyeLeftCorner", "LeftEyeCenter", "LeftEyeRightCorner",
               "RightEyeLeftCorner", "RightEyeCenter", "RightEyeRightCorner",
               "LeftEar", "NoseLeft", "NoseCenter", "NoseRight", "RightEar",
               "MouthLeftCorner", "MouthCenter", "MouthRightCorner", "ChinCenter")
BUPT_RACES = ("African", "Asian", "Caucasian", "Indian")


class LayoutError(ValueError):
    """An input that is not laid out as its dataset is distributed, or a wrong ``--input``."""


#: The listing: one row per input (an image, one face of it, one frame of a video).
LISTING_SCHEMA = pa.schema([
    # The manifest's path: relative to its source's root ('/' separators; '#face=' /
    # '#frame=' suffixes), after '<source>/' for a named source.
    ("path", pa.string()),
    ("uri", pa.string()),     # '' for an entry refused at listing
    ("source", pa.string()),  # the dataset ('' for a single plain folder input)
    ("label", pa.string()),   # the dataset's identity label (null: folders/labels/clustering)
    ("reason", pa.string()),  # refused at listing: unsafe name, missing file, no label ('' if not)
    ("sha256", pa.string()),  # of the file's bytes ('' for an entry refused at listing)
    ("rid", pa.string()),     # record id: sha256 of the bytes and of what else shapes the record
    ("pts", pa.string()),     # .pts sidecar (null: none)
    ("mask", pa.string()),    # .mask.png sidecar (null: none)
    ("box", pa.list_(pa.float64())),  # the dataset's face box (x0, y0, x1, y1)
    ("points", pa.list_(pa.list_(pa.float64()))),  # its landmarks (5 or 21, 2), NaN = none
    ("frame", pa.int32()),    # video frame index
    ("race", pa.string()),
])
_NOT_NULL = {"path": "", "uri": "", "source": "", "reason": "", "sha256": "", "rid": "",
             "race": ""}


def listing_table(columns: Mapping[str, Sequence | pa.Array | pa.ChunkedArray]) -> pa.Table:
    """A listing built column-wise: ``columns`` by name, of one length, ``rel`` (the path
    relative to the source's root) for ``path``; a column not given (or a null in a column
    that has no nulls) holds its empty value."""
    n = len(columns["rel"])
    columns = {"path": columns["rel"]} | {k: v for k, v in columns.items() if k != "rel"}

    def column(f: pa.Field) -> pa.Array | pa.ChunkedArray:
        if f.name not in columns:
            return pa.repeat(pa.scalar(_NOT_NULL.get(f.name), f.type), n)
        c = columns[f.name]
        c = c.cast(f.type) if isinstance(c, (pa.Array, pa.ChunkedArray)) else pa.array(c, f.type)
        return pc.fill_null(c, _NOT_NULL[f.name]) if f.name in _NOT_NULL else c

    return pa.table({f.name: column(f) for f in LISTING_SCHEMA}, schema=LISTING_SCHEMA)


class _Columns:
    """A reader's entries gathered column by column (a list per column, no object per entry);
    a column an entry leaves out is null there."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = defaultdict(list)
        self.n = 0

    def add(self, **values) -> None:
        for k, v in values.items():
            col = self.cols[k]
            col.extend([None] * (self.n - len(col)))
            col.append(v)
        self.n += 1

    def refuse(self, rel: str, why: str) -> None:
        self.add(rel=rel, reason=why)

    def table(self) -> pa.Table:
        for col in self.cols.values():
            col.extend([None] * (self.n - len(col)))
        return listing_table(self.cols if self.n else {"rel": []})


_SLICE = 4096  # rows (or files) turned into Python objects at a time


def replace_rows(values: pa.Array | pa.ChunkedArray, mask: pa.Array | pa.ChunkedArray,
                 new: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``values`` with the rows where ``mask`` holds replaced by ``new``, in order
    (``pyarrow.compute.replace_with_mask`` on table columns)."""
    def flat(a):
        return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a

    return pc.replace_with_mask(flat(values), flat(mask), flat(new).cast(values.type))


def guides(box: pa.Array | pa.ChunkedArray, points: pa.Array | pa.ChunkedArray,
           integer_box: bool = False) -> pa.Array:
    """The dataset's box/landmarks of each row as the JSON the per-image stage reads ('' where
    it has none); only rows that have them are formatted. integer_box: the box written as
    integers (AFLW's, sqlite integers, enter its record ids so)."""
    has = pc.or_(box.is_valid(), points.is_valid())
    box, points = box.filter(has), points.filter(has)
    if integer_box:
        box = box.cast(pa.list_(pa.int64()))
    values = [pa.array([json.dumps({"box": b, "points": p}, allow_nan=True) for b, p in zip(
        box.slice(i, _SLICE).to_pylist(), points.slice(i, _SLICE).to_pylist())], pa.string())
        for i in range(0, len(box), _SLICE)]
    return replace_rows(pa.repeat("", len(has)), has, pa.chunked_array(values, pa.string()))


# ---------------------------------------------------------------------------- inputs
def parse_inputs(specs: str | list[str], fmt: str | None = None) -> list[tuple[str, str, str]]:
    """``ROOT`` or ``NAME=ROOT`` strings -> [(source, format, root)]. A plain ``ROOT`` is read
    with ``fmt`` (default ``folders``); a single plain folder input keeps the bare names of
    before (source ''), every other input is namespaced by its format's name."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise LayoutError("no input given")
    if fmt is not None and fmt not in READERS:
        raise LayoutError(f"unknown format {fmt!r}; one of {', '.join(sorted(READERS))}")
    out: list[tuple[str, str, str]] = []
    for spec in specs:
        name, sep, root = spec.partition("=")
        if sep and name in READERS:
            out.append((name, name, root))
        elif sep and re.fullmatch(r"[a-z0-9_]+", name) and not storage.is_s3(spec):
            raise LayoutError(f"unknown format {name!r} in {spec!r}; one of "
                             f"{', '.join(sorted(READERS))}")
        else:
            f = fmt or "folders"
            out.append(("" if f == "folders" and len(specs) == 1 else f, f, spec))
    seen: set[str] = set()
    for source, _, root in out:
        if not root:
            raise LayoutError(f"input {source!r} has no root folder")
        if source in seen:
            raise LayoutError(f"input {source!r} given twice: each source once per run")
        seen.add(source)
    return out


def list_inputs(specs: str | list[str], cfg: PreprocessConfig, fmt: str | None = None,
                threads: int = 8) -> pa.Table:
    """Every input of every source, hashed, sorted by manifest path (:data:`LISTING_SCHEMA`)."""
    tables = []
    for source, name, root in parse_inputs(specs, fmt):
        t = READERS[name](root, cfg)
        if source:
            t = t.set_column(0, "path", pc.binary_join_element_wise(source, t["path"], "/"))
        t = t.set_column(
            LISTING_SCHEMA.get_field_index("source"), "source", pa.repeat(source, t.num_rows))
        t = hash_inputs(t, threads, integer_box=name == "aflw")
        log.info("listed %d inputs of %s under %s", t.num_rows, name, root)
        tables.append(t)
    return sort_by_path(pa.concat_tables(tables))


def _file_sha(uri: str) -> str | None:
    """The sha256 of a file's bytes; None when it cannot be read."""
    try:
        h = hashlib.sha256()
        for chunk in storage.stream(uri):
            h.update(chunk)
        return h.hexdigest()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None


def _rid(sha: str, sidecars: bool, pts_sha: str | None, mask_sha: str | None, pts: str | None,
         mask: str | None, frame: int | None, guide: str) -> str:
    """The record id: the file's sha256, or the hash of it and of what else shapes the
    record (sidecars' bytes, the dataset's box/landmarks, the frame index)."""
    parts = [sha]
    if sidecars:  # the sidecar form of before: the same rids for the same files
        parts += [pts_sha or "-" if pts else "-", mask_sha or "-" if mask else "-"]
    extra = [p for p in (guide, "" if frame is None else f"frame={frame}") if p]
    return (hashlib.sha256(":".join(parts + extra).encode()).hexdigest()
            if len(parts) > 1 or extra else sha)


def hash_inputs(listing: pa.Table, threads: int = 8, integer_box: bool = False) -> pa.Table:
    """``listing`` with ``sha256`` and ``rid`` filled in: each file is read once however many
    entries share it (an AFLW photo's faces, a video's frames). A file that cannot be read is
    refused. integer_box: as :func:`guides`'."""
    usable = pc.equal(listing["reason"], "")
    n = listing.num_rows
    # Every file an entry names (image, sidecars) encoded once: its code is its row of shas.
    kinds = [c for c in ("uri", "pts", "mask") if c == "uri" or listing[c].null_count < n]
    named = pc.dictionary_encode(pa.chunked_array(
        [pc.if_else(usable, listing[c], pa.scalar(None, pa.string()))
         for c in kinds]).combine_chunks())
    # Slices of names, not a future (nor a Python string) per file: millions would not fit.
    files = named.dictionary

    def hashed(start: int) -> pa.Array:
        return pa.array([_file_sha(u) for u in files.slice(start, _SLICE).to_pylist()],
                        pa.string())

    with ThreadPoolExecutor(threads) as pool:
        shas = pa.concat_arrays([pa.array([], pa.string())] + list(
            pool.map(hashed, range(0, len(files), _SLICE))))

    def sha_of(column: str) -> pa.Array:
        if column not in kinds:
            return pa.nulls(n, pa.string())
        i = kinds.index(column)
        codes = named.indices.slice(i * n, n)
        if i == 0 and codes.null_count == 0 and len(shas) == n and np.array_equal(
                codes.to_numpy(), np.arange(n)):  # one file an entry, in order: no copy
            return shas
        return pc.take(shas, codes)

    sha = sha_of("uri")
    unreadable = pc.and_(usable, sha.is_null())
    reason = pc.if_else(unreadable, "unreadable file", listing["reason"])
    sha = pc.fill_null(pc.if_else(pc.equal(reason, ""), sha, ""), "")
    # The record id is the file's sha256 unless something beside the bytes shapes the record.
    sidecars = pc.or_(listing["pts"].is_valid(), listing["mask"].is_valid())
    shaped = pc.and_(pc.equal(reason, ""), pc.or_(pc.or_(
        sidecars, listing["box"].is_valid()), pc.or_(listing["points"].is_valid(),
                                                     listing["frame"].is_valid())))
    sub = listing.filter(shaped).select(["pts", "mask", "box", "points", "frame"])
    sub = sub.append_column("sha", pc.filter(sha, shaped)).append_column(
        "sidecars", pc.filter(sidecars, shaped)).append_column(
        "pts_sha", pc.filter(sha_of("pts"), shaped)).append_column(
        "mask_sha", pc.filter(sha_of("mask"), shaped))
    rids = []
    for start in range(0, sub.num_rows, _SLICE):
        part = sub.slice(start, _SLICE)
        rids.append(pa.array([_rid(*row) for row in zip(
            *(part[c].to_pylist() for c in ("sha", "sidecars", "pts_sha", "mask_sha", "pts",
                                            "mask", "frame")),
            guides(part["box"], part["points"], integer_box).to_pylist())], pa.string()))
    # Shares the sha256 column's bytes when nothing beside them shapes any record.
    rid = replace_rows(sha, shaped, pa.chunked_array(rids, pa.string())) if rids else sha
    for name, column in (("reason", reason), ("sha256", sha), ("rid", rid)):
        listing = listing.set_column(LISTING_SCHEMA.get_field_index(name), name, column)
    return listing


# ------------------------------------------------------------------------------ helpers
def _image_ext(name: str, cfg: PreprocessConfig) -> bool:
    exts = {e.lower().lstrip(".") for e in cfg.extensions}
    return posixpath.splitext(name)[1].lower().lstrip(".") in exts


def _relative_column(uris: pa.Array, root: str) -> pa.Array:
    """:func:`infra.storage.relative` of every uri listed under ``root``, column-wise: the
    root's prefix cut off (each uri on its own when one does not start with it)."""
    prefix = (str(root).rstrip("/") if storage.is_s3(root) else str(Path(root))) + "/"
    if pc.all(pc.starts_with(uris, prefix)).as_py() is not False:
        return pc.utf8_slice_codeunits(uris, len(prefix))
    return pa.array([storage.relative(u, root) for u in uris.to_pylist()], pa.string())


def _files(root: str) -> dict[str, str]:
    """{path relative to root: uri} of every file under ``root``."""
    return {storage.relative(u, root): u for u in storage.list_files(root)}


def _first(files: dict[str, str], *names: str) -> str | None:
    return next((files[n] for n in names if n in files), None)


def _lines(uri: str) -> Iterator[str]:
    """The text lines of a label file, streamed (undecodable bytes replaced)."""
    with storage.open_read(uri) as raw:
        yield from io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def _safe(name: str, where: str) -> str | None:
    """``name`` when a path may be built from it, else None (logged with the file it came
    from; the caller records the rejection)."""
    try:
        return check_name(name)
    except UnsafeName as err:
        log.warning("refused a name in %s: %s", where, err)
        return None


def _box_xywh(x: float, y: float, w: float, h: float) -> Box:
    return (x, y, x + w, y + h)


def _points(values: list[float]) -> Points:
    return tuple((values[i], values[i + 1]) for i in range(0, len(values), 2))


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding ``uri``'s bytes: the file itself, or a temporary copy of an
    S3 object (for readers that need a file: sqlite3, FFmpeg)."""
    if not storage.is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="wildface-") as tmp:
        path = Path(tmp) / posixpath.basename(uri)
        with open(path, "wb") as out:
            for chunk in storage.stream(uri):
                out.write(chunk)
        yield path


# ------------------------------------------------------------------------------ folders
def read_folders(root: str, cfg: PreprocessConfig) -> pa.Table:
    """Every image under ``root`` with its ``.pts`` / ``.mask.png`` sidecars; identities are
    decided when planning (folder, label file or clustering)."""
    files = storage.list_files(root)
    present = set(files)
    out = _Columns()
    for uri in files:
        if annotations.is_sidecar(uri) or not _image_ext(uri, cfg):
            continue
        stem = annotations.sidecar_stem(uri)
        pts, mask = stem + annotations.PTS_SUFFIX, stem + annotations.MASK_SUFFIX
        out.add(uri=uri, rel=storage.relative(uri, root),
                pts=pts if cfg.use_annotations and pts in present else None,
                mask=mask if cfg.use_annotations and mask in present else None)
    return out.table()


# ----------------------------------------------------------------------------- vggface2
def _vgg_csv(uri: str | None, n_values: int) -> tuple[dict[str, int], np.ndarray]:
    """``NAME_ID,v1,..`` csv -> ({name_id: row}, (N, n_values) float32); rows with the wrong
    number of values or non-numbers are skipped (the image is then simply unguided)."""
    index: dict[str, int] = {}
    # 3.3 M rows: packed float32 (40 bytes a row), not a list of Python floats (~300).
    values = array.array("f")
    if uri is None:
        return index, np.zeros((0, n_values), np.float32)
    rows = csv.reader(_lines(uri))
    next(rows, None)  # the header: NAME_ID,X,Y,W,H / NAME_ID,P1X,...,P5Y
    for row in rows:
        if len(row) != n_values + 1:
            continue
        try:
            v = [float(x) for x in row[1:]]
        except ValueError:
            continue
        name = row[0].strip()
        if name not in index:
            index[name] = len(values) // n_values
            values.extend(v)
    return index, np.frombuffer(values, np.float32).reshape(-1, n_values)


def vggface2_listing(rels: Iterable[str] | pa.Array, listed: Mapping[str, Iterable[str]],
                     cfg: PreprocessConfig, uris: pa.Array | None = None) -> pa.Table:
    """VGGFace2's entries, column-wise: one Arrow string column is ~30 bytes a name where an
    entry object is ~1 kB, which is what keeps its 3.3 M images in memory (benchmarks/listing.py).

    rels: the files under the root, relative to it; listed: {'train' | 'test': the NAME_IDs
    of that split's bb_landmark csv files}; uris: each rel's uri (then a column ``uri``, ''
    for a name only listed). Returns columns ``rel``, ``label`` (the identity folder; null
    when refused) and ``reason`` ('' when usable), sorted by ``rel``: every image
    under ``train/`` or ``test/`` and every listed name, refused when it is absent, leads
    outside the root or is not in a ``<split>/<identity>/`` folder."""
    rels = rels if isinstance(rels, (pa.Array, pa.ChunkedArray)) else pa.array(rels, pa.string())
    exts = "|".join(re.escape(e.lower().lstrip(".")) for e in cfg.extensions)
    keep = pc.and_(pc.match_substring_regex(rels, "^(train|test)/"),
                   pc.match_substring_regex(rels, rf"\.({exts})$", ignore_case=True))
    disk = pc.filter(rels, keep)
    extra = {} if uris is None else {"uri": pc.filter(uris, keep)}
    parts = pc.extract_regex(disk, r"^(?P<split>train|test)/(?P<label>[^/]+)/[^/]+$")
    deep = pc.invert(parts.is_valid())
    label = pc.if_else(deep, pa.scalar(None, pa.string()), pc.struct_field(parts, [1]))
    if pc.any(deep).as_py():
        split_of = pc.struct_field(pc.extract_regex(disk, r"^(?P<split>train|test)/"), [0])
        reason = pc.if_else(deep, pc.binary_join_element_wise(
            "not in a ", split_of, "/<identity>/ folder", ""), "")
    else:  # the usual case: one shared '' instead of a string column built per name
        reason = pa.repeat("", len(disk))
    # Names the csv files list (NAME_ID: the path without '.jpg') that are not on disk.
    names = pa.array([f"{split}/{n}.jpg" for split in sorted(listed) for n in listed[split]],
                     pa.string())
    absent = pc.unique(pc.filter(names, pc.invert(pc.is_in(names, value_set=disk))))
    why = ["unsafe name in bb_landmark" if _safe(rel.partition("/")[2],
                                                 f"bb_landmark ({rel.partition('/')[0]})") is None
           else "listed in bb_landmark but missing" for rel in absent.to_pylist()]
    table = pa.concat_tables([
        pa.table({"rel": disk, "label": label, "reason": reason} | extra),
        pa.table({"rel": absent, "label": pa.nulls(len(absent), pa.string()),
                  "reason": pa.array(why, pa.string())}
                 | {k: pa.repeat("", len(absent)) for k in extra})])
    return sort_by_path(table, "rel")


def _csv_rows(keys: pa.Array | pa.ChunkedArray, index: Mapping[str, int],
              prefix: str) -> pa.Array:
    """The row of each of ``keys`` in a csv's ``index`` ({NAME_ID: row}, keyed here as
    ``prefix + NAME_ID``); null where the csv has none."""
    names = pa.array([prefix + k for k in index], pa.string())
    rows = pa.array(list(index.values()), pa.int64())
    return pc.take(rows, pc.index_in(keys, value_set=names))


def read_vggface2(root: str, cfg: PreprocessConfig) -> pa.Table:
    uris = pa.array(storage.list_files(root), pa.string())
    rels = _relative_column(uris, root)
    if not pc.any(pc.match_substring_regex(rels, "^(train|test)/")).as_py():
        raise LayoutError(f"vggface2 input {root}: no train/ or test/ folder")
    csv_files = {storage.relative(u, root): u
                 for u in pc.filter(uris, pc.starts_with(rels, "bb_landmark/")).to_pylist()}
    csvs = {split: (_vgg_csv(_first(csv_files, f"bb_landmark/loose_bb_{split}.csv"), 4),
                    _vgg_csv(_first(csv_files, f"bb_landmark/loose_landmark_{split}.csv"), 10))
            for split in ("train", "test")}
    listed = {split: set(boxes) | set(lmks) for split, ((boxes, _), (lmks, _)) in csvs.items()}
    table = vggface2_listing(rels, listed, cfg, uris)
    del listed, uris, rels
    ok = pc.equal(table["reason"], "")
    # 'train/n000002/0001_01.jpg' -> 'train/n000002/0001_01', its csv rows' key.
    key = pc.if_else(ok, pc.replace_substring_regex(table["rel"], r"\.[^./]*$", ""),
                     pa.scalar(None, pa.string()))
    box_v = np.concatenate([box_v for (_, box_v), _ in csvs.values()]).astype(np.float64)
    lmk_v = np.concatenate([lmk_v for _, (_, lmk_v) in csvs.values()]).astype(np.float64)
    box_row = lmk_row = pa.nulls(len(key), pa.int64())
    offset_b = offset_l = 0
    for split, ((boxes, b_v), (lmks, l_v)) in csvs.items():
        box_row = pc.coalesce(box_row, pc.add(_csv_rows(key, boxes, f"{split}/"), offset_b))
        lmk_row = pc.coalesce(lmk_row, pc.add(_csv_rows(key, lmks, f"{split}/"), offset_l))
        offset_b, offset_l = offset_b + len(b_v), offset_l + len(l_v)
    del csvs, key
    # X, Y, W, H -> x0, y0, x1, y1; the 5 points as (x, y) pairs in the file's order.
    xyxy = np.concatenate([box_v[:, :2], box_v[:, :2] + box_v[:, 2:]], axis=1)
    return listing_table({
        "rel": table["rel"], "uri": pc.if_else(ok, table["uri"], ""), "label": table["label"],
        "reason": table["reason"], "box": _list_column(xyxy, box_row),
        "points": _list_column(lmk_v.reshape(-1, 5, 2), lmk_row)})


def _list_column(values: np.ndarray, rows: pa.Array) -> pa.Array:
    """values: (N, ...) float64; rows: (M,) a row of ``values`` or null -> (M,) nested lists
    of ``values[rows]`` (null where ``rows`` is); a null takes no room."""
    valid = np.asarray(rows.is_valid())
    picked = values[np.asarray(rows.drop_null(), np.int64)]
    out: pa.Array = pa.array(picked.reshape(-1))
    for size in reversed(values.shape[2:]):  # the inner levels: full lists of ``size``
        out = pa.ListArray.from_arrays(pa.array(np.arange(0, len(out) + 1, size, np.int32)),
                                       out)
    offsets = np.zeros(len(valid) + 1, np.int32)
    offsets[1:] = np.cumsum(valid * values.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets), out, mask=pa.array(~valid))


# ------------------------------------------------------------------------------- celeba
def _celeba_list(uri: str | None, n_values: int) -> dict[str, tuple[float, ...]]:
    """``list_bbox_celeba.txt`` / ``list_landmarks_*.txt`` (a count line, a header line,
    then ``image_id v1 v2 ...``) -> {image_id: values}. 200k entries of a few numbers."""
    out: dict[str, tuple[float, ...]] = {}
    if uri is None:
        return out
    lines = _lines(uri)
    next(lines, None)  # the count
    next(lines, None)  # the column names
    for line in lines:
        fields = line.split()
        if len(fields) != n_values + 1:
            continue
        try:
            out[fields[0]] = tuple(float(v) for v in fields[1:])
        except ValueError:
            continue
    return out


def read_celeba(root: str, cfg: PreprocessConfig) -> pa.Table:
    files = _files(root)
    folder = next((f"{pre}{name}" for name in ("img_celeba", "img_align_celeba")
                   for pre in ("", "Img/") if any(r.startswith(f"{pre}{name}/") for r in files)),
                  None)
    if folder is None:
        raise LayoutError(f"celeba input {root}: no img_celeba/ or img_align_celeba/ folder")
    aligned = folder.endswith("img_align_celeba")
    anno = ("", "Anno/")
    ident_uri = _first(files, *(f"{a}identity_CelebA.txt" for a in anno))
    if ident_uri is None:
        raise LayoutError(f"celeba input {root}: no identity_CelebA.txt")
    # The boxes are in the in-the-wild photos' pixels: they do not apply to the aligned set.
    boxes = {} if aligned else _celeba_list(
        _first(files, *(f"{a}list_bbox_celeba.txt" for a in anno)), 4)
    lmk_name = "list_landmarks_align_celeba.txt" if aligned else "list_landmarks_celeba.txt"
    lmks = _celeba_list(_first(files, *(f"{a}{lmk_name}" for a in anno)), 10)
    labels: dict[str, str] = {}
    for line in _lines(ident_uri):
        fields = line.split()
        if len(fields) == 2:
            labels[fields[0]] = fields[1]
    on_disk = {rel[len(folder) + 1:] for rel in files
               if rel.startswith(folder + "/") and _image_ext(rel, cfg)}
    out = _Columns()
    for name in sorted(on_disk | set(labels)):
        rel = f"{folder}/{name}"
        if name not in on_disk:
            out.refuse(rel, "unsafe name in identity_CelebA.txt"
                       if _safe(name, "identity_CelebA.txt") is None or "/" in name
                       else "listed in identity_CelebA.txt but missing")
        elif name not in labels:
            out.refuse(rel, "no identity in identity_CelebA.txt")
        else:
            b, p = boxes.get(name), lmks.get(name)
            out.add(uri=files[rel], rel=rel, label=labels[name],
                    box=None if b is None else _box_xywh(*b),
                    points=None if p is None else _points(list(p)))
    return out.table()


# --------------------------------------------------------------------------------- aflw
def read_aflw(root: str, cfg: PreprocessConfig) -> pa.Table:
    """Each face of ``aflw.sqlite`` (read-only) with its rectangle and 21 points."""
    files = _files(root)
    db_rel = next((r for r in ("aflw.sqlite", "data/aflw.sqlite") if r in files), None)
    if db_rel is None:
        raise LayoutError(f"aflw input {root}: no aflw.sqlite")
    images = posixpath.join(posixpath.dirname(db_rel), "flickr")
    out = _Columns()
    with local_copy(files[db_rel]) as db:
        con = sqlite3.connect(f"file:{pathname2url(str(db.resolve()))}?mode=ro", uri=True)
        try:
            faces = con.execute(
                "SELECT f.face_id, i.filepath, r.x, r.y, r.w, r.h FROM Faces f "
                "JOIN FaceImages i ON i.file_id = f.file_id "
                "LEFT JOIN FaceRect r ON r.face_id = f.face_id ORDER BY f.face_id")
            coords = con.execute("SELECT face_id, feature_id, x, y FROM FeatureCoords "
                                 "ORDER BY face_id, feature_id")
            # Both cursors run in face_id order: merged as they stream, nothing held.
            pending = next(coords, None)
            last_id = None
            for face_id, filepath, x, y, w, h in faces:
                if face_id == last_id:  # a second FaceRect row: the first one counts
                    continue
                last_id = face_id
                pts = np.full((len(AFLW_POINTS), 2), np.nan)
                while pending is not None and pending[0] <= face_id:
                    if pending[0] == face_id and 1 <= pending[1] <= len(AFLW_POINTS):
                        pts[pending[1] - 1] = (pending[2], pending[3])
                    pending = next(coords, None)
                name = str(filepath)
                rel = f"{images}/{name}#face={face_id}"
                if _safe(name, "aflw.sqlite") is None:
                    out.refuse(rel, "unsafe name in aflw.sqlite")
                    continue
                uri = files.get(f"{images}/{name}")
                if uri is None:
                    out.refuse(rel, "listed in aflw.sqlite but missing")
                    continue
                box = None if None in (x, y, w, h) else _box_xywh(x, y, w, h)
                out.add(uri=uri, rel=rel, label=str(face_id), box=box,
                        points=[(float(a), float(b)) for a, b in pts])
        finally:
            con.close()
    return out.table()


# --------------------------------------------------------------------------------- bupt
def read_bupt(root: str, cfg: PreprocessConfig) -> pa.Table:
    files = _files(root)
    if not any(r.split("/")[0] in BUPT_RACES for r in files):
        raise LayoutError(f"bupt input {root}: no {'/, '.join(BUPT_RACES)}/ folder")
    out = _Columns()
    for rel, uri in sorted(files.items()):
        if not _image_ext(rel, cfg):
            continue
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] not in BUPT_RACES:
            out.refuse(rel, f"not in a <race>/<identity>/ folder ({', '.join(BUPT_RACES)})")
            continue
        out.add(uri=uri, rel=rel, label=parts[1], race=parts[0])
    return out.table()


# ---------------------------------------------------------------------------- voxceleb2
_SPEAKER = re.compile(r"id\d+")


def frame_indices(fps: float, duration: float, rate: float, limit: int) -> list[int]:
    """Frames sampled ``rate`` times a second from a video of ``duration`` seconds at ``fps``:
    the frame shown at t = 0, 1/rate, 2/rate, ... (at most ``limit``)."""
    n = math.floor(fps * duration + 1e-6)
    out: list[int] = []
    k = 0
    while len(out) < limit:
        i = math.floor(k * fps / rate + 1e-6)
        if i >= n:
            break
        if not out or i > out[-1]:
            out.append(i)
        k += 1
    return out


def _video_timing(path: Path) -> tuple[float, float]:
    """(fps, duration in s) from the container's header, without decoding frames."""
    import imageio.v2 as iio

    with iio.get_reader(path, format="FFMPEG") as reader:
        duration = float(reader.get_meta_data().get("duration") or 0.0)
    return video_fps(path), duration


def read_voxceleb2(root: str, cfg: PreprocessConfig) -> pa.Table:
    out = _Columns()
    for rel, uri in sorted(_files(root).items()):
        if not rel.lower().endswith(".mp4"):
            continue
        parts = rel.split("/")
        if len(parts) < 3 or not _SPEAKER.fullmatch(parts[-3]):
            out.refuse(rel, "not in an id<nnnnn>/<video>/ folder")
            continue
        try:
            with local_copy(uri) as path:
                fps, duration = _video_timing(path)
        except Exception as err:  # noqa: BLE001 - FFmpeg's errors vary; the clip is refused
            out.refuse(rel, f"unreadable video: {type(err).__name__}: {err}")
            continue
        frames = frame_indices(fps, duration, cfg.video_fps, cfg.video_max_frames)
        if not frames:
            out.refuse(rel, "video without frames")
        for i in frames:
            out.add(uri=uri, rel=f"{rel}#frame={i:06d}", label=parts[-3], frame=i)
    return out.table()


READERS: dict[str, Callable[[str, PreprocessConfig], pa.Table]] = {
    "folders": read_folders, "vggface2": read_vggface2, "celeba": read_celeba,
    "aflw": read_aflw, "bupt": read_bupt, "voxceleb2": read_voxceleb2,
}


# ------------------------------------------------------------------------ video frames
class VideoFrames:
    """Frame ``index`` of a video, for the per-image stage. The last video stays open so a
    clip's sampled frames (consecutive inputs) are decoded in one pass."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._frames: Iterator[np.ndarray] | None = None
        self._next = 0

    def _open(self, key: str, data: bytes) -> None:
        self.close()
        self._tmp = tempfile.TemporaryDirectory(prefix="wildface-video-")
        path = Path(self._tmp.name) / "clip.mp4"
        path.write_bytes(data)
        self._key, self._frames, self._next = key, read_frames(path), 0

    def __call__(self, data: bytes, index: int, max_pixels: int, min_size: int) -> np.ndarray:
        """data: the video's bytes -> (H, W, 3) uint8; Rejected past the end or when the
        frame breaks the image size limits."""
        key = hashlib.sha256(data).hexdigest()
        if key != self._key or index < self._next:
            self._open(key, data)
        try:
            while True:
                frame = next(self._frames)
                self._next += 1
                if self._next - 1 == index:
                    break
        except StopIteration:
            self.close()
            raise Rejected(f"frame {index} is past the end of the video") from None
        except Exception as err:  # noqa: BLE001 - a broken stream is this input's fault
            self.close()
            raise Rejected(f"unreadable video: {type(err).__name__}: {err}") from None
        h, w = frame.shape[:2]
        if h * w > max_pixels:
            raise Rejected(f"video frame too large ({w}x{h} pixels)")
        if min(h, w) < min_size:
            raise Rejected(f"too small ({w}x{h})")
        return frame

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()  # type: ignore[attr-defined]
        if self._tmp is not None:
            self._tmp.cleanup()
        self._key, self._tmp, self._frames, self._next = None, None, None, 0


__all__ = ["AFLW_POINTS", "BUPT_RACES", "FIVE_POINTS", "LISTING_SCHEMA", "LayoutError",
           "READERS", "VideoFrames", "frame_indices", "guides", "hash_inputs", "list_inputs",
           "listing_table", "local_copy", "parse_inputs", "replace_rows", "vggface2_listing"]
