"""Optional face-id backends: a clear error where missing, parity with the torch backend
where installed (pytorch3d: any device; nvdiffrast: CUDA)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from recon.render import BackendUnavailable, available_backends, rasterize
from render_reference import rotation_y, uv_sphere


def _sphere_batch(device):
    v, f = uv_sphere(24, 48)
    vb = np.stack([0.8 * v, 0.9 * v @ rotation_y(0.8).T + [0.1, -0.1, 0]]).astype(np.float32)
    return torch.as_tensor(vb, device=device), torch.as_tensor(f, device=device)


def _check_parity(backend: str, device: str, cull: bool):
    v, f = _sphere_batch(device)
    ref = rasterize(v, f, 96, cull_backfaces=cull)
    got = rasterize(v, f, 96, cull_backfaces=cull, backend=backend)
    differ = got.pix_to_face != ref.pix_to_face
    assert differ.float().mean() < 0.003  # float ties on shared edges only
    same = ~differ & (ref.pix_to_face >= 0)
    torch.testing.assert_close(got.bary[same], ref.bary[same])  # shared differentiable step
    vg = v.clone().requires_grad_()
    g_ref, = torch.autograd.grad(rasterize(vg, f, 96).zbuf[same].sum(), vg)
    g_got, = torch.autograd.grad(rasterize(vg, f, 96, backend=backend).zbuf[same].sum(), vg)
    torch.testing.assert_close(g_got, g_ref)


def test_missing_backend_is_a_clear_error():
    v, f = _sphere_batch("cpu")
    for name in ("pytorch3d", "nvdiffrast"):
        if name in available_backends():
            continue
        with pytest.raises(BackendUnavailable, match=name):
            rasterize(v, f, 16, backend=name)
    with pytest.raises(ValueError, match="unknown rasterizer backend"):
        rasterize(v, f, 16, backend="opengl")


@pytest.mark.skipif(importlib.util.find_spec("pytorch3d") is None,
                    reason="pytorch3d not installed (optional backend)")
@pytest.mark.parametrize("cull", [False, True])
def test_pytorch3d_parity(cull):
    _check_parity("pytorch3d", "cuda" if torch.cuda.is_available() else "cpu", cull)


@pytest.mark.skipif(importlib.util.find_spec("nvdiffrast") is None
                    or not torch.cuda.is_available(),
                    reason="nvdiffrast and a CUDA device needed (optional backend)")
@pytest.mark.parametrize("cull", [False, True])
def test_nvdiffrast_parity(cull):
    _check_parity("nvdiffrast", "cuda", cull)


def test_auto_backend_is_numba_on_cpu_and_identical_to_torch():
    """The CPU default (numba) gives the torch backend's ids bit for bit, culled or not."""
    v, f = _sphere_batch("cpu")
    for cull in (False, True):
        ref = rasterize(v, f, 96, cull_backfaces=cull, backend="torch").pix_to_face
        for name in ("auto", "numba"):
            assert torch.equal(rasterize(v, f, 96, cull_backfaces=cull, backend=name).pix_to_face, ref)
