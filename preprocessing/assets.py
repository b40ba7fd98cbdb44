"""Model files that registry packages ship (no downloads).

face-recognition-models imports ``pkg_resources`` (gone from recent setuptools), so its
folder is located from the import spec without executing the package.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def dlib_model_path(name: str) -> Path:
    """Path of ``name`` (e.g. ``shape_predictor_68_face_landmarks.dat``) inside
    face-recognition-models."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package face-recognition-models is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found in face-recognition-models ({path})")
    return path
