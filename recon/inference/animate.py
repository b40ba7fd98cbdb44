"""Animate a reconstructed face: keep the source's identity, drive its expression.

The source keeps its shape (identity), albedo, light, camera, head pose and detail code; each
frame takes the expression code and jaw pose of a driver (reconstructed frames, a parameter
table, or named controls). The detail decoder runs per frame on
``[driver jaw | driver expression | source detail code]``, so the displacement map (the
wrinkles) follows the expression while the person-specific detail code stays fixed.

Named controls (``smile=1.5,jaw_open=0.3``): the face model's ``expression_names`` (the demo
head's smile, mouth_open, brows_up, ...; FLAME has none) set those expression components (in
standard deviations); ``exp_<k>`` sets component k of any model; ``jaw_open`` (radians, about
the x axis: positive opens) and ``jaw_side`` (radians, about the y axis) set the jaw pose.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon.deca import Codes, Reconstruction

JAW_CONTROLS = {"jaw_open": 0, "jaw_side": 1}


@dataclass
class Drive:
    """Per-frame expression (T, n_exp) and jaw pose (T, 3) axis-angle."""

    exp: torch.Tensor
    jaw: torch.Tensor

    def __len__(self) -> int:
        return int(self.exp.shape[0])

    def __post_init__(self) -> None:
        if self.exp.dim() != 2 or self.jaw.shape != (self.exp.shape[0], 3):
            raise ValueError(f"drive needs exp (T, n_exp) and jaw (T, 3), got "
                             f"{tuple(self.exp.shape)} and {tuple(self.jaw.shape)}")


def parse_controls(spec: str) -> dict[str, float]:
    """``"smile=1.5,jaw_open=0.3"`` -> ``{"smile": 1.5, "jaw_open": 0.3}``."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"expression control {part!r} is not name=number") from None
    return out


def control_names(expression_names: Sequence[str], n_exp: int) -> list[str]:
    """Every control a model accepts (for help and errors)."""
    named = [n for n in expression_names[:n_exp]]
    return named + list(JAW_CONTROLS) + [f"exp_0 .. exp_{n_exp - 1}"]


