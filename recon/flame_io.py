"""Load real FLAME files safely (no chumpy, no arbitrary code) and pick the face model.

A pickle is a program: :class:`RestrictedUnpickler` builds only what FLAME's files contain —
numpy arrays and dtypes, scipy.sparse matrices, a stand-in for chumpy's ``Ch`` (whose state
holds the array in ``x``), and torch tensors (whose storages are read by
``torch.load(weights_only=True)``) — and refuses every other global with
:class:`UnsafePickleError` naming it, before anything is called.

Files: FLAME 2020 ``generic_model.pkl`` and FLAME 2023 pickles (latin1, keys ``v_template f
shapedirs posedirs J_regressor weights kintree_table``), DECA's ``landmark_embedding.npy`` (an
object ``.npy`` holding a pickled dict, some values torch tensors), ``FLAME_masks.pkl`` (dict
region -> vertex ids), ``FLAME_texture.npz`` (``mean``, ``tex_dir``, ``vt``, ``ft``; 0..255).
"""
from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np

from recon.config import DEMO_HEAD, FaceModelConfig
from recon.face_assets import FaceModelAssets, FaceModelFormatError


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list (named in the message)."""


# ----------------------------------------------------------------------------- stand-ins
class _StateHolder:
    """Base of the stand-ins: records the pickled state instead of running any code."""

    pickled_module = ""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __reduce__(self):  # never re-pickle a stand-in as if it were the real class
        raise TypeError(f"stand-in for {self.pickled_module} cannot be pickled")


class ChumpyArray(_StateHolder):
    """Stand-in for ``chumpy.ch.Ch`` and the chumpy classes FLAME pickles use."""

    def to_numpy(self) -> np.ndarray:
        state = self.state if isinstance(self.state, dict) else {}
        if "x" in state:
            return np.asarray(state["x"])
        if "a" in state:  # chumpy.reordering nodes (e.g. Select/Reshape) wrap an operand
            return to_numpy(state["a"])
        raise FaceModelFormatError(f"unsupported chumpy object {self.pickled_module} (state keys {sorted(state)})")


class SparseMatrix(_StateHolder):
    """Stand-in for scipy.sparse csc/csr/coo matrices; converted with scipy afterwards."""

    def to_scipy(self):
        import scipy.sparse as sp

        st = self.state if isinstance(self.state, dict) else {}
        shape = tuple(int(s) for s in st.get("_shape", st.get("shape", ())))
        fmt = self.pickled_module.rsplit(".", 1)[-1][:3]
        if fmt in ("csc", "csr"):
            cls = sp.csc_matrix if fmt == "csc" else sp.csr_matrix
            return cls((np.asarray(st["data"]), np.asarray(st["indices"]), np.asarray(st["indptr"])), shape=shape)
        if fmt == "coo":
            row = st.get("row", st.get("coords", (None, None))[0])
            col = st.get("col", st.get("coords", (None, None))[1])
            return sp.coo_matrix((np.asarray(st["data"]), (np.asarray(row), np.asarray(col))), shape=shape)
        raise FaceModelFormatError(f"unsupported sparse matrix {self.pickled_module}")


def _stand_in(base: type, qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (base,), {"pickled_module": qualname})


def _reconstructor(cls: type, base: type, state: Any):
    """Safe ``copyreg._reconstructor``: only for allow-listed classes on ``object``."""
    if base is not object or not (isinstance(cls, type) and issubclass(cls, _StateHolder)):
        raise UnsafePickleError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls()


def _load_torch_storage(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """``torch._utils._rebuild_tensor_v2`` without its hooks/metadata arguments."""
    import torch

    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError("tensor rebuild without a torch storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_from_type_v2(func, new_type, args, state):
    import torch

    if func is not _rebuild_tensor or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafePickleError("unexpected torch tensor rebuild")
    return func(*args)


def _rebuild_parameter(data, requires_grad, backward_hooks, *rest):
    return data


def _torch_global(name: str):
    import torch

    return {"Tensor": torch.Tensor, "Parameter": torch.nn.Parameter}[name]


_CHUMPY_CLASSES = {
    "chumpy.ch Ch", "chumpy.ch_ops add", "chumpy.ch_ops subtract", "chumpy.ch_ops multiply",
    "chumpy.reordering Select", "chumpy.reordering transpose", "chumpy.reordering Reshape",
}
_SPARSE_CLASSES = {
    f"{mod} {fmt}_matrix"
    for fmt in ("csc", "csr", "coo")
    for mod in ("scipy.sparse", f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}")
} | {f"scipy.sparse._{fmt} {fmt}_array" for fmt in ("csc", "csr", "coo")}


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes for protocol 2, limited to the two codecs
    it uses (no codec lookup by an attacker-chosen name)."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "utf8"):
        raise UnsafePickleError(f"codec {encoding!r} is not allowed")
    return text.encode(encoding)


def _allowed() -> dict[str, Any]:
    import collections

    table: dict[str, Any] = {
        "copyreg _reconstructor": _reconstructor,
        "builtins object": object,
        "builtins set": set,
        "builtins frozenset": frozenset,
        "builtins slice": slice,
        "collections OrderedDict": collections.OrderedDict,
        "_codecs encode": _codecs_encode,
        "torch._utils _rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils _rebuild_tensor": _rebuild_tensor,
        "torch._utils _rebuild_parameter": _rebuild_parameter,
        "torch._tensor _rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.storage _load_from_bytes": _load_torch_storage,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[f"{mod} _reconstruct"] = _numpy_reconstruct
        table[f"{mod} scalar"] = _numpy_scalar
    table["numpy ndarray"] = np.ndarray
    table["numpy dtype"] = np.dtype
    for q in _CHUMPY_CLASSES:
        table[q] = _stand_in(ChumpyArray, q.replace(" ", "."))
    for q in _SPARSE_CLASSES:
        table[q] = _stand_in(SparseMatrix, q.replace(" ", "."))
    return table


def _numpy_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy scalar of an object dtype is not allowed")
    if isinstance(data, str):
        data = data.encode("latin1")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_ALLOWED: dict[str, Any] | None = None
_ALLOWED_LOCK = threading.Lock()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only returns allow-listed, side-effect-free callables."""

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        with _ALLOWED_LOCK:
            if _ALLOWED is None:
                _ALLOWED = _allowed()
        # Python 2 names (copy_reg, __builtin__), as the stock find_class maps them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module} {name}"
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key in ("torch Tensor", "torch.nn.parameter Parameter"):
            return _torch_global(name)
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}: not a class FLAME files contain")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r}")


