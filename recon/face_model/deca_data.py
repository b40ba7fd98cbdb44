"""DECA's ``data/`` folder, read safely, stored with a converted FLAME model.

DECA (``decalib/utils/config.py``) reads these files beside FLAME; each is optional here and a
missing one is logged (a warning naming the file and what is used instead):

- ``landmark_embedding.npy``: the landmark embedding (a pickle: restricted unpickler,
  :func:`recon.face_model.flame_io.load_landmark_embedding`), unless ``landmarks`` is given;
- ``head_template.obj``: FLAME's UV layout (``vt``/``ft``) when the texture space has none;
- ``FLAME_albedo_from_BFM.npz`` (``MU``/``PC``, DECA's default) or ``FLAME_texture.npz``
  (``mean``/``tex_dir``), unless ``texture`` is given; read as DECA's ``FLAMETex``;
- ``uv_face_eye_mask.png``, ``uv_face_mask.png``: channel 0 of the image / 255 (a grey image
  is its own channel 0), at the file's resolution; resized to ``uv_size`` nearest-neighbour
  when a model is built (:func:`deca_uv_maps`), as DECA's ``F.interpolate`` default;
- ``fixed_displacement_256.npy``: a float (H, W) map in model units, added along the coarse
  normals in the detail step, as it is (row 0 = v = 1, the UV maps' orientation);
- ``mean_texture.jpg``: RGB / 255 (DECA loads it and does not use it; stored for the record);
- ``texture_data_256.npy``: DECA's dense template (a pickled dict: restricted unpickler),
  the entries its detail mesh reads (:data:`recon.face_model.face_assets.DENSE_TEMPLATE_KEYS`).

A file that is there but malformed is a :class:`FaceModelFormatError` naming it; nothing is
read half-way into a model.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from pathlib import Path

import numpy as np

from recon.face_model.face_assets import (FaceModelAssets, FaceModelFormatError, check_deca_map,
                               check_dense_template)
from recon.face_model.flame_io import _read_npy_object, load_flame
from recon.formats.safe_pickle import UnsafePickleError

log = logging.getLogger(__name__)

# DECA's file names (decalib/utils/config.py).
LANDMARKS = "landmark_embedding.npy"
HEAD_TEMPLATE = "head_template.obj"
ALBEDO_BFM = "FLAME_albedo_from_BFM.npz"
ALBEDO_FLAME = "FLAME_texture.npz"
FACE_EYE_MASK = "uv_face_eye_mask.png"
FACE_MASK = "uv_face_mask.png"
FIXED_DISPLACEMENT = "fixed_displacement_256.npy"
MEAN_TEXTURE = "mean_texture.jpg"
DENSE_TEMPLATE = "texture_data_256.npy"
FLAME_MASKS = "FLAME_masks.pkl"

# Refuse an image whose header claims more pixels than any UV map needs, before decoding it
# (a small compressed file can expand to gigabytes).
MAX_IMAGE_SIDE = 8192


def _read_image(path: Path, what: str) -> np.ndarray:
    """An 8-bit image as uint8 (H, W) or (H, W, C), as ``skimage.io.imread`` gives it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if max(im.size) > MAX_IMAGE_SIDE:
                raise FaceModelFormatError(f"{path}: {what} of {im.size[0]} x {im.size[1]} pixels "
                                           f"is larger than {MAX_IMAGE_SIDE} on a side")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                raise FaceModelFormatError(f"{path}: {what} must be an 8-bit grey or colour "
                                           f"image, got mode {im.mode}")
            return np.asarray(im).copy()  # decodes the whole file: truncation shows here
    except FaceModelFormatError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FaceModelFormatError(f"{path}: not a readable {what} ({e})") from e


def _read_npy(path: Path):
    """An ``.npy`` (object arrays through the restricted unpickler, whose refusals name the
    file and stay :class:`UnsafePickleError`); unreadable -> :class:`FaceModelFormatError`."""
    try:
        return _read_npy_object(path)
    except UnsafePickleError:
        raise
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise FaceModelFormatError(f"{path}: not a readable .npy ({e})") from e


def read_uv_mask(path: str | os.PathLike, key: str = "uv_face_eye_mask") -> np.ndarray:
    """``uv_face_eye_mask.png`` / ``uv_face_mask.png`` -> (H, W) float32 in [0, 1]: channel 0
    / 255, as DECA's ``_setup_renderer`` reads it (no threshold: soft edges stay soft)."""
    path = Path(path)
    img = _read_image(path, "mask image")
    grey = img if img.ndim == 2 else img[..., 0]
    return check_deca_map(key, grey.astype(np.float32) / 255.0, str(path))


def read_mean_texture(path: str | os.PathLike) -> np.ndarray:
    """``mean_texture.jpg`` -> (H, W, 3) float32 RGB in [0, 1] (row 0 = the image's top)."""
    path = Path(path)
    img = _read_image(path, "texture image")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return check_deca_map("mean_texture", img[..., :3].astype(np.float32) / 255.0, str(path))


