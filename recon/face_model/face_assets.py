"""The arrays of a FLAME-format face model, framework-free (numpy), with a plain cached format.

Both real FLAME (converted from its pickles, :mod:`recon.face_model.flame_io`) and the built-in procedural
``demo-head`` (:mod:`recon.face_model.demo_head`) are held in :class:`FaceModelAssets`, with FLAME's array
names and layouts, so everything downstream works the same on either.

Conventions (FLAME's): metres, y up, the face looks toward +z. Joints: 0 global, 1 neck, 2 jaw,
3 left eye, 4 right eye (parents ``[-1, 0, 1, 1, 1]``). ``shapedirs`` holds the identity
components first, then the expression components; coefficients are in standard-deviation units.

A model converted with DECA's ``data/`` folder (:mod:`recon.face_model.deca_data`) also carries DECA's UV
maps and dense template; they are optional, so files written before them still load.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recon.formats.files import atomic_writer

FORMAT_VERSION = 1

# Array fields with their dtype; every one is required.
_ARRAYS: dict[str, type] = {
    "v_template": np.float32,
    "faces": np.int64,
    "shapedirs": np.float32,
    "posedirs": np.float32,
    "J_regressor": np.float32,
    "weights": np.float32,
    "parents": np.int64,
    "static_lmk_faces_idx": np.int64,
    "static_lmk_bary_coords": np.float32,
    "dynamic_lmk_faces_idx": np.int64,
    "dynamic_lmk_bary_coords": np.float32,
    "full_lmk_faces_idx": np.int64,
    "full_lmk_bary_coords": np.float32,
    "vt": np.float32,
    "ft": np.int64,
    "albedo_mean": np.float32,
    "albedo_basis": np.float32,
}

# DECA's UV maps (optional), with their number of dimensions: grey masks (H, W), the fixed
# displacement (H, W), the mean texture (H, W, 3); each as DECA reads it (see recon.face_model.deca_data).
DECA_MAPS: dict[str, int] = {
    "uv_face_eye_mask": 2,
    "uv_face_mask": 2,
    "fixed_displacement": 2,
    "mean_texture": 3,
}
# The entries of DECA's dense template (``texture_data_256.npy``) that its detail mesh uses.
DENSE_TEMPLATE_KEYS = ("img_size", "f", "x_coords", "y_coords", "valid_pixel_ids",
                       "valid_pixel_3d_faces", "valid_pixel_b_coords")
_DENSE_PREFIX = "dense_template__"


class FaceModelFormatError(ValueError):
    """A face-model file or array set does not have FLAME's structure."""


