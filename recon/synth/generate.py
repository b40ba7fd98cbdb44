"""Render random people from the face model, with ground truth (``wildface synth``).

Per identity: a shape code and an albedo code. Per image: expression and jaw (or neutral),
head pose (yaw within +-``yaw_max``, smaller pitch and roll), SH light, a camera placing the
face at a realistic crop scale (DECA's weak perspective, or a close perspective "selfie"
camera), a background, and optionally an occluder. Everything is drawn from numpy generators
seeded by ``(seed, identity)`` and ``(seed, identity, image)``, so the output is the same
whatever the batch size. See ``docs/training.md`` for the output layout.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from recon.face_model.albedo import AlbedoModel
from recon.config import FaceModelConfig, SynthConfig
from recon.face_model.flame import FLAME
from recon.formats.landmarks_io import write_pts
from recon.formats.sidecars import MASK_SUFFIX, PTS_SUFFIX
from recon.render import DecaRenderer, PerspectiveCamera, ndc_to_image, weak_perspective_project
from recon.render.cameras import image_to_pixel
from recon.synth.backgrounds import background
from recon.synth.occluders import Occluder, random_occluder
from recon.formats.files import atomic_write_bytes as _atomic_bytes

IMAGES_DIR = "images"
LABELS_FILE = "labels.csv"
PARAMS_FILE = "params.json"
NOW_DIR = "now"
NOW_IMAGE_ROOT = "NoW_Dataset/final_release_version/iphone_pictures"  # EvaluationConfig default
MM_PER_UNIT = 1000.0  # face model units are metres; NoW scans are in mm


@dataclass
class IdentityParams:
    name: str
    shape: np.ndarray  # (n_shape,)
    tex: np.ndarray  # (n_tex,)


@dataclass
class ImageParams:
    """Ground truth of one image (written to params.json)."""

    identity: str
    name: str
    expression: np.ndarray  # (n_exp,)
    pose: np.ndarray  # (6,) global axis-angle | jaw axis-angle
    light: np.ndarray  # (9, 3) SH
    background: str
    selfie: bool
    camera: dict = field(default_factory=dict)
    occluder: Occluder | None = None
    landmarks: np.ndarray | None = None  # (68, 2) pixels, 0-based

    @property
    def challenge_dir(self) -> str:
        if self.selfie:
            return "selfie"
        if self.occluder is not None:
            return "multiview_occlusions"
        if np.any(self.expression != 0) or np.any(self.pose[3:] != 0):
            return "multiview_expressions"
        return "multiview_neutral"

    def to_json(self) -> dict:
        return {
            "identity": self.identity, "expression": self.expression.tolist(),
            "pose": self.pose.tolist(), "light": self.light.tolist(),
            "background": self.background, "camera": self.camera,
            "occluder": None if self.occluder is None else self.occluder.to_json(),
            "challenge": self.challenge_dir, "landmarks_px": self.landmarks.tolist(),
        }


class SynthGenerator:
    """Renders synthetic people. ``face_model`` picks the model (demo head by default)."""

    def __init__(self, cfg: SynthConfig | None = None, face_model: FaceModelConfig | None = None,
                 device: str | torch.device = "cpu") -> None:
        from recon.face_model.flame_io import load_face_model

        self.cfg = cfg or SynthConfig()
        fm = face_model or FaceModelConfig()
        assets = load_face_model(fm)
        self.model_name = assets.name
        self.device = torch.device(device)
        self.flame = FLAME(assets, min(fm.n_shape, assets.n_shape_total),
                           min(fm.n_exp, assets.n_exp_total)).to(self.device)
        self.albedo = AlbedoModel(assets, min(fm.n_tex, assets.n_tex_total)).to(self.device)
        self.renderer = DecaRenderer(self.flame.faces, self.flame.uv_coords, self.flame.uv_faces,
                                     image_size=self.cfg.image_size, uv_size=32,
                                     cull_backfaces=True).to(self.device)
        self.faces = assets.faces
        # lookup by face id + 1 (pix_to_face is -1 on the background)
        lut = np.zeros(assets.n_faces + 1, bool)
        lut[_skin_faces(assets) + 1] = True
        self.skin_lut = torch.as_tensor(lut, device=self.device)

    # -- random parameters ------------------------------------------------------------------
    def identity(self, index: int) -> IdentityParams:
        rng = np.random.default_rng([self.cfg.seed, 0, index])
        return IdentityParams(
            name=f"id{index:04d}",
            shape=(rng.standard_normal(self.flame.n_shape) * self.cfg.shape_std).astype(np.float32),
            tex=(rng.standard_normal(self.albedo.n_tex) * self.cfg.tex_std).astype(np.float32),
        )

    def _image_params(self, ident: IdentityParams, j: int, rng: np.random.Generator) -> ImageParams:
        c = self.cfg
        exp = np.zeros(self.flame.n_exp, np.float32)
        pose = np.zeros(6, np.float32)
        if rng.random() < c.expression_probability:
            exp = (rng.standard_normal(self.flame.n_exp) * c.exp_std).astype(np.float32)
            pose[3] = np.radians(rng.uniform(0, c.jaw_open_max))
            pose[4:] = np.radians(rng.normal(0, 1.5, 2))
        euler = [rng.uniform(-c.pitch_max, c.pitch_max), rng.uniform(-c.yaw_max, c.yaw_max),
                 rng.uniform(-c.roll_max, c.roll_max)]
        pose[:3] = Rotation.from_euler("xyz", euler, degrees=True).as_rotvec()
        light = np.zeros((9, 3), np.float32)
        tint = rng.uniform(0.8, 1.2, 3)
        light[0] = rng.uniform(*c.light_intensity) * tint / tint.mean()
        direction = rng.normal(size=3)
        direction[2] = abs(direction[2])  # mostly from the front
        direction /= np.linalg.norm(direction)
        light[1:4] = (direction * rng.uniform(0, c.light_directional))[:, None] * tint / tint.mean()
        light[4:] = rng.normal(0, 0.15, (5, 3))
        kind = c.backgrounds[int(rng.integers(len(c.backgrounds)))]
        return ImageParams(identity=ident.name, name=f"img{j:03d}", expression=exp, pose=pose,
                           light=light, background=kind,
                           selfie=bool(rng.random() < c.selfie_probability))

    # -- rendering --------------------------------------------------------------------------
    def _project(self, verts: torch.Tensor, lmk: torch.Tensor, params: list[ImageParams],
                 rngs: list[np.random.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cameras framing each face: NDC vertices (B, V, 3) and landmarks (B, 68, 3)."""
        c = self.cfg
        verts_ndc, lmk_ndc = [], []
        for b, (p, rng) in enumerate(zip(params, rngs)):
            frac = rng.uniform(*c.face_fraction)
            centre = rng.uniform(-c.centre_jitter, c.centre_jitter, 2) * 2  # NDC units
            if p.selfie:
                nose_z = float(lmk[b, 17 + 13, 2])  # nose tip (iBUG 30)
                cam = PerspectiveCamera(focal=1.0, tz=nose_z + float(rng.uniform(0.22, 0.35)))
                raw = cam.project(lmk[b:b + 1])[0, :, :2]
                span = float((raw.amax(0) - raw.amin(0)).max())
                mid = (raw.amax(0) + raw.amin(0)) / 2
                focal = 2 * frac / span
                cx, cy = (torch.as_tensor(centre, dtype=raw.dtype) - focal * mid).tolist()
                cam = PerspectiveCamera(focal=focal, cx=cx, cy=cy, tz=cam.tz)
                p.camera = {"type": "perspective", "focal": focal, "cx": cx, "cy": cy, "tz": cam.tz}
                verts_ndc.append(cam.project(verts[b:b + 1]))
                lmk_ndc.append(cam.project(lmk[b:b + 1]))
            else:
                xy = lmk[b, :, :2]
                span = float((xy.amax(0) - xy.amin(0)).max())
                mid = (xy.amax(0) + xy.amin(0)) / 2
                s = 2 * frac / span
                t = torch.as_tensor(centre, dtype=xy.dtype) / s - mid
                cam = torch.tensor([[s, float(t[0]), float(t[1])]], dtype=verts.dtype,
                                   device=verts.device)
                p.camera = {"type": "weak_perspective", "cam": cam[0].tolist()}
                verts_ndc.append(weak_perspective_project(verts[b:b + 1], cam))
                lmk_ndc.append(weak_perspective_project(lmk[b:b + 1], cam))
        return torch.cat(verts_ndc), torch.cat(lmk_ndc)

    @torch.no_grad()
    def render_batch(self, items: list[tuple[IdentityParams, int]]
                     ) -> list[tuple[ImageParams, np.ndarray, np.ndarray]]:
        """Render ``(identity, image index)`` pairs -> (params, image (S, S, 3) uint8,
        skin mask (S, S) uint8 {0, 255}) each."""
        S = self.cfg.image_size
        rngs = [np.random.default_rng([self.cfg.seed, 1, int(ident.name[2:]), j])
                for ident, j in items]
        params = [self._image_params(ident, j, rng) for (ident, j), rng in zip(items, rngs)]
        dev = self.device
        shape = torch.as_tensor(np.stack([i.shape for i, _ in items]), device=dev)
        tex = torch.as_tensor(np.stack([i.tex for i, _ in items]), device=dev)
        exp = torch.as_tensor(np.stack([p.expression for p in params]), device=dev)
        pose = torch.as_tensor(np.stack([p.pose for p in params]), device=dev)
        out = self.flame(shape, exp, pose)
        verts_ndc, lmk_ndc = self._project(out.vertices, out.landmarks2d, params, rngs)
        bg = torch.as_tensor(np.stack([background(p.background, rng, S)
                                       for p, rng in zip(params, rngs)]), device=dev)
        light = torch.as_tensor(np.stack([p.light for p in params]), device=dev)
        r = self.renderer.render(out.vertices, verts_ndc, self.albedo(tex), light,
                                 background=bg.permute(0, 3, 1, 2))
        images = r["images"].clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        skin = self.skin_lut[r["pix_to_face"] + 1].cpu().numpy()
        lmk_px = image_to_pixel(ndc_to_image(lmk_ndc)[..., :2], S, S).cpu().numpy()
        results = []
        for b, (p, rng) in enumerate(zip(params, rngs)):
            p.landmarks = lmk_px[b].astype(np.float64)
            image, mask = images[b], skin[b]
            if rng.random() < self.cfg.occluder_probability:
                p.occluder = random_occluder(rng, p.landmarks)
                cover = p.occluder.coverage(S)
                image = np.where(cover[..., None], np.asarray(p.occluder.colour, np.float32), image)
                mask = mask & ~cover
            results.append((p, np.round(image * 255).astype(np.uint8),
                            mask.astype(np.uint8) * 255))
        return results

    @torch.no_grad()
    def neutral(self, ident: IdentityParams) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth neutral mesh (expression and jaw zeroed) (V, 3) and its 7 NoW
        landmarks (7, 3), in face-model units."""
        shape = torch.as_tensor(ident.shape[None], device=self.device)
        out = self.flame(shape, torch.zeros(1, self.flame.n_exp, device=self.device),
                         torch.zeros(1, 6, device=self.device))
        return out.vertices[0].cpu().numpy(), out.now7[0].cpu().numpy()


def _skin_faces(assets) -> np.ndarray:
    """Triangles counted as skin: all three vertices in the 'face' region (if the model has
    one), none on an eyeball."""
    keep = np.ones(assets.n_vertices, bool)
    if "face" in assets.masks:
        keep[:] = False
        keep[assets.masks["face"]] = True
    for name in ("left_eyeball", "right_eyeball"):
        if name in assets.masks:
            keep[assets.masks[name]] = False
    return np.nonzero(keep[assets.faces].all(axis=1))[0]


# -- files --------------------------------------------------------------------------------------
def _encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def generate(out: str | os.PathLike, cfg: SynthConfig | None = None,
             face_model: FaceModelConfig | None = None, progress=None) -> dict:
    """Write a synthetic dataset to ``out`` (see module doc and docs/training.md).

    Returns a summary dict (counts, paths, ``seconds`` spent rendering and writing, after
    the face model is loaded). ``progress(done, total)`` is called per batch.
    """
    from recon.evaluation.now_io import NowImage, write_image_list, write_pp
    from recon.formats.mesh_io import write_obj

    cfg = cfg or SynthConfig()
    gen = SynthGenerator(cfg, face_model)
    started = time.perf_counter()
    out = Path(out)
    images_dir, now_dir = out / IMAGES_DIR, out / NOW_DIR
    idents = [gen.identity(i) for i in range(cfg.identities)]
    items = [(ident, j) for ident in idents for j in range(cfg.images_per_identity)]
    labels, all_params, now_images = [], {}, []
    for start in range(0, len(items), cfg.batch_size):
        for p, image, mask in gen.render_batch(items[start:start + cfg.batch_size]):
            rel = f"{p.identity}/{p.name}"
            jpg = _encode(image, "JPEG", quality=cfg.jpeg_quality)
            _atomic_bytes(images_dir / f"{rel}.jpg", jpg)
            _atomic_bytes(images_dir / f"{rel}{PTS_SUFFIX}", write_pts(p.landmarks))
            _atomic_bytes(images_dir / f"{rel}{MASK_SUFFIX}", _encode(mask, "PNG"))
            now_image = NowImage(p.identity, p.challenge_dir, p.name, ".jpg")
            _atomic_bytes(now_dir / NOW_IMAGE_ROOT / now_image.rel_path, jpg)
            labels.append((f"{rel}.jpg", p.identity))
            all_params[rel] = p.to_json()
            now_images.append(now_image)
        if progress is not None:
            progress(min(start + cfg.batch_size, len(items)), len(items))
    for ident in idents:
        verts, now7 = gen.neutral(ident)
        subject = ident.name
        write_obj(now_dir / "scans" / subject / f"{subject}.obj", verts * MM_PER_UNIT, gen.faces)
        write_pp(now_dir / "scans_lmks_onlypp" / subject / f"{subject}_picked_points.pp",
                 now7 * MM_PER_UNIT, source_name=f"{subject}.obj")
    write_image_list(now_dir / "imagepathsvalidation.txt", sorted(now_images))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "identity"])
    writer.writerows(labels)
    _atomic_bytes(out / LABELS_FILE, buf.getvalue().encode())
    meta = {
        "face_model": gen.model_name, "n_shape": gen.flame.n_shape, "n_exp": gen.flame.n_exp,
        "n_tex": gen.albedo.n_tex, "units": "face model units (metres); NoW scans in mm",
        "config": cfg.model_dump(mode="json"),
        "identities": {i.name: {"shape": i.shape.tolist(), "tex": i.tex.tolist()} for i in idents},
        "images": all_params,
    }
    _atomic_bytes(out / PARAMS_FILE, json.dumps(meta).encode())
    return {"out": str(out), "identities": len(idents), "images": len(items),
            "images_dir": str(images_dir), "now_dir": str(now_dir),
            "labels": str(out / LABELS_FILE), "params": str(out / PARAMS_FILE),
            "seconds": time.perf_counter() - started}

