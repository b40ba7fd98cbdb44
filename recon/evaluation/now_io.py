"""The NoW benchmark's file layout: image path lists, scans, picked points, predictions.

Layout (as in the official release)::

    DATASET/imagepathsvalidation.txt      lines <subject>/<challenge>/<image>.jpg
    DATASET/imagepathstest.txt
    DATASET/scans/<subject>/*.obj         one neutral scan per subject, in mm
    DATASET/scans_lmks_onlypp/<subject>/*.pp   7 picked points (MeshLab XML), in mm
    PREDICTIONS/<subject>/<challenge>/<image>.obj   predicted neutral mesh (or .ply)
    PREDICTIONS/<subject>/<challenge>/<image>.npy   its 7 landmarks, 7x3 (or .txt)

Challenge folders: ``multiview_neutral``, ``multiview_expressions``,
``multiview_occlusions``, ``selfie``. The 7 landmarks, in this order: right-eye outer
corner, right-eye inner corner, left-eye inner corner, left-eye outer corner, nose bottom,
right mouth corner, left mouth corner (indices 0 and 3 are the outer eye corners, 1 and 2
the inner ones: the crop formula relies on this).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recon.formats.files import UnsafeName, atomic_write_bytes, atomic_writer, check_name

#: NoW challenge folder -> short name used in metrics.
CHALLENGES: dict[str, str] = {
    "multiview_neutral": "neutral",
    "multiview_expressions": "expression",
    "multiview_occlusions": "occlusion",
    "selfie": "selfie",
}
SPLIT_FILES: dict[str, str] = {"val": "imagepathsvalidation.txt", "test": "imagepathstest.txt"}
N_LANDMARKS = 7


class NowFormatError(ValueError):
    """A NoW-layout file that is missing or malformed; the message names the file."""


@dataclass(frozen=True, order=True)
class NowImage:
    """One entry of an image path list: ``<subject>/<challenge_dir>/<stem><suffix>``."""

    subject: str
    challenge_dir: str
    stem: str
    suffix: str = ".jpg"

    @property
    def challenge(self) -> str:
        return CHALLENGES[self.challenge_dir]

    @property
    def rel_path(self) -> str:
        return f"{self.subject}/{self.challenge_dir}/{self.stem}{self.suffix}"


def _safe_part(part: str, line: str, path: Path) -> str:
    # Prediction paths are built from these parts: the project's one name check.
    try:
        return check_name(part)
    except UnsafeName as err:
        raise NowFormatError(f"{path}: bad path component {part!r} in line {line!r} "
                             f"({err})") from None


def read_image_list(path: str | os.PathLike) -> list[NowImage]:
    """Parse ``imagepathsvalidation.txt`` / ``imagepathstest.txt``; blank lines are skipped.

    Each line's last three components are subject, challenge folder and file name (the
    official files may carry a leading folder).
    """
    path = Path(path)
    if not path.is_file():
        raise NowFormatError(f"image list not found: {path}")
    images = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.replace("\\", "/").split("/")
        if len(parts) < 3:
            raise NowFormatError(f"{path}: line {line!r} is not <subject>/<challenge>/<image>")
        subject, challenge_dir, name = (_safe_part(p, line, path) for p in parts[-3:])
        if challenge_dir not in CHALLENGES:
            raise NowFormatError(
                f"{path}: unknown challenge {challenge_dir!r} in line {line!r} "
                f"(expected one of {sorted(CHALLENGES)})"
            )
        stem, suffix = os.path.splitext(name)
        images.append(NowImage(subject, challenge_dir, stem, suffix))
    if not images:
        raise NowFormatError(f"{path}: no image paths")
    return images


def image_list_path(dataset_dir: str | os.PathLike, split: str) -> Path:
    if split not in SPLIT_FILES:
        raise NowFormatError(f"unknown split {split!r} (expected one of {sorted(SPLIT_FILES)})")
    return Path(dataset_dir) / SPLIT_FILES[split]


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_image_list(path: str | os.PathLike, images: list[NowImage]) -> Path:
    path = Path(path)
    _atomic_write_text(path, "".join(f"{im.rel_path}\n" for im in images))
    return path


def _check_landmarks(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.shape != (N_LANDMARKS, 3):
        raise NowFormatError(f"{path}: expected {N_LANDMARKS}x3 landmarks, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise NowFormatError(f"{path}: landmarks contain NaN or infinity")
    return arr


def read_pp(path: str | os.PathLike) -> np.ndarray:
    """MeshLab picked points (``<PickedPoints><point x= y= z= name= active=/>``) -> (7, 3).

    Points are taken in document order, as the official evaluation does.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise NowFormatError(f"{path}: not a picked-points XML file ({e})") from e
    pts = []
    for el in root.iter("point"):
        try:
            pts.append([float(el.attrib[k]) for k in ("x", "y", "z")])
        except (KeyError, ValueError) as e:
            raise NowFormatError(f"{path}: point without numeric x/y/z ({el.attrib})") from e
    return _check_landmarks(np.asarray(pts).reshape(-1, 3), path)