def read_fixed_displacement(path: str | os.PathLike) -> np.ndarray:
    """``fixed_displacement_256.npy`` -> (H, W) float32, model units, as stored (DECA adds
    it as it is: ``uv_z * mask + fixed``). A pickled (object) array is refused."""
    path = Path(path)
    arr = _read_npy(path)
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise FaceModelFormatError(f"{path}: expected a numeric (H, W) array")
    return check_deca_map("fixed_displacement", arr, str(path))


def read_dense_template(path: str | os.PathLike, n_vertices: int) -> dict[str, np.ndarray]:
    """``texture_data_256.npy`` (a dict saved with ``np.save``, i.e. pickled) -> the
    entries DECA's detail mesh reads, checked against a model of ``n_vertices`` (see
    :func:`recon.face_model.face_assets.check_dense_template`). Through the restricted unpickler."""
    path = Path(path)
    raw = _read_npy(path)
    if isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 0:
        raw = raw.item()
    if not isinstance(raw, dict):
        raise FaceModelFormatError(f"{path}: expected a dict (DECA's dense template)")
    return check_dense_template(raw, n_vertices, str(path))


def _present(folder: Path, name: str, instead: str) -> Path | None:
    path = folder / name
    if path.exists():
        return path
    log.warning("DECA data: no %s in %s; %s", name, folder, instead)
    return None


def load_flame_with_deca_data(
    pkl: str | os.PathLike,
    folder: str | os.PathLike,
    landmarks: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    texture: str | os.PathLike | None = None,
) -> FaceModelAssets:
    """A FLAME pickle with what DECA's ``data/`` ``folder`` holds -> :class:`FaceModelAssets`
    carrying DECA's UV maps and dense template (see the module's list). Explicit
    ``landmarks`` / ``masks`` / ``texture`` win over the folder's files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DECA data folder '{folder}' not found")
    if landmarks is None and (folder / LANDMARKS).exists():
        landmarks = folder / LANDMARKS
    if masks is None and (folder / FLAME_MASKS).exists():
        masks = folder / FLAME_MASKS
    if texture is None:
        texture = (folder / ALBEDO_BFM if (folder / ALBEDO_BFM).exists()
                   else _present(folder, ALBEDO_FLAME, f"nor {ALBEDO_BFM}: a flat mean skin "
                                 "colour albedo is used (recon.face_model.flame_io.fallback_albedo)"))
    uv_template = _present(folder, HEAD_TEMPLATE, "the UV layout comes from the texture space's "
                           "vt/ft, else a cylindrical projection")
    assets = load_flame(pkl, landmarks=landmarks, masks=masks, texture=texture,
                        uv_template=uv_template)

    face_eye = _present(folder, FACE_EYE_MASK, "the detail and photometric face region is the "
                        "model's 'face' vertex mask rasterized in UV")
    face = _present(folder, FACE_MASK, "none is stored (DECA does not use it)")
    fixed = _present(folder, FIXED_DISPLACEMENT, "no fixed displacement is added to the details")
    mean = _present(folder, MEAN_TEXTURE, "none is stored (DECA does not use it)")
    dense = _present(folder, DENSE_TEMPLATE, "no dense template is stored")
    return dataclasses.replace(
        assets,
        uv_face_eye_mask=None if face_eye is None else read_uv_mask(face_eye, "uv_face_eye_mask"),
        uv_face_mask=None if face is None else read_uv_mask(face, "uv_face_mask"),
        fixed_displacement=None if fixed is None else read_fixed_displacement(fixed),
        mean_texture=None if mean is None else read_mean_texture(mean),
        dense_template={} if dense is None else read_dense_template(dense, assets.n_vertices),
    )


def deca_uv_maps(assets: FaceModelAssets, uv_size: int):
    """The face model's DECA face/eye mask and fixed displacement at ``uv_size``, as torch
    tensors (None where the model has none): mask (1, 1, S, S) resized nearest-neighbour (DECA's
    ``F.interpolate`` default); displacement (S, S), bilinear when its size differs (DECA only
    runs at its file's 256; at 256 it is the file's map exactly)."""
    import torch
    import torch.nn.functional as F

    mask = fixed = None
    if assets.uv_face_eye_mask is not None:
        m = torch.from_numpy(assets.uv_face_eye_mask)[None, None]
        mask = F.interpolate(m, size=(uv_size, uv_size), mode="nearest")
    if assets.fixed_displacement is not None:
        d = torch.from_numpy(assets.fixed_displacement)[None, None]
        if d.shape[-2:] != (uv_size, uv_size):
            d = F.interpolate(d, size=(uv_size, uv_size), mode="bilinear", align_corners=False,
                              antialias=True)
        fixed = d[0, 0]
    return mask, fixed


__all__ = ["load_flame_with_deca_data", "read_uv_mask", "read_mean_texture",
           "read_fixed_displacement", "read_dense_template", "deca_uv_maps", "MAX_IMAGE_SIDE"]