def safe_loads(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with the allow-list; returns plain python / numpy objects."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise FaceModelFormatError(f"corrupt or unexpected pickle ({type(e).__name__}: {e})") from e
    return to_numpy(obj)


def to_numpy(obj: Any) -> Any:
    """Replace stand-ins and torch tensors by numpy arrays / scipy matrices, recursively."""
    if isinstance(obj, ChumpyArray):
        return obj.to_numpy()
    if isinstance(obj, SparseMatrix):
        return obj.to_scipy()
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        return np.array([to_numpy(v) for v in obj.ravel()], dtype=object).reshape(obj.shape) if obj.ndim else to_numpy(obj.item())
    if type(obj).__module__.startswith("torch"):
        return obj.detach().cpu().numpy()
    return obj


# ----------------------------------------------------------------------------- FLAME files
def load_flame_pickle(path: str | os.PathLike) -> dict:
    """A FLAME model pickle as a dict of numpy arrays / scipy.sparse (latin1, restricted)."""
    obj = safe_loads(Path(path).read_bytes())
    if not isinstance(obj, dict):
        raise FaceModelFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _read_npy_object(path: str | os.PathLike) -> Any:
    """An ``.npy`` file; object arrays go through the restricted unpickler."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
        except ValueError as e:
            raise FaceModelFormatError(f"{path}: not an .npy file ({e})") from e
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if not dtype.hasobject:
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
        return safe_loads(fh.read())


def load_landmark_embedding(path: str | os.PathLike) -> dict:
    """DECA's ``landmark_embedding.npy`` (or the same dict pickled) -> dict of numpy arrays
    with the shapes of :class:`FaceModelAssets` (``full_*`` flattened to (68,) / (68, 3))."""
    path = Path(path)
    raw = safe_loads(path.read_bytes()) if path.suffix == ".pkl" else _read_npy_object(path)
    if isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 0:
        raw = raw.item()
    if not isinstance(raw, dict):
        raise FaceModelFormatError(f"{path}: expected a dict of landmark arrays")
    shapes = {
        "static_lmk_faces_idx": (51,), "static_lmk_bary_coords": (51, 3),
        "dynamic_lmk_faces_idx": (79, 17), "dynamic_lmk_bary_coords": (79, 17, 3),
        "full_lmk_faces_idx": (68,), "full_lmk_bary_coords": (68, 3),
    }
    out = {}
    for key, shape in shapes.items():
        if key not in raw:
            raise FaceModelFormatError(f"{path}: missing '{key}'")
        arr = np.asarray(raw[key])
        if arr.size != int(np.prod(shape)):
            raise FaceModelFormatError(f"{path}: '{key}' has shape {arr.shape}, expected {shape}")
        out[key] = arr.reshape(shape)
    return out


def load_masks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``FLAME_masks.pkl``: region name -> vertex indices."""
    raw = safe_loads(Path(path).read_bytes())
    if not isinstance(raw, dict):
        raise FaceModelFormatError(f"{path}: expected a dict of masks")
    return {str(k): np.asarray(v, dtype=np.int64).ravel() for k, v in raw.items()}


def _dense(a: Any) -> np.ndarray:
    return np.asarray(a.toarray() if hasattr(a, "toarray") else a)


def fallback_albedo(n_components: int = 50, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Albedo for a FLAME model given without a texture space: a flat mean skin colour and
    global colour variations (brightness, redness, yellowness) followed by smooth UV fields.
    Documented in docs/face-model.md; DECA trains fine from it, texture quality is limited."""
    from recon.demo_head.albedo import SKIN_RGB, smooth_uv_basis

    mean = np.broadcast_to(np.asarray(SKIN_RGB, np.float32), (size, size, 3)).copy()
    return mean, smooth_uv_basis(size, n_components, seed=7)


def load_flame(
    pkl: str | os.PathLike,
    landmarks: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    texture: str | os.PathLike | None = None,
    uv_template: str | os.PathLike | None = None,
) -> FaceModelAssets:
    """Real FLAME files -> :class:`FaceModelAssets`.

    ``landmarks`` defaults to ``landmark_embedding.npy`` next to the pickle (required);
    ``masks`` to ``FLAME_masks.pkl`` there (optional). The UV layout comes from ``texture``
    (``FLAME_texture.npz`` with ``vt``/``ft``) or ``uv_template`` (FLAME's ``head_template.obj``),
    or, lacking both, a cylindrical projection. Albedo: ``texture``'s ``mean``/``tex_dir``
    (/255, resized to 256x256), else :func:`fallback_albedo`.
    """
    pkl = Path(pkl)
    data = load_flame_pickle(pkl)
    need = ["v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table"]
    missing = [k for k in need if k not in data]
    if missing:
        raise FaceModelFormatError(f"{pkl}: not a FLAME model pickle (missing {missing})")
    v_template = _dense(data["v_template"]).astype(np.float32)
    V = v_template.shape[0]
    shapedirs = _dense(data["shapedirs"]).astype(np.float32)
    n_total = shapedirs.shape[2]
    n_exp = 100 if n_total > 100 else 0
    if n_total >= 400:
        n_shape, n_exp = 300, n_total - 300
    else:
        n_shape = n_total - n_exp
    parents = np.asarray(_dense(data["kintree_table"])[0], dtype=np.int64).copy()
    parents[0] = -1
    lmk_path = Path(landmarks) if landmarks else pkl.with_name("landmark_embedding.npy")
    if not lmk_path.exists():
        raise FaceModelFormatError(f"{pkl}: FLAME needs DECA's landmark embedding; pass --landmarks (looked for {lmk_path})")
    lmk = load_landmark_embedding(lmk_path)
    mask_path = Path(masks) if masks else pkl.with_name("FLAME_masks.pkl")
    region = load_masks(mask_path) if mask_path.exists() else {}
    if "face" not in region:
        region["face"] = np.arange(V, dtype=np.int64)  # documented: detail applies everywhere
    faces = _dense(data["f"]).astype(np.int64)
    vt = ft = None
    albedo_mean = albedo_basis = None
    if texture:
        with np.load(texture, allow_pickle=False) as z:
            tex = {k: z[k] for k in z.files}
        if "vt" in tex and "ft" in tex:
            vt, ft = tex["vt"], tex["ft"]
        mean_key, dir_key = ("mean", "tex_dir") if "mean" in tex else ("MU", "PC")
        if mean_key not in tex:
            raise FaceModelFormatError(f"{texture}: no 'mean'/'tex_dir' (FLAME_texture.npz) arrays")
        albedo_mean, albedo_basis = _resize_texture_space(tex, mean_key, dir_key)
    if vt is None and uv_template:
        from recon.mesh_io import read_obj

        _, obj_faces, vt, ft = read_obj(uv_template)
        if vt is None or obj_faces.shape != faces.shape:
            raise FaceModelFormatError(f"{uv_template}: no UVs or a different triangle count than the model")
    if vt is None:
        vt, ft = _cylindrical_uv(v_template), faces.copy()
    if albedo_mean is None:
        albedo_mean, albedo_basis = fallback_albedo()
    return FaceModelAssets(
        v_template=v_template,
        faces=faces,
        shapedirs=shapedirs,
        n_shape_total=n_shape,
        n_exp_total=n_exp,
        posedirs=_dense(data["posedirs"]).astype(np.float32),
        J_regressor=_dense(data["J_regressor"]).astype(np.float32),
        weights=_dense(data["weights"]).astype(np.float32),
        parents=parents,
        vt=vt,
        ft=ft,
        albedo_mean=albedo_mean,
        albedo_basis=albedo_basis,
        masks=region,
        expression_names=[],
        name="flame",
        **lmk,
    )


def _resize_texture_space(tex: dict, mean_key: str, dir_key: str, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F

    mean = np.asarray(tex[mean_key], np.float32)
    basis = np.asarray(tex[dir_key], np.float32)
    if mean.ndim == 2 or mean.shape[-1] != 3:
        raise FaceModelFormatError(f"texture space '{mean_key}' must be an (H,W,3) image, got {mean.shape}")
    scale = 255.0 if mean.max() > 1.5 else 1.0
    H, W, _ = mean.shape
    K = basis.shape[-1]
    stack = np.concatenate([mean[..., None], basis.reshape(H, W, 3, K)], axis=3) / scale
    t = torch.from_numpy(stack).permute(3, 2, 0, 1)  # (K+1, 3, H, W)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    arr = t.permute(2, 3, 1, 0).numpy()
    return np.clip(arr[..., 0], 0, 1), np.ascontiguousarray(arr[..., 1:])


def _cylindrical_uv(v: np.ndarray) -> np.ndarray:
    c = v.mean(0)
    d = v - c
    u = (np.arctan2(d[:, 0], d[:, 2]) / (2 * np.pi)) + 0.5
    h = (d[:, 1] - d[:, 1].min()) / max(float(np.ptp(d[:, 1])), 1e-9)
    return np.stack([u, h], 1).astype(np.float32)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    landmarks: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    texture: str | os.PathLike | None = None,
) -> Path:
    """FLAME pickle (+ embedding, masks, texture) -> cached ``.npz``. Nothing is written when
    loading fails (the write itself is atomic)."""
    assets = load_flame(src, landmarks=landmarks, masks=masks, texture=texture)
    return assets.save_npz(dst)


_CACHE: dict[tuple, FaceModelAssets] = {}
_CACHE_LOCK = threading.Lock()


def load_face_model(cfg: FaceModelConfig | str | None = None) -> FaceModelAssets:
    """The face model a config names: ``'demo-head'`` (built procedurally, cached in-process),
    a converted ``.npz`` (fast) or a FLAME ``.pkl`` (loaded and converted on the fly)."""
    if cfg is None or isinstance(cfg, str):
        cfg = FaceModelConfig(path=cfg or DEMO_HEAD)
    if cfg.path == DEMO_HEAD:
        from recon.demo_head import build_demo_head

        key = (DEMO_HEAD,)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = build_demo_head()
            return _CACHE[key]
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"face model '{cfg.path}' not found (use 'demo-head' or a FLAME .pkl / converted .npz)")
    if path.suffix == ".npz":
        return FaceModelAssets.load_npz(path)
    if path.suffix == ".pkl":
        return load_flame(path, landmarks=cfg.landmarks)
    raise FaceModelFormatError(f"{path}: expected 'demo-head', a FLAME .pkl or a converted .npz")