def write_pp(path: str | os.PathLike, points: np.ndarray, source_name: str = "scan.obj") -> Path:
    """Write 7 points in MeshLab's picked-points format (as the NoW release ships them)."""
    path = Path(path)
    points = _check_landmarks(points, path)
    lines = [
        "<!DOCTYPE PickedPoints>",
        "<PickedPoints>",
        " <DocumentData>",
        '  <DateTime time="00:00:00" date="2026-01-01"/>',
        '  <User name="wildface"/>',
        f'  <DataFileName name="{source_name}"/>',
        '  <templateName name=""/>',
        " </DocumentData>",
    ]
    for i, (x, y, z) in enumerate(points):
        lines.append(f' <point x="{x:.6f}" y="{y:.6f}" z="{z:.6f}" name="{i}" active="1"/>')
    lines.append("</PickedPoints>")
    _atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def read_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Predicted landmarks from ``.npy`` (no pickles) or whitespace-separated ``.txt`` -> (7, 3)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            arr = np.loadtxt(path, ndmin=2)
    except (ValueError, OSError) as e:
        raise NowFormatError(f"{path}: cannot read landmarks ({e})") from e
    return _check_landmarks(arr, path)


def read_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(verts (V, 3) float64, faces (F, 3) int64)`` from an OBJ or PLY file."""
    from recon.formats.mesh_io import read_obj, read_ply

    path = Path(path)
    try:
        if path.suffix.lower() == ".ply":
            verts, faces = read_ply(path)
        else:
            verts, faces, _, _ = read_obj(path)
    except (ValueError, OSError) as e:
        raise NowFormatError(f"{path}: cannot read mesh ({e})") from e
    if len(faces) == 0:
        raise NowFormatError(f"{path}: mesh has no faces")
    return np.asarray(verts, np.float64), np.asarray(faces, np.int64)


@dataclass(frozen=True)
class ScanFiles:
    mesh: Path
    landmarks: Path


def find_scan(dataset_dir: str | os.PathLike, subject: str) -> ScanFiles:
    """``scans/<subject>/*.obj`` and ``scans_lmks_onlypp/<subject>/*.pp`` (first by name)."""
    root = Path(dataset_dir)
    meshes = sorted((root / "scans" / subject).glob("*.obj"))
    pps = sorted((root / "scans_lmks_onlypp" / subject).glob("*.pp"))
    if not meshes:
        raise NowFormatError(f"no scan for subject {subject!r} in {root / 'scans' / subject}")
    if not pps:
        raise NowFormatError(
            f"no picked points for subject {subject!r} in {root / 'scans_lmks_onlypp' / subject}"
        )
    return ScanFiles(meshes[0], pps[0])


@dataclass(frozen=True)
class PredictionFiles:
    mesh: Path | None
    landmarks: Path | None


def find_prediction(predictions_dir: str | os.PathLike, image: NowImage) -> PredictionFiles:
    """The prediction files for one image (``.obj`` before ``.ply``, ``.npy`` before ``.txt``);
    a missing file is None."""
    base = Path(predictions_dir) / image.subject / image.challenge_dir
    mesh = next((p for p in (base / f"{image.stem}.obj", base / f"{image.stem}.ply") if p.is_file()), None)
    lmk = next((p for p in (base / f"{image.stem}.npy", base / f"{image.stem}.txt") if p.is_file()), None)
    return PredictionFiles(mesh, lmk)


def write_prediction(
    predictions_dir: str | os.PathLike,
    image: NowImage,
    verts: np.ndarray,
    faces: np.ndarray,
    landmarks: np.ndarray,
) -> PredictionFiles:
    """Write one prediction in the NoW layout (OBJ + ``.npy``), atomically.

    verts: (V, 3), faces: (F, 3) 0-based, landmarks: (7, 3) in the mesh's frame and unit.
    """
    from recon.formats.mesh_io import write_obj

    base = Path(predictions_dir) / image.subject / image.challenge_dir
    lmk = _check_landmarks(landmarks, base / f"{image.stem}.npy")
    mesh_path = write_obj(base / f"{image.stem}.obj", verts, faces)
    lmk_path = base / f"{image.stem}.npy"
    with atomic_writer(lmk_path) as fh:
        np.save(fh, lmk)
    return PredictionFiles(Path(mesh_path), lmk_path)
