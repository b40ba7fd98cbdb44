"""``wildface render MESH.obj``: rasterize a mesh with the project's renderer."""
from __future__ import annotations

import math
from pathlib import Path

import typer

CAMERA_HELP = (
    "'ortho:S,TX,TY' (DECA's weak perspective: x = S (X + TX), y = S (Y + TY)), "
    "'persp:F,CX,CY,TZ' (pinhole on the +z axis at distance TZ looking at -z, focal F in "
    "NDC units: x = F X / (TZ - Z) + CX), or 'auto' (ortho fitting the mesh's x/y extent to "
    "90% of the image)"
)

CONVENTION = (
    "Conventions: NDC x in [-1, 1] maps to columns left to right and y in [-1, 1] to rows "
    "BOTTOM to TOP (y up; row 0 is the top of the image); z points toward the camera (the "
    "larger z wins). Pixel (i, j) is row i, column j, sampled at its centre "
    "x = -1 + (2j + 1)/N, y = 1 - (2i + 1)/N. OUT.npz holds pix_to_face (N, N) int64 "
    "(-1 where empty), bary (N, N, 3) float32 (0 where empty) and zbuf (N, N) float32 "
    "(NDC z, -inf where empty). The PNG is the grey shaded render (DECA's shape look)."
)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _numbers(text: str, n: int, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n or not all(math.isfinite(v) for v in values):  # nan renders blank
        _fail(f"--camera {what}: expected {n} comma-separated finite numbers, got {text!r}")
    return values


def render(
    mesh: Path = typer.Argument(..., metavar="MESH.obj", help="triangle mesh (.obj; polygons are fan-triangulated)"),
    size: int = typer.Option(..., "--size", min=1, max=8192, help="image side N in pixels"),
    camera: str = typer.Option("auto", "--camera", help=CAMERA_HELP),
    out: Path = typer.Option(..., "--out", help="output .npz (pix_to_face, bary, zbuf)"),
    png: Path | None = typer.Option(None, "--png", help="also write the grey shaded render"),
    backend: str = typer.Option("auto", "--backend",
                                help="auto (numba on CPU) | torch | numba | pytorch3d | nvdiffrast"),
    cull: bool = typer.Option(False, "--cull-backfaces", help="skip faces facing away"),
) -> None:
    """Rasterize MESH.obj to per-pixel face index, barycentrics and depth."""
    import numpy as np
    import torch

    from recon.formats.files import atomic_writer

    from recon.formats.mesh_io import read_obj
    from recon.render import (BackendUnavailable, PerspectiveCamera, render_grey,
                              weak_perspective_project)

    if not mesh.is_file():
        _fail(f"mesh not found: {mesh}")
    try:
        verts_np, faces_np, _, _ = read_obj(mesh)
    except (ValueError, IndexError) as e:  # read_obj's messages name the file
        _fail(str(e))
    if len(faces_np) == 0:
        _fail(f"{mesh}: no faces")
    verts = torch.as_tensor(np.asarray(verts_np, dtype=np.float32))[None]
    faces = torch.as_tensor(np.asarray(faces_np, dtype=np.int64))
    kind, _, params = camera.partition(":")
    if kind == "auto":
        lo, hi = verts[0, :, :2].amin(0), verts[0, :, :2].amax(0)
        s = 1.8 / float((hi - lo).max().clamp_min(1e-12))
        t = -(lo + hi) / 2
        ndc = weak_perspective_project(verts, torch.tensor([[s, float(t[0]), float(t[1])]]))
    elif kind == "ortho":
        ndc = weak_perspective_project(verts, torch.tensor([_numbers(params, 3, "ortho")]))
    elif kind == "persp":
        f, cx, cy, tz = _numbers(params, 4, "persp")
        ndc = PerspectiveCamera(focal=f, cx=cx, cy=cy, tz=tz).project(verts)
    else:
        _fail(f"--camera: unknown kind {kind!r}; use ortho:S,TX,TY, persp:F,CX,CY,TZ or auto")
    try:
        with torch.no_grad():
            image, frags = render_grey(verts, ndc, faces, size, backend=backend,
                                       cull_backfaces=cull)
    except (BackendUnavailable, ValueError) as e:
        _fail(str(e))
    arrays = {
        "pix_to_face": frags.pix_to_face[0].numpy().astype(np.int64),
        "bary": frags.bary[0].numpy().astype(np.float32),
        "zbuf": frags.zbuf[0].numpy().astype(np.float32),
    }
    with atomic_writer(out) as fh:
        np.savez(fh, **arrays)
    if png is not None:
        from PIL import Image

        rgb = (image[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        with atomic_writer(png) as fh:
            Image.fromarray(rgb).save(fh, format="PNG")
    covered = int((frags.pix_to_face >= 0).sum())
    typer.echo(f"{out}: {size}x{size}, {covered} pixels covered by {faces.shape[0]} faces")


render.__doc__ = (render.__doc__ or "") + "\n\n" + CONVENTION
