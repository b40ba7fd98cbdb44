"""Face-id backends: each finds, per pixel centre, the nearest triangle (non-differentiable).

``get_backend(name)`` returns a function ``(verts_pix (B,V,3), faces (F,3), height, width,
cull_backfaces, chunk_pairs) -> pix_to_face (B,H,W) long`` (-1 empty, local face index),
where ``verts_pix`` are [column, row, z] pixel coordinates (centres at integers, rows down,
larger z nearer). ``torch`` always works (any device); ``numba`` is the same rule compiled
for the CPU (bit-identical ids, several times faster); ``auto`` (the default) takes
``numba`` for CPU tensors where it imports and ``torch`` otherwise; ``pytorch3d`` and
``nvdiffrast`` are optional and import-guarded: asking for one that is not installed is a
clear error.
"""
from __future__ import annotations

from typing import Callable

import torch

from recon.render.backends.errors import BackendUnavailable

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "get_backend"]

FaceIdFn = Callable[..., torch.Tensor]

BACKENDS = ("auto", "torch", "numba", "pytorch3d", "nvdiffrast")


def _auto(verts_pix: torch.Tensor, *args) -> torch.Tensor:
    if verts_pix.device.type == "cpu":
        try:
            return get_backend("numba")(verts_pix, *args)
        except BackendUnavailable:
            pass
    return get_backend("torch")(verts_pix, *args)


def get_backend(name: str) -> FaceIdFn:
    if name == "auto":
        return _auto
    if name == "torch":
        from recon.render.backends.torch_backend import face_ids
        return face_ids
    if name == "numba":
        from recon.render.backends.numba_backend import face_ids
        return face_ids
    if name == "pytorch3d":
        from recon.render.backends.pytorch3d_backend import face_ids
        return face_ids
    if name == "nvdiffrast":
        from recon.render.backends.nvdiffrast_backend import face_ids
        return face_ids
    raise ValueError(f"unknown rasterizer backend {name!r}; choose one of {BACKENDS}")


def available_backends() -> list[str]:
    """The backends that import here (nvdiffrast also needs a CUDA device)."""
    names = ["auto", "torch"]
    for name in BACKENDS[2:]:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names