# An .npz is a zip: a few KB can declare gigabytes of zeros. Real face-model and texture
# archives inflate far less than this over their size (or stay under the floor).
NPZ_INFLATION = 64
NPZ_FLOOR = 256 << 20


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file from outside, never unpickled
    (``allow_pickle=False``). The members' declared sizes (which zipfile enforces while
    inflating) are summed before anything is read: past ``max(NPZ_INFLATION x the file's
    size, NPZ_FLOOR)`` the file is refused. Raises :class:`FaceModelFormatError` naming it."""
    size = os.path.getsize(path)
    limit = max(NPZ_INFLATION * size, NPZ_FLOOR)
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(info.file_size for info in zf.infolist())
        if total > limit:
            raise FaceModelFormatError(
                f"{path}: refusing an .npz whose arrays inflate to {total:,} bytes (more than "
                f"{limit:,} for a {size:,}-byte file)")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # object arrays, bad zips
        if isinstance(e, FaceModelFormatError):
            raise
        raise FaceModelFormatError(f"{path}: not a readable .npz ({e})") from e


def check_deca_map(key: str, value: np.ndarray, where: str) -> np.ndarray:
    """One of :data:`DECA_MAPS` as float32, checked (dimensions, finite, masks and texture in
    [0, 1]); raises :class:`FaceModelFormatError` starting with ``where`` (a file or model)."""
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise FaceModelFormatError(f"{where}: {key} is not numeric ({e})") from e
    ndim = DECA_MAPS[key]
    if arr.ndim != ndim or min(arr.shape[:2], default=0) < 1 or (ndim == 3 and arr.shape[2] != 3):
        want = "(H, W, 3)" if ndim == 3 else "(H, W)"
        raise FaceModelFormatError(f"{where}: {key} must be {want}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise FaceModelFormatError(f"{where}: {key} holds NaN or infinite values")
    if key != "fixed_displacement" and (arr.min() < 0 or arr.max() > 1):
        raise FaceModelFormatError(f"{where}: {key} must lie in [0, 1]")
    return np.ascontiguousarray(arr)


def check_dense_template(raw: dict, n_vertices: int, where: str) -> dict[str, np.ndarray]:
    """DECA's dense template -> the :data:`DENSE_TEMPLATE_KEYS` arrays, checked against a
    model of ``n_vertices``: ``img_size`` () int64; ``x_coords``, ``y_coords`` (P,) int64
    texel columns / rows (truncated, as DECA's ``astype(int)``); ``valid_pixel_ids`` (N,)
    into them; ``valid_pixel_3d_faces`` (N, 3) vertex ids of the coarse triangle under each
    dense vertex; ``valid_pixel_b_coords`` (N, 3) float32 barycentrics; ``f`` (Fd, 3) dense
    triangles over the N dense vertices. Raises :class:`FaceModelFormatError` naming ``where``."""
    missing = [k for k in DENSE_TEMPLATE_KEYS if k not in raw]
    if missing:
        raise FaceModelFormatError(f"{where}: dense template misses {missing}")
    try:
        size = np.asarray(raw["img_size"]).astype(np.int64)
        x = np.asarray(raw["x_coords"]).astype(np.int64)
        y = np.asarray(raw["y_coords"]).astype(np.int64)
        ids = np.asarray(raw["valid_pixel_ids"]).astype(np.int64)
        tri = np.asarray(raw["valid_pixel_3d_faces"]).astype(np.int64)
        bary = np.asarray(raw["valid_pixel_b_coords"]).astype(np.float32)
        faces = np.asarray(raw["f"]).astype(np.int64)
    except (TypeError, ValueError) as e:
        raise FaceModelFormatError(f"{where}: dense template entries must be numeric ({e})") from e

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise FaceModelFormatError(f"{where}: dense template {what}")

    need(size.size == 1 and int(size.reshape(-1)[0]) > 0, "img_size must be one positive number")
    side = int(size.reshape(-1)[0])
    need(x.ndim == 1 and x.shape == y.shape, "x_coords / y_coords must be two (P,) arrays")
    N = ids.shape[0] if ids.ndim == 1 else -1
    need(N > 0 and ids.min() >= 0 and ids.max() < x.size, "valid_pixel_ids must be (N,) into x_coords")
    for name, c in (("x_coords", x[ids]), ("y_coords", y[ids])):
        need(c.min() >= 0 and c.max() < side, f"{name} of valid pixels must lie in [0, img_size)")
    need(tri.shape == (N, 3) and tri.min() >= 0 and tri.max() < n_vertices,
         f"valid_pixel_3d_faces must be (N, 3) vertex ids of the model's {n_vertices} vertices")
    need(bary.shape == (N, 3) and bool(np.isfinite(bary).all()), "valid_pixel_b_coords must be (N, 3) finite")
    need(faces.ndim == 2 and faces.shape[1] == 3 and faces.size > 0 and faces.min() >= 0
         and faces.max() < N, "f must be (Fd, 3) into the N dense vertices")
    return {"img_size": size.reshape(()), "f": faces, "x_coords": x, "y_coords": y,
            "valid_pixel_ids": ids, "valid_pixel_3d_faces": tri, "valid_pixel_b_coords": bary}


@dataclass
class FaceModelAssets:
    """All arrays of a FLAME-format face model.

    Shapes (V vertices, F triangles, S/E identity/expression components, T texcoords,
    K albedo components, H x W UV albedo):

    - ``v_template (V, 3) float32``, ``faces (F, 3) int64``
    - ``shapedirs (V, 3, S + E) float32``: ``n_shape_total`` identity then ``n_exp_total``
      expression components
    - ``posedirs (V, 3, 36) float32``: pose correctives, FLAME's layout (4 non-root joints x 9
      entries of ``R - I``)
    - ``J_regressor (5, V) float32`` dense, ``weights (V, 5) float32``, ``parents (5,) int64``
    - ``static_lmk_faces_idx (51,)``, ``static_lmk_bary_coords (51, 3)``,
      ``dynamic_lmk_faces_idx (79, 17)``, ``dynamic_lmk_bary_coords (79, 17, 3)``,
      ``full_lmk_faces_idx (68,)``, ``full_lmk_bary_coords (68, 3)``
    - ``vt (T, 2)`` UV in [0, 1] (v up, OBJ convention), ``ft (F, 3)`` texcoord indices
    - ``albedo_mean (H, W, 3)`` in [0, 1] (RGB, row 0 = top of the UV image, i.e. v = 1),
      ``albedo_basis (H, W, 3, K)``
    - ``masks``: vertex index arrays by region (``face``, ``left_eyeball``, ...)
    - ``expression_names``: names of the first expression components ([] for FLAME)

    From DECA's ``data/`` folder, None / empty when the model was converted without it (UV
    maps at the file's resolution, row 0 = v = 1, as DECA reads them):
    ``uv_face_eye_mask``, ``uv_face_mask`` (Hm, Wm) float32 in [0, 1]; ``fixed_displacement``
    (Hd, Wd) float32, model units; ``mean_texture`` (Ht, Wt, 3) float32 RGB in [0, 1];
    ``dense_template``: :data:`DENSE_TEMPLATE_KEYS` -> arrays (:func:`check_dense_template`).
    """

    v_template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    n_shape_total: int
    n_exp_total: int
    posedirs: np.ndarray
    J_regressor: np.ndarray
    weights: np.ndarray
    parents: np.ndarray
    static_lmk_faces_idx: np.ndarray
    static_lmk_bary_coords: np.ndarray
    dynamic_lmk_faces_idx: np.ndarray
    dynamic_lmk_bary_coords: np.ndarray
    full_lmk_faces_idx: np.ndarray
    full_lmk_bary_coords: np.ndarray
    vt: np.ndarray
    ft: np.ndarray
    albedo_mean: np.ndarray
    albedo_basis: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    expression_names: list[str] = field(default_factory=list)
    name: str = "flame"
    uv_face_eye_mask: np.ndarray | None = None
    uv_face_mask: np.ndarray | None = None
    fixed_displacement: np.ndarray | None = None
    mean_texture: np.ndarray | None = None
    dense_template: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, dtype in _ARRAYS.items():
            setattr(self, key, np.ascontiguousarray(np.asarray(getattr(self, key), dtype=dtype)))
        for key in DECA_MAPS:
            if getattr(self, key) is not None:
                setattr(self, key, check_deca_map(key, getattr(self, key), f"face model '{self.name}'"))
        self.masks = {k: np.asarray(v, dtype=np.int64).ravel() for k, v in self.masks.items()}
        self.expression_names = [str(n) for n in self.expression_names]
        self.n_shape_total = int(self.n_shape_total)
        self.n_exp_total = int(self.n_exp_total)
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def n_tex_total(self) -> int:
        return int(self.albedo_basis.shape[-1])

    @property
    def n_joints(self) -> int:
        return int(self.parents.shape[0])

    def validate(self) -> None:
        """Check shapes and index ranges; raise :class:`FaceModelFormatError` naming the field."""
        V, F = self.n_vertices, self.n_faces
        J = self.n_joints

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise FaceModelFormatError(f"face model '{self.name}': {what}")

        need(self.v_template.ndim == 2 and self.v_template.shape[1] == 3, "v_template must be (V,3)")
        need(self.faces.ndim == 2 and self.faces.shape[1] == 3, "faces must be (F,3)")
        need(F > 0 and self.faces.min() >= 0 and self.faces.max() < V, "faces index out of range")
        need(self.shapedirs.shape[:2] == (V, 3), "shapedirs must be (V,3,S+E)")
        need(self.shapedirs.shape[2] == self.n_shape_total + self.n_exp_total,
             "shapedirs components != n_shape_total + n_exp_total")
        need(self.posedirs.shape[:2] == (V, 3) and self.posedirs.shape[2] == 9 * (J - 1),
             "posedirs must be (V,3,9*(J-1))")
        need(self.J_regressor.shape == (J, V), "J_regressor must be (J,V)")
        need(self.weights.shape == (V, J), "weights must be (V,J)")
        need(int(self.parents[0]) == -1 and all(0 <= int(p) < i for i, p in enumerate(self.parents[1:], 1)),
             "parents must be a tree in topological order with root -1")
        for prefix, n in (("static", 51), ("full", 68)):
            idx = getattr(self, f"{prefix}_lmk_faces_idx")
            bary = getattr(self, f"{prefix}_lmk_bary_coords")
            need(idx.shape == (n,) and bary.shape == (n, 3), f"{prefix} landmark embedding must be ({n},) / ({n},3)")
        need(self.dynamic_lmk_faces_idx.shape == (79, 17) and self.dynamic_lmk_bary_coords.shape == (79, 17, 3),
             "dynamic landmark embedding must be (79,17) / (79,17,3)")
        for key in ("static_lmk_faces_idx", "dynamic_lmk_faces_idx", "full_lmk_faces_idx"):
            arr = getattr(self, key)
            need(arr.min() >= 0 and arr.max() < F, f"{key} out of range")
        need(self.vt.ndim == 2 and self.vt.shape[1] == 2, "vt must be (T,2)")
        need(self.ft.shape == (F, 3) and self.ft.min() >= 0 and self.ft.max() < len(self.vt), "ft must be (F,3) into vt")
        need(self.albedo_mean.ndim == 3 and self.albedo_mean.shape[2] == 3, "albedo_mean must be (H,W,3)")
        need(self.albedo_basis.ndim == 4 and self.albedo_basis.shape[:3] == self.albedo_mean.shape,
             "albedo_basis must be (H,W,3,K)")
        for k, m in self.masks.items():
            need(m.size == 0 or (m.min() >= 0 and m.max() < V), f"mask '{k}' out of range")
        if self.dense_template:
            self.dense_template = check_dense_template(self.dense_template, V, f"face model '{self.name}'")

    # -- cached format -------------------------------------------------------------------
    def save_npz(self, path: str | os.PathLike) -> Path:
        """Write all arrays to one ``.npz`` (uncompressed, loads fast), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k) for k in _ARRAYS}
        arrays["format_version"] = np.array(FORMAT_VERSION, dtype=np.int64)
        arrays["n_shape_total"] = np.array(self.n_shape_total, dtype=np.int64)
        arrays["n_exp_total"] = np.array(self.n_exp_total, dtype=np.int64)
        arrays["name"] = np.array(self.name)
        arrays["expression_names"] = np.array(self.expression_names, dtype=np.str_).reshape(-1)
        for k, m in self.masks.items():
            arrays[f"mask__{k}"] = m
        arrays.update({k: getattr(self, k) for k in DECA_MAPS if getattr(self, k) is not None})
        arrays.update({_DENSE_PREFIX + k: v for k, v in self.dense_template.items()})
        with atomic_writer(path) as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "FaceModelAssets":
        """Read a file written by :meth:`save_npz` (no pickle: ``allow_pickle=False``)."""
        data = read_npz(path)
        missing = [k for k in (*_ARRAYS, "n_shape_total", "n_exp_total") if k not in data]
        if missing:
            raise FaceModelFormatError(f"{path}: missing arrays {missing}")
        version = int(data.get("format_version", 0))
        if version != FORMAT_VERSION:
            raise FaceModelFormatError(f"{path}: format version {version}, expected {FORMAT_VERSION}")
        masks = {k[len("mask__"):]: v for k, v in data.items() if k.startswith("mask__")}
        return cls(
            **{k: data[k] for k in _ARRAYS},
            n_shape_total=int(data["n_shape_total"]),
            n_exp_total=int(data["n_exp_total"]),
            masks=masks,
            expression_names=[str(s) for s in data.get("expression_names", np.array([], dtype=np.str_))],
            name=str(data.get("name", "flame")),
            **{k: data[k] for k in DECA_MAPS if k in data},  # absent from older files
            dense_template={k[len(_DENSE_PREFIX):]: v for k, v in data.items()
                            if k.startswith(_DENSE_PREFIX)},
        )

    def summary(self) -> dict:
        """Counts for ``wildface model info``."""
        return {
            "name": self.name,
            "vertices": self.n_vertices,
            "faces": self.n_faces,
            "shape_components": self.n_shape_total,
            "expression_components": self.n_exp_total,
            "albedo_components": self.n_tex_total,
            "albedo_resolution": list(self.albedo_mean.shape[:2]),
            "pose_correctives": int(self.posedirs.shape[2]),
            "joints": self.n_joints,
            "joint_names": list(JOINT_NAMES[: self.n_joints]),
            "parents": [int(p) for p in self.parents],
            "landmarks": {"static": 51, "dynamic_contour": 17, "dynamic_bins": 79, "full": 68,
                          "landmarks2d": 68, "now": 7},
            "texcoords": int(self.vt.shape[0]),
            "masks": {k: int(v.size) for k, v in sorted(self.masks.items())},
            "expression_names": list(self.expression_names),
            "deca_data": self.deca_data_summary(),
        }

    def deca_data_summary(self) -> dict:
        """Which of DECA's ``data/`` files the model carries: map -> its shape, and the dense
        template's vertex and triangle counts."""
        out: dict = {k: list(getattr(self, k).shape) for k in DECA_MAPS if getattr(self, k) is not None}
        if self.dense_template:
            out["dense_template"] = {"vertices": int(self.dense_template["valid_pixel_ids"].size),
                                     "faces": int(self.dense_template["f"].shape[0])}
        return out


JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")

__all__ = ["FaceModelAssets", "FaceModelFormatError", "JOINT_NAMES", "FORMAT_VERSION", "DECA_MAPS",
           "DENSE_TEMPLATE_KEYS", "check_deca_map", "check_dense_template"]
