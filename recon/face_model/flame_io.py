"""Load real FLAME files safely (no chumpy, no arbitrary code, bounded memory) and pick the
face model.

Pickles go through :mod:`recon.formats.safe_pickle` (allow-list and memory budget; its names are
importable from here too).

Files: FLAME 2020 ``generic_model.pkl`` and FLAME 2023 pickles (latin1, keys ``v_template f
shapedirs posedirs J_regressor weights kintree_table``), DECA's ``landmark_embedding.npy`` (an
object ``.npy`` holding a pickled dict, some values torch tensors), ``FLAME_masks.pkl`` (dict
region -> vertex ids), ``FLAME_texture.npz`` (``mean``, ``tex_dir``, ``vt``, ``ft``; 0..255).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from recon.config import DEMO_HEAD, FaceModelConfig
from recon.face_model.face_assets import FaceModelAssets, FaceModelFormatError, read_npz
from recon.formats.files import wildface_home
from recon.formats.safe_pickle import (  # noqa: F401 - re-exported for callers of recon.face_model.flame_io
    PickleLimitError, UnsafePickleError, safe_loads)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- FLAME files
def _unpickle(data: bytes, path: str | os.PathLike) -> Any:
    """:func:`safe_loads` of a file's pickled bytes; a refusal names the file (a model is
    read from several)."""
    try:
        return safe_loads(data)
    except UnsafePickleError as e:
        raise type(e)(f"{path}: {e}") from e


def load_flame_pickle(path: str | os.PathLike) -> dict:
    """A FLAME model pickle as a dict of numpy arrays / scipy.sparse (latin1, restricted)."""
    obj = _unpickle(Path(path).read_bytes(), path)
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
            # numpy allocates the header's shape before reading: the data must be there.
            declared, held = int(np.prod(shape, dtype=object)) * dtype.itemsize, os.fstat(fh.fileno()).st_size - fh.tell()
            if declared > held:
                raise FaceModelFormatError(f"{path}: header declares {declared:,} bytes of data, the file holds {held:,}")
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
        return _unpickle(fh.read(), path)


def load_landmark_embedding(path: str | os.PathLike) -> dict:
    """DECA's ``landmark_embedding.npy`` (or the same dict pickled) -> dict of numpy arrays
    with the shapes of :class:`FaceModelAssets` (``full_*`` flattened to (68,) / (68, 3))."""
    path = Path(path)
    raw = _unpickle(path.read_bytes(), path) if path.suffix == ".pkl" else _read_npy_object(path)
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
    raw = _unpickle(Path(path).read_bytes(), path)
    if not isinstance(raw, dict):
        raise FaceModelFormatError(f"{path}: expected a dict of masks")
    return {str(k): np.asarray(v, dtype=np.int64).ravel() for k, v in raw.items()}


def _dense(a: Any) -> np.ndarray:
    return np.asarray(a.toarray() if hasattr(a, "toarray") else a)


def fallback_albedo(n_components: int = 50, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Albedo for a FLAME model given without a texture space: a flat mean skin colour and
    global colour variations (brightness, redness, yellowness) followed by smooth UV fields.
    Documented in docs/face-model.md; DECA trains fine from it, texture quality is limited."""
    from recon.face_model.demo_head.albedo import SKIN_RGB, smooth_uv_basis

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
        tex = read_npz(texture)
        if "vt" in tex and "ft" in tex:
            vt, ft = tex["vt"], tex["ft"]
        mean_key, dir_key = ("mean", "tex_dir") if "mean" in tex else ("MU", "PC")
        if mean_key not in tex or dir_key not in tex:
            raise FaceModelFormatError(f"{texture}: no 'mean'/'tex_dir' (FLAME_texture.npz) or "
                                       "'MU'/'PC' (FLAME_albedo_from_BFM.npz) arrays")
        albedo_mean, albedo_basis = _resize_texture_space(tex, mean_key, dir_key, source=str(texture))
    if vt is None and uv_template:
        from recon.formats.mesh_io import read_obj

        try:
            _, obj_faces, vt, ft = read_obj(uv_template)
        except (ValueError, OSError) as e:
            raise FaceModelFormatError(f"{uv_template}: not a readable OBJ ({e})") from e
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


