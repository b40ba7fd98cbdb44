"""``wildface reconstruct``: photos, folders, videos or a bucket -> per-face 3D outputs, in
this process or as a Ray Data batch job (``--ray``).

Faces are found and cropped by the preprocessing's own path (:mod:`preprocessing.faces`:
decode, ``<name>.pts`` annotations beside an image when ``preprocess.use_annotations``, else the
configured detector and 68 landmarks, the plausibility check), at the model's input size and
test-time scale (``data.eval_scale`` x the landmark square, as the training's evaluation crop).

Aligned inputs (``aligned=True``, ``wildface reconstruct --aligned``): each image (or video
frame) is already a face crop; it is resized whole to the model's input size, with no
detection. Only square inputs are taken (a resize of another shape would stretch the face; such
an input is rejected with its size as the reason). Each face folder then also holds
``displacement.npy`` and ``landmarks2d`` in the input's pixels
(:func:`recon.inference.reconstruct.write_face` with ``input_size``).

Output: one folder per input, ``OUT/<input name>/`` (the input's path relative to the folder
or prefix it was found in, without its suffix):

- images: ``face_00/``, ``face_01/``, ... (main face first; :func:`recon.inference.reconstruct.write_face`);
- videos: ``face_00/`` for the first frame with a face and ``frames.parquet``, one row per
  frame read: ``frame``, ``time_s``, ``status`` (ok | no face | failed: non-finite codes or
  mesh), ``reason`` and the codes (``shape``, ``tex``, ``exp``, ``pose``, ``cam``, ``light``
  (27), ``detail``) as lists;
- ``result.json``, written LAST (the completion marker): ``status`` (ok | rejected | error),
  ``reason``, ``faces`` (folders), ``failed_faces`` (face, reason), the model's identity.

Resumable: an input whose folder has a ``result.json`` with status ok or rejected is skipped;
an input with no marker (interrupted) or status error is redone from scratch. Every input
ends with outputs or a recorded reason; a face that cannot be reconstructed is listed and the
other faces of its photo still complete. ``OUT/summary.json`` counts the statuses.

Names from outside: an input whose name cannot be a folder below ``OUT``
(:func:`recon.formats.files.check_name`: ``..`` or empty parts, an absolute key, control or shell
characters) is rejected with the reason in the summary and gets no folder; every folder is
checked to lie inside ``OUT`` (symlinks followed) before anything in it is deleted or written.
A local ``OUT`` is locked while the job runs (``infra.storage.output_lock``).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows.registry import (ModelFiles, load_model, pack_model_files, resolve_model,
                            unpack_model_files)
from infra import storage
from preprocessing.faces import FaceFinder, crop_face
from recon.progress import Progress

log = logging.getLogger(__name__)

MARKER = "result.json"
SUMMARY = "summary.json"
FINAL = ("ok", "rejected")  # statuses a rerun keeps; "error" is retried


@dataclass(frozen=True)
class InputItem:
    """One input: ``uri`` (path or s3://), ``name`` (its output folder), ``kind`` (image |
    video), ``pts`` (an annotation sidecar or ""), ``unsafe`` (why its name cannot be an
    output folder, then ``name`` is ""; such an input is rejected, never read)."""

    uri: str
    name: str
    kind: str
    pts: str = ""
    unsafe: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _suffix(uri: str) -> str:
    return posixpath.splitext(str(uri))[1].lower()


def list_inputs(inputs: Iterable[str], image_extensions: Iterable[str],
                use_annotations: bool = True) -> list[InputItem]:
    """Expand files, folders and s3:// prefixes into inputs (images and videos), sorted;
    output names are unique (a clash keeps the suffix in the name). A name that fails
    :func:`recon.formats.files.check_name` gives an item with ``unsafe`` set instead."""
    from preprocessing import annotations
    from recon.formats.files import UnsafeName, check_name
    from recon.inference.video import VIDEO_SUFFIXES, ANIMATION_SUFFIXES

    image_exts = {"." + e.lower().lstrip(".") for e in image_extensions} - set(ANIMATION_SUFFIXES)
    video_exts = set(VIDEO_SUFFIXES) | set(ANIMATION_SUFFIXES)
    found: list[tuple[str, str]] = []  # (uri, relative name)
    items: list[InputItem] = []
    for raw in inputs:
        raw = str(raw)
        if storage.is_s3(raw) or Path(raw).is_dir():
            files = storage.list_files(raw)
            for uri in files:
                if annotations.is_sidecar(uri) or _suffix(uri) not in image_exts | video_exts:
                    continue
                try:
                    found.append((uri, storage.relative(uri, raw)))
                except ValueError as err:  # a link out of the folder
                    items.append(InputItem(uri=uri, name="", kind="image",
                                           unsafe=f"unsafe name: {err}"))
        elif Path(raw).is_file():
            found.append((raw, Path(raw).name))
        else:
            raise FileNotFoundError(f"input not found: {raw}")
    names: dict[str, int] = {}
    for uri, rel in sorted(found):
        stem, suffix = posixpath.splitext(rel.replace(os.sep, "/"))
        names[stem] = names.get(stem, 0) + 1
        name = stem if names[stem] == 1 else f"{stem}{suffix.replace('.', '_')}"
        kind = "video" if suffix.lower() in video_exts else "image"
        try:  # an S3 key with '..' or '//' parts, a file name with shell characters, ...
            check_name(name)
        except UnsafeName as err:
            items.append(InputItem(uri=uri, name="", kind=kind, unsafe=f"unsafe name: {err}"))
            continue
        pts = ""
        if kind == "image" and use_annotations:
            side = annotations.sidecar_stem(uri) + annotations.PTS_SUFFIX
            pts = side if (storage.is_s3(uri) and storage.exists(side)) or \
                (not storage.is_s3(uri) and Path(side).is_file()) else ""
        items.append(InputItem(uri=uri, name=name, kind=kind, pts=pts))
    return sorted(items, key=lambda it: it.uri)


# -- one input -----------------------------------------------------------------------------------
def _atomic_json(path: Path, payload: dict) -> None:
    from recon.formats.files import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())


def read_marker(out: str, name: str) -> dict | None:
    uri = storage.join(out, name, MARKER)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except (ValueError, OSError):
        return None


def is_done(out: str, name: str) -> bool:
    marker = read_marker(out, name)
    return marker is not None and marker.get("status") in FINAL


class InputReconstructor:
    """Reconstructs inputs one by one into ``out`` (a folder or s3:// prefix)."""

    def __init__(self, recon, finder: FaceFinder, out: str, batch_size: int = 8,
                 video_every: int = 1, video_max_frames: int | None = None,
                 aligned: bool = False) -> None:
        self.recon, self.finder, self.out = recon, finder, str(out)
        self.batch_size = batch_size
        self.video_every, self.video_max_frames = video_every, video_max_frames
        self.aligned = aligned

    def aligned_crop(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An aligned input (H, W, 3) uint8 resized whole to the model's crop: (S, S, 3)
        uint8 and the input->crop (2, 3) transform (pixel centres at integers). Raises
        :class:`_Rejected` for a non-square input."""
        import cv2

        from preprocessing.crop import scale_shift_affine

        h, w = rgb.shape[:2]
        if h != w:
            raise _Rejected(f"an aligned input must be a square face crop, got {w} x {h} "
                            f"pixels (crop it square, or leave out --aligned to detect faces)")
        size = self.recon.image_size
        # Both interpolations keep the pixel-centre grid of scale_shift_affine: the image's
        # outer edges map to the crop's, so [-1, 1] crop coordinates are the input's too.
        interp = cv2.INTER_AREA if w > size else cv2.INTER_LINEAR
        crop = rgb.copy() if w == size else cv2.resize(rgb, (size, size), interpolation=interp)
        return crop, scale_shift_affine(size / w, np.zeros(2))

    def __call__(self, item: InputItem) -> dict[str, Any]:
        """Write the input's folder (marker last) and return its result. An input whose
        folder would not lie inside ``out`` is rejected before anything is deleted or
        written (no marker: the result is all there is)."""
        from recon.formats.files import UnsafeName, check_name, path_inside

        started = time.perf_counter()
        local_out = not storage.is_s3(self.out)
        try:
            check_name(item.name)  # on s3:// the name becomes the keys below ``out``
            stage = path_inside(self.out, item.name) if local_out else Path(
                tempfile.mkdtemp(prefix="wildface-recon-"))
        except UnsafeName as err:
            return {"input": item.uri, "name": item.name, "kind": item.kind,
                    "status": "rejected", "reason": f"unsafe name: {err}", "faces": [],
                    "failed_faces": []}
        if local_out and stage.exists():
            shutil.rmtree(stage)  # an interrupted or failed attempt: start clean
        stage.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"input": item.uri, "name": item.name, "kind": item.kind,
                                  "status": "ok", "reason": "", "faces": [], "failed_faces": []}
        from preprocessing.decode import Rejected

        try:
            if item.kind == "video":
                self._video(item, stage, result)
            else:
                self._image(item, stage, result)
        except (_Rejected, Rejected) as err:
            result.update(status="rejected", reason=str(err))
        except Exception as err:  # noqa: BLE001 - recorded; the other inputs go on
            log.exception("reconstructing %s failed", item.uri)
            result.update(status="error", reason=f"{type(err).__name__}: {err}")
        result["model"] = self.recon.info.as_dict()
        result["seconds"] = round(time.perf_counter() - started, 3)
        _atomic_json(stage / MARKER, result)
        if not local_out:
            files = sorted(p for p in stage.rglob("*") if p.is_file() and p.name != MARKER)
            for p in files + [stage / MARKER]:  # the marker last
                storage.put_file(p, storage.join(self.out, item.name,
                                                 p.relative_to(stage).as_posix()))
            shutil.rmtree(stage, ignore_errors=True)
        return result

    def _image(self, item: InputItem, stage: Path, result: dict) -> None:
        import torch

        from recon.inference.reconstruct import NonFiniteOutput, write_face

        rgb = self.finder.decode(storage.read_bytes(item.uri))
        if self.aligned:
            return self._aligned_image(item, rgb, stage, result)
        pts = storage.read_bytes(item.pts) if item.pts else None
        faces, dropped = self.finder.find(rgb, pts)
        result["failed_faces"] = [{"face": d.split(":")[0], "reason": d.split(": ", 1)[-1]}
                                  for d in dropped]
        if not faces:
            raise _Rejected("no face found" if not dropped else "; ".join(dropped))
        r = self.recon
        for start in range(0, len(faces), self.batch_size):
            chunk = faces[start:start + self.batch_size]
            crops = [crop_face(rgb, f.landmarks, r.image_size, r.crop_scale) for f in chunk]
            batch = np.stack([c[0] for c in crops])
            try:
                rec = r.reconstruct(batch)
            except Exception as err:  # noqa: BLE001 - these faces fail, the others go on
                for k in range(len(chunk)):
                    result["failed_faces"].append({"face": f"face {start + k}",
                                                   "reason": f"{type(err).__name__}: {err}"})
                continue
            x = r.to_tensor(batch)
            for k, (face, (_, transform, lmk)) in enumerate(zip(chunk, crops)):
                folder = f"face_{start + k:02d}"
                try:
                    write_face(stage / folder, r, rec, k, x[k], torch.from_numpy(lmk), extra={
                        "source": item.uri, "face_index": start + k,
                        "detection": {"box": [round(float(v), 2) for v in face.box],
                                      "score": face.score, "landmarks_from": face.source},
                        "landmarks_photo": np.round(face.landmarks, 2).tolist(),
                        "crop_transform": np.round(transform, 6).tolist(),
                        "crop_size": r.image_size, "crop_scale": r.crop_scale})
                except NonFiniteOutput as err:  # this face fails (nothing written), others go on
                    result["failed_faces"].append({"face": f"face {start + k}",
                                                   "reason": str(err)})
                    continue
                result["faces"].append(folder)
        if not result["faces"]:
            raise _Rejected("; ".join(f["reason"] for f in result["failed_faces"]))

    def _aligned_image(self, item: InputItem, rgb: np.ndarray, stage: Path,
                       result: dict) -> None:
        from recon.inference.reconstruct import NonFiniteOutput, write_face

        r = self.recon
        crop, transform = self.aligned_crop(rgb)
        rec = r.reconstruct(crop[None])
        try:
            write_face(stage / "face_00", r, rec, 0, r.to_tensor(crop[None])[0],
                       input_size=rgb.shape[1], extra={
                           "source": item.uri, "face_index": 0,
                           "crop_transform": np.round(transform, 6).tolist(),
                           "crop_size": r.image_size})
        except NonFiniteOutput as err:  # nothing written: recorded as a face that failed
            result["failed_faces"].append({"face": "face 0", "reason": str(err)})
            raise _Rejected(str(err)) from None
        result["faces"].append("face_00")

    def _video(self, item: InputItem, stage: Path, result: dict) -> None:
        from recon.inference.video import read_frames, video_fps

        r = self.recon
        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="wildface-video-") as tmp:
            path = Path(item.uri)
            if storage.is_s3(item.uri):
                path = Path(tmp) / posixpath.basename(item.uri)
                path.write_bytes(storage.read_bytes(item.uri))
            try:
                fps = video_fps(path)
            except Exception as err:  # noqa: BLE001 - any decoder refusal
                raise _Rejected(f"not a readable video: {err}") from None
            # (frame, crop, crop landmarks or None, aligned input's side or None)
            pending: list[tuple[int, np.ndarray, np.ndarray | None, int | None]] = []
            for i, frame in enumerate(read_frames(path, self.video_every, self.video_max_frames)):
                index = i * self.video_every
                if self.aligned:
                    pending.append((index, self.aligned_crop(frame)[0], None, frame.shape[1]))
                    if len(pending) == self.batch_size:
                        self._video_batch(pending, rows, stage, result, fps)
                        pending = []
                    continue
                faces, dropped = self.finder.find(frame)
                if not faces:
                    rows.append({"frame": index, "time_s": index / fps, "status": "no face",
                                 "reason": "; ".join(dropped) or "no face found"})
                    continue
                crop, _, lmk = crop_face(frame, faces[0].landmarks, r.image_size, r.crop_scale)
                pending.append((index, crop, lmk, None))
                if len(pending) == self.batch_size:
                    self._video_batch(pending, rows, stage, result, fps)
                    pending = []
            if pending:
                self._video_batch(pending, rows, stage, result, fps)
        if not rows:
            raise _Rejected("no frames")
        _write_frames(stage / "frames.parquet", sorted(rows, key=lambda row: row["frame"]))
        result["frames"] = len(rows)
        result["frames_ok"] = sum(row["status"] == "ok" for row in rows)
        if not result["frames_ok"]:
            raise _Rejected("no face in any frame")

    def _video_batch(self, pending, rows, stage, result, fps) -> None:
        import torch

        from recon.inference.reconstruct import NonFiniteOutput, check_face_finite, codes_dict, write_face

        r = self.recon
        batch = np.stack([p[1] for p in pending])
        first = not result["faces"]
        rec = r.reconstruct(batch, render=first)
        ok = []
        for k, (index, *_) in enumerate(pending):
            try:
                check_face_finite(rec, k)
            except NonFiniteOutput as err:  # this frame fails, the others go on
                rows.append({"frame": index, "time_s": index / fps, "status": "failed",
                             "reason": str(err)})
                continue
            ok.append(k)
            codes = codes_dict(rec.codes, k)
            codes["light"] = np.asarray(codes["light"]).ravel().tolist()
            rows.append({"frame": index, "time_s": index / fps, "status": "ok", "reason": "",
                         **codes})
        if first and ok:
            k = ok[0]
            index, _, given, input_size = pending[k]
            write_face(stage / "face_00", r, rec, k, r.to_tensor(batch)[k],
                       None if given is None else torch.from_numpy(given),
                       extra={"source": result["input"], "frame": index},
                       input_size=input_size)
            result["faces"].append("face_00")


class _Rejected(Exception):
    """An input that cannot be reconstructed (a final, recorded outcome)."""


def _write_frames(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from recon.formats.files import atomic_write_bytes

    keys = ("shape", "tex", "exp", "pose", "cam", "light", "detail")
    columns: dict[str, list] = {"frame": [], "time_s": [], "status": [], "reason": []}
    columns.update({k: [] for k in keys})
    for row in rows:
        for k in columns:
            columns[k].append(row.get(k))
    table = pa.table({k: (pa.array(v, pa.list_(pa.float32())) if k in keys else pa.array(v))
                      for k, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


# -- the job ------------------------------------------------------------------------------------
class _RayReconstructor:
    """Ray Data actor: loads the model and the face finder once, reconstructs items."""

    def __init__(self, model, face_json: str, cfg_json: str, out: str,
                 aligned: bool = False) -> None:
        """model: :func:`flows.registry.pack_model_files`'s packed model, or a Ray object
        reference to it (this actor's node may not see the driver's disk)."""
        import ray

        from flows.config import WildfaceConfig
        from infra.offline import apply_offline_env
        from recon.config import FaceModelConfig
        from recon.devices import set_cpu_threads

        apply_offline_env()
        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        self._model_dir = tempfile.TemporaryDirectory(prefix="wildface-model-")
        files = unpack_model_files(model, self._model_dir.name)
        cfg = WildfaceConfig.model_validate_json(cfg_json)
        storage.configure(cfg.storage)
        # As many threads as CPUs Ray reserved for this actor (not OMP_NUM_THREADS, which a
        # user's environment may set for the whole machine).
        set_cpu_threads(max(1, int(cfg.reconstruct.ray.cpus_per_worker)))
        face = FaceModelConfig.model_validate_json(face_json) if face_json else None
        recon = load_model(files, face_model=face, device=cfg.reconstruct.device,
                           refine=cfg.reconstruct.refine)
        rc = cfg.reconstruct
        self.run = InputReconstructor(recon, FaceFinder(cfg.preprocess), out, rc.batch_size,
                                      rc.video_every, rc.video_max_frames, aligned=aligned)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uri"])
        results = [self.run(InputItem(**{k: str(batch[k][i]) for k in batch})) for i in range(n)]
        return {"name": np.array([r["name"] for r in results]),
                "status": np.array([r["status"] for r in results]),
                "reason": np.array([r["reason"] for r in results])}


def run_batch(inputs: Iterable[str], out: str, model: str, cfg, *, use_ray: bool = False,
              face_model: str | None = None, tracking_uri: str | None = None,
              progress: Callable[[int, int, dict], None] | None = None,
              aligned: bool = False) -> dict[str, Any]:
    """Reconstruct every input into ``out`` (see the module doc); skip finished ones.

    model: ``--model`` (:mod:`flows.registry`); cfg: ``WildfaceConfig``; face_model: a
    configured face model that must match the model's; progress(done, total, result) after
    each input; aligned: every input is a square face crop (no detection). Returns and
    writes ``OUT/summary.json``: counts by status and the failures.
    OutputLocked at once when another job holds a local ``out``.
    """
    storage.configure(cfg.storage)
    with storage.output_lock(out):
        return _run_batch(inputs, out, model, cfg, use_ray, face_model, tracking_uri, progress,
                          aligned)


def _run_batch(inputs: Iterable[str], out: str, model: str, cfg, use_ray: bool,
               face_model: str | None, tracking_uri: str | None,
               progress: Callable[[int, int, dict], None] | None,
               aligned: bool) -> dict[str, Any]:
    from recon.config import FaceModelConfig

    pc = cfg.preprocess
    out_prefix = str(out).rstrip("/") + "/" if storage.is_s3(out) else str(Path(out).resolve()) + os.sep
    items = [it for it in list_inputs(inputs, pc.extensions, pc.use_annotations)
             if not (it.uri if storage.is_s3(it.uri) else str(Path(it.uri).resolve())
                     ).startswith(out_prefix)]  # never our own outputs
    for it in items:
        if it.unsafe:
            log.warning("rejected %s: %s", it.uri, it.unsafe)
    todo = [it for it in items if not it.unsafe and not is_done(out, it.name)]
    log.info("%d inputs, %d already done or rejected, %d to reconstruct", len(items),
             len(items) - len(todo), len(todo))
    started = time.perf_counter()
    rc = cfg.reconstruct
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wildface-model-") as tmp:
        files = resolve_model(model, tmp, tracking_uri)
        configured = FaceModelConfig(path=face_model) if face_model else None

        line = Progress("reconstruct", len(todo), "inputs")

        def report(result: dict) -> None:
            results.append(result)
            log.info("reconstructed %d/%d inputs (%s: %s)", len(results), len(todo),
                     result["name"], result["status"])
            line.update(len(results))
            if progress is not None:
                progress(len(results), len(todo), result)

        if todo and not use_ray:
            from recon.devices import set_cpu_threads

            set_cpu_threads(rc.threads)
            recon = load_model(files, face_model=configured, device=rc.device, refine=rc.refine)
            run = InputReconstructor(recon, FaceFinder(pc), out, rc.batch_size,
                                     rc.video_every, rc.video_max_frames, aligned=aligned)
            for item in todo:
                report(run(item))
        elif todo:
            _run_ray(todo, out, files, configured, cfg, report, aligned)
    return _summary(out, items, time.perf_counter() - started, len(todo),
                    {r["name"]: r for r in results})


def _run_ray(todo: list[InputItem], out: str, files: ModelFiles, configured, cfg,
             report: Callable[[dict], None], aligned: bool = False) -> None:
    import ray

    from flows.ray_cluster import check_gpus
    from infra.ray_connect import start_or_attach
    from preprocessing.ray_data import map_actor_pool

    rc = cfg.reconstruct
    started = start_or_attach(rc.ray, log_to_driver=False)
    face_json = configured.model_dump_json() if configured else ""
    try:
        check_gpus(rc.ray.gpus_per_worker, "reconstruct.ray.gpus_per_worker", rc.ray.address)
        # The model through the object store: actors may run on nodes without this disk.
        model = ray.put(pack_model_files(files))
        args = (model, face_json, cfg.model_dump_json(), str(out), aligned)
        for batch in map_actor_pool([it.as_dict() for it in todo], _RayReconstructor, args,
                                    workers=rc.ray.workers, cpus=rc.ray.cpus_per_worker,
                                    gpus=rc.ray.gpus_per_worker, batch_size=1):
            for i in range(len(batch["name"])):
                report({"name": str(batch["name"][i]), "status": str(batch["status"][i]),
                        "reason": str(batch["reason"][i])})
    finally:
        if started:
            ray.shutdown()


def _summary(out: str, items: list[InputItem], seconds: float, processed: int,
             results: dict[str, dict]) -> dict[str, Any]:
    """Counts and failures from the markers; ``results`` (by name) stand in for inputs
    rejected without a folder."""
    counts: dict[str, int] = {}
    failures = []
    for it in items:
        marker = ({"status": "rejected", "reason": it.unsafe} if it.unsafe
                  else read_marker(out, it.name) or results.get(it.name))
        status = marker.get("status", "missing") if marker else "missing"
        counts[status] = counts.get(status, 0) + 1
        if status != "ok":
            failures.append({"input": it.uri, "name": it.name, "status": status,
                             "reason": (marker or {}).get("reason", "no result")})
        elif marker.get("failed_faces"):
            failures.extend({"input": it.uri, "name": it.name, "status": "face failed", **f}
                            for f in marker["failed_faces"])
    summary = {"inputs": len(items), "processed": processed, "counts": counts,
               "failures": failures, "seconds": round(seconds, 2), "out": str(out)}
    storage.write_bytes(storage.join(out, SUMMARY), json.dumps(summary, indent=1).encode())
    return summary


__all__ = ["FINAL", "FaceFinder", "InputItem", "InputReconstructor", "MARKER", "crop_face",
           "is_done", "list_inputs", "read_marker", "run_batch"]