def controls_to_codes(controls: dict[str, float], expression_names: Sequence[str],
                      n_exp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Named controls -> expression (n_exp,) and jaw pose (3,). Unknown names are errors
    that list the model's controls."""
    exp = torch.zeros(n_exp)
    jaw = torch.zeros(3)
    names = list(expression_names[:n_exp])
    for name, value in controls.items():
        if name in JAW_CONTROLS:
            jaw[JAW_CONTROLS[name]] = value
        elif name in names:
            exp[names.index(name)] = value
        elif name.startswith("exp_") and name[4:].isdigit() and int(name[4:]) < n_exp:
            exp[int(name[4:])] = value
        else:
            raise ValueError(f"unknown expression control {name!r}; this model has: "
                             f"{', '.join(control_names(expression_names, n_exp))}")
    return exp, jaw


def ramp(exp: torch.Tensor, jaw: torch.Tensor, frames: int) -> Drive:
    """Neutral -> target -> neutral over ``frames`` frames (a smooth cosine ease)."""
    if frames < 2:
        raise ValueError("an animation needs at least 2 frames")
    t = torch.linspace(0.0, 1.0, frames)
    w = (0.5 - 0.5 * torch.cos(2 * torch.pi * t))[:, None]  # 0 -> 1 -> 0
    return Drive(exp=w * exp[None], jaw=w * jaw[None])


def drive_from_codes(codes: Codes) -> Drive:
    """The expression and jaw of reconstructed driver frames."""
    return Drive(exp=codes.exp.detach().float().cpu(), jaw=codes.jaw.detach().float().cpu())


def read_table(path: str | os.PathLike, n_exp: int) -> Drive:
    """A parameter table -> Drive. Parquet, CSV or JSON lines/records with either list
    columns ``exp`` (and ``jaw`` (3) or ``pose`` (6: global | jaw)) as written by
    ``wildface reconstruct`` for a video, or scalar columns ``exp_0..`` and ``jaw_0..2``.
    Missing expression components are zero, extra ones are an error."""
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = pd.read_parquet(path)
    elif suffix == ".csv":
        df = pd.read_csv(path)
    elif suffix in (".json", ".jsonl"):
        df = pd.read_json(path, lines=suffix == ".jsonl")
    else:
        raise ValueError(f"{path}: parameter tables are .parquet, .csv, .json or .jsonl")
    if len(df) == 0:
        raise ValueError(f"{path}: the table has no rows")
    if "exp" in df.columns:
        exp_rows = [np.asarray(v, np.float32).ravel() for v in df["exp"]]
    else:
        cols = sorted((c for c in df.columns if c.startswith("exp_") and c[4:].isdigit()),
                      key=lambda c: int(c[4:]))
        if not cols:
            raise ValueError(f"{path}: no 'exp' column nor exp_<k> columns")
        exp_rows = list(df[cols].to_numpy(np.float32))
    if "jaw" in df.columns:
        jaw = np.stack([np.asarray(v, np.float32).ravel() for v in df["jaw"]])
    elif "pose" in df.columns:
        jaw = np.stack([np.asarray(v, np.float32).ravel()[3:6] for v in df["pose"]])
    elif all(f"jaw_{k}" in df.columns for k in range(3)):
        jaw = df[[f"jaw_{k}" for k in range(3)]].to_numpy(np.float32)
    else:
        jaw = np.zeros((len(df), 3), np.float32)
    exp = np.zeros((len(df), n_exp), np.float32)
    for i, row in enumerate(exp_rows):
        if row.size > n_exp and np.any(row[n_exp:] != 0):
            raise ValueError(f"{path}: row {i} has {row.size} expression components, the "
                             f"model has {n_exp}")
        exp[i, :min(n_exp, row.size)] = row[:n_exp]
    if jaw.shape != (len(df), 3):
        raise ValueError(f"{path}: jaw pose must have 3 values per row")
    return Drive(exp=torch.from_numpy(exp), jaw=torch.from_numpy(jaw))


def animate_codes(source: Codes, drive: Drive, index: int = 0) -> Codes:
    """Codes of every frame: sample ``index`` of ``source`` with each frame's expression and
    jaw. Shape, tex, light, cam, global pose and detail are the source's, bit for bit."""
    T = len(drive)
    src = source.index(torch.tensor([index], device=source.shape.device))
    dev = src.shape.device

    def rep(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.expand(T, *x.shape[1:]).clone()

    pose = rep(src.pose)
    pose[:, 3:] = drive.jaw.to(dev, pose.dtype)
    exp = drive.exp.to(dev, src.exp.dtype)
    if exp.shape[1] != src.exp.shape[1]:
        raise ValueError(f"driver has {exp.shape[1]} expression components, the model "
                         f"{src.exp.shape[1]}")
    return Codes(shape=rep(src.shape), tex=rep(src.tex), exp=exp, pose=pose, cam=rep(src.cam),
                 light=rep(src.light), detail=rep(src.detail))


@torch.no_grad()
def render_frames(model, codes: Codes, batch_size: int = 8) -> Iterator[tuple[int, Reconstruction]]:
    """Decode the frames' codes in batches (detail recomputed per frame):
    yields ``(first frame index, rendered Reconstruction with detail)``."""
    T = codes.shape.shape[0]
    for start in range(0, T, batch_size):
        idx = torch.arange(start, min(T, start + batch_size), device=codes.shape.device)
        yield start, model.decode(codes.index(idx), with_detail=True, render=True)


def write_animation(recon, codes: Codes, out: str | os.PathLike, fps: float = 25.0,
                    obj_sequence: bool = False, gif: bool = True, batch_size: int = 8,
                    background: np.ndarray | None = None) -> dict:
    """Render the frames of ``codes`` (T frames; see :func:`animate_codes`) to ``out``.

    recon: a :class:`recon.inference.reconstruct.FaceReconstructor`. Writes ``frames/shape_NNNN.png``
    (detailed shape), ``frames/textured_NNNN.png`` (textured, detail-lit, over ``background``
    (S, S, 3) uint8 if given), ``animation.mp4`` and ``animation.gif`` (shape | textured side
    by side), ``codes.json`` (per-frame exp and jaw, the fixed codes once) and, with
    ``obj_sequence``, ``obj/frame_NNNN.obj`` (posed coarse mesh with UVs; ``obj/albedo.png``
    once). Returns a summary (frames, files, per-frame mean |displacement|).
    """
    from recon.formats.files import atomic_write_bytes
    from recon.formats.mesh_io import write_obj
    from recon.inference.reconstruct import png_bytes, to_uint8
    from recon.inference.video import write_video

    out = Path(out)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    model = recon.model
    flame = model.flame
    uvs, uv_faces = flame.uv_coords.cpu().numpy(), flame.uv_faces.cpu().numpy()
    side_by_side: list[np.ndarray] = []
    displacement: list[float] = []
    bg = None if background is None else torch.from_numpy(background).permute(2, 0, 1)[None] / 255.0
    for start, rec in render_frames(model, codes, batch_size):
        shape = to_uint8(rec.shape_detail_images)
        tex = rec.images_detail.cpu()
        if bg is not None:
            alpha = rec.alpha.cpu()
            tex = tex * alpha + bg * (1 - alpha)
        textured = to_uint8(tex)
        for k in range(shape.shape[0]):
            t = start + k
            atomic_write_bytes(out / "frames" / f"shape_{t:04d}.png", png_bytes(shape[k]))
            atomic_write_bytes(out / "frames" / f"textured_{t:04d}.png", png_bytes(textured[k]))
            side_by_side.append(np.concatenate([shape[k], textured[k]], axis=1))
            displacement.append(float(rec.uv_displacement[k].abs().mean()))
            if obj_sequence:
                write_obj(out / "obj" / f"frame_{t:04d}.obj", rec.vertices[k], flame.faces,
                          uvs, uv_faces)
        if obj_sequence and start == 0:
            atomic_write_bytes(out / "obj" / "albedo.png", png_bytes(to_uint8(rec.albedo[:1])[0]))
    files = {"video": str(write_video(out / "animation.mp4", side_by_side, fps))}
    if gif:
        files["gif"] = str(write_video(out / "animation.gif", side_by_side, fps))
    fixed = {k: v[0].cpu().tolist() for k, v in codes.as_dict().items()
             if v is not None and k not in ("exp", "pose")}
    payload = {"model": recon.info.as_dict(), "fps": fps, "frames": len(side_by_side),
               "fixed": fixed, "global_pose": codes.pose[0, :3].cpu().tolist(),
               "exp": codes.exp.cpu().tolist(), "jaw": codes.pose[:, 3:].cpu().tolist(),
               "mean_abs_displacement": displacement}
    atomic_write_bytes(out / "codes.json", json.dumps(payload).encode())
    return {"frames": len(side_by_side), "out": str(out), **files,
            "mean_abs_displacement": displacement}


__all__ = ["Drive", "JAW_CONTROLS", "animate_codes", "control_names", "controls_to_codes",
           "drive_from_codes", "parse_controls", "ramp", "read_table", "render_frames", "write_animation"]