def _resize_texture_space(tex: dict, mean_key: str, dir_key: str, size: int = 256,
                          source: str = "texture space") -> tuple[np.ndarray, np.ndarray]:
    """A FLAME texture space -> ``(mean (size, size, 3), basis (size, size, 3, K))``, RGB.

    As DECA's ``FLAMETex``: the arrays are read in C order as a square (H, W, 3) image per
    component, whatever their stored shape (``MU`` may be flat); ``FLAME_texture.npz``
    (``mean``/``tex_dir``) holds 0..255 and is divided by 255, ``FLAME_albedo_from_BFM.npz``
    (``MU``/``PC``) is already 0..1; the channels are stored BGR (written with OpenCV) and
    flipped to RGB; resampling to ``size`` is nearest-neighbour, so a model trained by DECA on
    these albedos sees the same texels here. ``source`` names the file in errors.
    """
    import torch
    import torch.nn.functional as F

    mean = np.asarray(tex[mean_key], np.float32)
    basis = np.asarray(tex[dir_key], np.float32)
    side = int(round(np.sqrt(mean.size / 3)))
    if side * side * 3 != mean.size or basis.ndim < 2 or basis.size % mean.size:
        raise FaceModelFormatError(
            f"{source}: '{mean_key}' {mean.shape} / '{dir_key}' {basis.shape}: expected a "
            "square RGB image and one such image per component")
    K = basis.shape[-1]
    scale = 255.0 if mean_key == "mean" else 1.0
    stack = np.concatenate([mean.reshape(side, side, 3, 1), basis.reshape(side, side, 3, K)],
                           axis=3) / scale
    t = torch.from_numpy(stack).permute(3, 2, 0, 1)  # (K+1, 3, H, W)
    t = F.interpolate(t, size=(size, size), mode="nearest")[:, [2, 1, 0]]
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
    """FLAME pickle (+ embedding, masks, texture) -> cached ``.npz`` (with DECA's ``data/``
    folder: :func:`recon.face_model.deca_data.load_flame_with_deca_data`, then ``save_npz``). Nothing
    is written when loading fails (the write itself is atomic)."""
    return load_flame(src, landmarks=landmarks, masks=masks, texture=texture).save_npz(dst)


_CACHE: dict[tuple, FaceModelAssets] = {}
_CACHE_LOCK = threading.Lock()


def demo_head_file() -> Path | None:
    """Where the built demo head is kept for the next process:
    ``<wildface home>/face-models/demo-head-<digest>.npz``. The digest covers the code that
    builds and stores it (``demo_head/``, ``face_assets.py``, ``lbs.py``) and numpy's and
    scipy's versions, so changed code never reads an old build. None when the home is not a
    local folder."""
    home = wildface_home()
    if "://" in home:
        return None
    import scipy

    from recon.face_model import demo_head, face_assets, lbs

    digest = hashlib.sha256(f"numpy {np.__version__} scipy {scipy.__version__}".encode())
    sources = sorted(Path(demo_head.__file__).parent.glob("*.py"))
    for src in (*sources, Path(face_assets.__file__), Path(lbs.__file__)):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    return Path(home) / "face-models" / f"demo-head-{digest.hexdigest()[:16]}.npz"


def _demo_head() -> FaceModelAssets:
    """The demo head: read from :func:`demo_head_file` (a tenth of a second) or built (a few
    CPU seconds, paid again by every process: each Ray worker, each command) and kept there.
    A file that cannot be read is built again; a home that cannot be written only costs the
    build."""
    from recon.face_model.demo_head import build_demo_head

    path = demo_head_file()
    if path is not None and path.is_file():
        try:
            return FaceModelAssets.load_npz(path)
        except (OSError, ValueError) as e:  # FaceModelFormatError is a ValueError
            log.warning("demo head: %s could not be read (%s); building it again", path, e)
    assets = build_demo_head()
    if path is not None:
        try:
            assets.save_npz(path)
            for older in path.parent.glob("demo-head-*.npz"):  # builds of other code: 67 MB each
                if older != path:
                    older.unlink(missing_ok=True)
        except OSError as e:
            log.debug("demo head: not kept at %s (%s)", path, e)
    return assets


def load_face_model(cfg: FaceModelConfig | str | None = None) -> FaceModelAssets:
    """The face model a config names: ``'demo-head'`` (built procedurally, kept in
    :func:`demo_head_file` for later processes and cached in-process),
    a converted ``.npz`` (fast) or a FLAME ``.pkl`` (loaded and converted on the fly)."""
    if cfg is None or isinstance(cfg, str):
        cfg = FaceModelConfig(path=cfg or DEMO_HEAD)
    if cfg.path == DEMO_HEAD:
        key = (DEMO_HEAD,)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = _demo_head()
            return _CACHE[key]
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"face model '{cfg.path}' not found (use 'demo-head' or a FLAME .pkl / converted .npz)")
    if path.suffix == ".npz":
        return FaceModelAssets.load_npz(path)
    if path.suffix == ".pkl":
        return load_flame(path, landmarks=cfg.landmarks)
    raise FaceModelFormatError(f"{path}: expected 'demo-head', a FLAME .pkl or a converted .npz")

