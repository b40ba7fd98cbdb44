"""The arrays of a FLAME-format face model, framework-free (numpy), with a plain cached format.

Both real FLAME (converted from its pickles, :mod:`recon.flame_io`) and the built-in procedural
``demo-head`` (:mod:`recon.demo_head`) are held in :class:`FaceModelAssets`, with FLAME's array
names and layouts, so everything downstream works the same on either.

Conventions (FLAME's): metres, y up, the face looks toward +z. Joints: 0 global, 1 neck, 2 jaw,
3 left eye, 4 right eye (parents ``[-1, 0, 1, 1, 1]``). ``shapedirs`` holds the identity
components first, then the expression components; coefficients are in standard-deviation units.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recon.mesh_io import atomic_writer

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


class FaceModelFormatError(ValueError):
    """A face-model file or array set does not have FLAME's structure."""


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

    def __post_init__(self) -> None:
        for key, dtype in _ARRAYS.items():
            setattr(self, key, np.ascontiguousarray(np.asarray(getattr(self, key), dtype=dtype)))
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
        with atomic_writer(path) as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "FaceModelAssets":
        """Read a file written by :meth:`save_npz` (no pickle: ``allow_pickle=False``)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:  # includes zip errors and object arrays
            raise FaceModelFormatError(f"{path}: not a wildface face-model .npz ({e})") from e
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
        }


JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")

__all__ = ["FaceModelAssets", "FaceModelFormatError", "JOINT_NAMES", "FORMAT_VERSION"]
