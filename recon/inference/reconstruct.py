"""Inference with a trained DECA model: load it from a checkpoint, reconstruct face crops,
write the per-face outputs.

Pure PyTorch (+ numpy, PIL for PNGs). Finding faces in photos (detection, landmarks, crop)
is the preprocessing's job and resolving ``--model`` URIs (MLflow) the flows' job; this module
takes a local checkpoint and crops.

Face model: a model is tied to the face model it was trained with (FLAME never travels in a
checkpoint; a registered model carries the face model's arrays). :func:`load_model` uses the
recorded one unless another is configured, and a configured face model that is not the
recorded one is a :class:`FaceModelMismatch` error.

Per-face outputs (:func:`write_face`), in one folder:

- ``params.json``: the codes (shape, tex, exp, pose = global | jaw axis-angle, cam =
  weak-perspective s, tx, ty, light (9, 3) SH, detail), the model's identity (checkpoint,
  step, face model, registry version when known), 2D landmarks (crop image convention),
  the 7 NoW landmarks and whatever the caller adds (crop transform, source);
- ``coarse.obj`` (+ ``coarse.mtl``, ``coarse.png`` albedo texture, ``coarse_normals.png``
  coarse normal map): the posed coarse mesh with the face model's UVs;
- ``detail.obj`` (+ ``detail.mtl``, ``detail.png`` albedo, ``detail_normals.png`` detail
  normal map): the dense detailed surface, one vertex per texel of the UV position map,
  UVs at the texel centres;
- ``displacement.png``: the UV displacement map, 16-bit grey, ``0.5 + z / (2 max_z)``
  (``max_z`` in params.json; 32768 = no displacement);
- ``grid.png``: input | landmarks (green: given, red: predicted) | coarse shape | detailed
  shape | textured render over the input.

Aligned inputs (``input_size`` given: the whole input, a square of that side, was resized to
the crop): ``landmarks2d`` are pixels of the input (x right, y down; :func:`input_pixels`) and
``displacement.npy`` holds the detail decoder's raw UV map, (S, S) float32 metres, before any
mask.

Normal maps are object-space unit normals encoded as ``(n + 1) / 2``; UV images have row 0 at
v = 1 (the OBJ convention of :func:`recon.formats.mesh_io.write_obj`).

Numerical integrity: :func:`load_model` refuses a checkpoint whose weights hold ``inf`` or
``nan`` (:class:`recon.training.checkpoint.NonFiniteState`), and :func:`write_face` refuses,
before writing anything, a face whose codes, mesh or displacement are not finite
(:class:`NonFiniteOutput`; :func:`check_face_finite`), so no ``nan`` mesh is ever reported ok.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.config import FaceModelConfig, NetworkConfig, RefineConfig
from recon.deca import DECA, Codes, Reconstruction
from recon.devices import pick_device
from recon.face_model.face_assets import FaceModelAssets
from recon.inference.fitting import refine_codes
from recon.formats.files import atomic_write_bytes, npy_bytes
from recon.formats.mesh_io import write_obj
from recon.render import draw_landmarks, image_to_pixel, vertex_normals
from recon.training.checkpoint import assert_finite_state, load_checkpoint

DEFAULT_CROP_SCALE = 1.6  # DataConfig.eval_scale: crop side / landmark-box size at test time
GRID_PANELS = ("input", "landmarks (green given, red predicted)", "coarse shape",
               "detailed shape", "textured render")


class FaceModelMismatch(ValueError):
    """The configured face model is not the one the model was trained with."""


class NonFiniteOutput(ValueError):
    """A face whose reconstruction holds ``inf`` or ``nan`` (codes, mesh or displacement)."""


def face_model_fingerprint(assets: FaceModelAssets) -> str:
    """sha256 (16 hex digits) of the arrays that define the geometry: template, triangles,
    blendshapes, skinning and landmark embedding."""
    h = hashlib.sha256()
    for key in ("v_template", "faces", "shapedirs", "J_regressor", "weights",
                "static_lmk_faces_idx", "static_lmk_bary_coords"):
        arr = np.ascontiguousarray(getattr(assets, key))
        h.update(key.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _load_assets(spec: FaceModelConfig) -> FaceModelAssets:
    from recon.face_model.flame_io import load_face_model

    return load_face_model(spec)


def resolve_face_model(trained_name: str, recorded: FaceModelConfig,
                       recorded_assets: FaceModelAssets | None,
                       configured: FaceModelConfig | None) -> FaceModelAssets:
    """The face model to run a model with.

    trained_name: the face-model name the checkpoint records; recorded: the face-model config
    the model was trained with; recorded_assets: the arrays shipped with the model (registered
    models), if any; configured: what the user asked for, or None (= the recorded one).
    Raises :class:`FaceModelMismatch` when the configured one is another model.
    """
    if configured is not None:
        assets = _load_assets(configured)
        if assets.name != trained_name:
            raise FaceModelMismatch(
                f"the model was trained with face model {trained_name!r} but the configured "
                f"face model {configured.path!r} is {assets.name!r}; configure the same face "
                f"model or leave it unset to use the recorded one")
        if recorded_assets is not None and \
                face_model_fingerprint(assets) != face_model_fingerprint(recorded_assets):
            raise FaceModelMismatch(
                f"the configured face model {configured.path!r} ({assets.name}) differs from "
                f"the {recorded_assets.name!r} arrays recorded with the model (different "
                f"template, blendshapes or landmarks); leave it unset to use the recorded one")
        return assets
    if recorded_assets is not None:
        assets = recorded_assets
    else:
        try:
            assets = _load_assets(recorded)
        except FileNotFoundError as err:
            raise FaceModelMismatch(
                f"the model was trained with face model {recorded.path!r}, which is not on "
                f"this machine ({err}); configure its path (FLAME is licensed and never "
                f"travels in a checkpoint)") from None
    if assets.name != trained_name:
        raise FaceModelMismatch(f"the face model recorded with the model is {assets.name!r} "
                                f"but the checkpoint was trained with {trained_name!r}")
    return assets


@dataclass
class ModelInfo:
    """Where a loaded model came from (written into every params.json)."""

    checkpoint: str
    stage: str
    step: int
    face_model: str
    face_model_fingerprint: str
    backbone: str
    source: dict[str, Any] = field(default_factory=dict)  # e.g. registry name/version/run

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "stage": self.stage, "step": self.step,
                "face_model": self.face_model,
                "face_model_fingerprint": self.face_model_fingerprint,
                "backbone": self.backbone, **self.source}


class FaceReconstructor:
    """A trained DECA model ready for inference (eval mode, no gradients).

    ``crop_scale``: crop side / landmark-box size the model expects (the training config's
    ``data.eval_scale``); crops are ``image_size`` square RGB.
    """

    def __init__(self, model: DECA, crop_scale: float, info: ModelInfo) -> None:
        self.model = model.eval()
        self.crop_scale = float(crop_scale)
        self.info = info

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def expression_names(self) -> list[str]:
        return list(self.model.flame.expression_names)

    def to_tensor(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """crops (B, S, S, 3) uint8 or (B, 3, S, S) float in [0, 1] -> (B, 3, S, S) float."""
        if isinstance(crops, np.ndarray):
            arr = crops if crops.ndim == 4 else crops[None]
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
        else:
            x = crops.float()
        return x.to(self.device)

    @torch.no_grad()
    def encode(self, crops: np.ndarray | torch.Tensor) -> Codes:
        """Codes of crops: the encoders', then the test-time refinement
        (:func:`recon.inference.fitting.refine_codes`) when the model's ``model.refine.steps`` > 0."""
        images = self.to_tensor(crops)
        codes = self.model.encode(images, with_detail=True)
        refine = self.model.network_config.refine
        if refine.steps > 0:
            codes = refine_codes(self.model, codes, images, refine)
        return codes

    @torch.no_grad()
    def decode(self, codes: Codes, render: bool = True) -> Reconstruction:
        return self.model.decode(codes, with_detail=True, render=render)

    @torch.no_grad()
    def reconstruct(self, crops: np.ndarray | torch.Tensor, render: bool = True) -> Reconstruction:
        """crops: (B, S, S, 3) uint8 (or (B, 3, S, S) float) -> the full reconstruction."""
        return self.decode(self.encode(crops), render=render)

    @torch.no_grad()
    def neutral(self, shape: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The neutral mesh of identities (NoW): verts (B, V, 3), faces (F, 3), now7 (B, 7, 3),
        in the face model's units (metres)."""
        out = self.model.neutral(shape)
        return (out.vertices.cpu().numpy(), self.model.flame.faces.cpu().numpy(),
                out.now7.cpu().numpy())


def load_model(checkpoint: str | os.PathLike, *, face_model: FaceModelConfig | None = None,
               recorded_face_model: str | os.PathLike | None = None,
               config_json: str | None = None, device: str | torch.device = "cpu",
               source: dict[str, Any] | None = None,
               refine: RefineConfig | None = None) -> FaceReconstructor:
    """A trained model from a local checkpoint (``weights_only`` load).

    checkpoint: a ``coarse-*.pt`` / ``detail-*.pt`` file of the trainer; face_model: the
    configured face model (None = the recorded one); recorded_face_model: the face-model
    ``.npz`` shipped with a registered model; config_json: the resolved config recorded with
    the model (default: the checkpoint's); device: ``auto`` (the GPU when this process sees
    one), ``cpu``, ``cuda`` or ``cuda:N`` (:func:`recon.devices.pick_device`); source: registry
    details for ``params.json``; refine: the test-time refinement to run instead of the
    recorded ``model.refine`` (None = the recorded one; steps > 0 needs the keypoint head).
    """
    device = pick_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    assert_finite_state(ckpt["model"], f"model weights of {checkpoint}")
    tree = json.loads(config_json or ckpt["config"])
    recorded = FaceModelConfig.model_validate(tree.get("face_model", {}))
    model_tree = {**tree.get("model", {}), "backbone_weights": None}
    if refine is not None:
        model_tree["refine"] = refine.model_dump()
    network = NetworkConfig.model_validate(model_tree)
    recorded_assets = (FaceModelAssets.load_npz(recorded_face_model)
                       if recorded_face_model else None)
    assets = resolve_face_model(str(ckpt["face_model"]), recorded, recorded_assets, face_model)
    # Component counts are the trained model's; only the arrays may come from elsewhere.
    counts = recorded.model_copy(update={"path": (face_model or recorded).path})
    model = DECA(counts, network, assets=assets)
    model.load_state_dict(ckpt["model"])
    model.requires_grad_(False)
    crop_scale = float(tree.get("data", {}).get("eval_scale", DEFAULT_CROP_SCALE))
    info = ModelInfo(checkpoint=str(checkpoint), stage=str(ckpt["stage"]), step=int(ckpt["step"]),
                     face_model=assets.name, face_model_fingerprint=face_model_fingerprint(assets),
                     backbone=network.backbone, source=dict(source or {}))
    return FaceReconstructor(model.to(device), crop_scale, info)


# -- outputs ----------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255
            ).round().astype(np.uint8)


def encode_normals(normals: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) unit normals -> (B, S, S, 3) uint8 ``(n + 1) / 2``."""
    return to_uint8((normals + 1.0) / 2.0)


def displacement_png(uv_z: torch.Tensor, max_z: float) -> bytes:
    """(S, S) or (1, S, S) displacement -> 16-bit grey PNG bytes of ``0.5 + z / (2 max_z)``."""
    from PIL import Image

    z = uv_z.detach().float().cpu().numpy().reshape(uv_z.shape[-2:])
    q = np.clip(np.round((0.5 + z / (2.0 * max_z)) * 65535.0), 0, 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG")
    return buf.getvalue()


def read_displacement_png(path: str | os.PathLike, max_z: float) -> np.ndarray:
    """Inverse of :func:`displacement_png`: (S, S) float32 displacement."""
    from PIL import Image

    q = np.asarray(Image.open(path), dtype=np.float64)
    return ((q / 65535.0 - 0.5) * 2.0 * max_z).astype(np.float32)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def grid_mesh(position_map: torch.Tensor, covered: torch.Tensor, orientation: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dense mesh of a UV position map: one vertex per covered texel, two triangles per
    fully covered 2x2 block, wound as ``recon.render.uv.grid_normals`` orients them.

    position_map: (3, S, S); covered: (S, S) bool. Returns verts (N, 3), faces (M, 3) and uvs
    (N, 2) at the texel centres (row 0 = v = 1).
    """
    S = position_map.shape[-1]
    cov = covered.cpu().numpy().astype(bool)
    index = np.full((S, S), -1, np.int64)
    index[cov] = np.arange(int(cov.sum()))
    pts = position_map.detach().float().cpu().numpy().reshape(3, -1).T[cov.reshape(-1)]
    rows, cols = np.nonzero(cov)
    uvs = np.stack([(cols + 0.5) / S, 1.0 - (rows + 0.5) / S], 1)
    p00, p10 = index[:-1, :-1], index[1:, :-1]
    p01, p11 = index[:-1, 1:], index[1:, 1:]
    ok = (p00 >= 0) & (p10 >= 0) & (p01 >= 0) & (p11 >= 0)
    t1 = np.stack([p00[ok], p10[ok], p01[ok]], 1)
    t2 = np.stack([p01[ok], p10[ok], p11[ok]], 1)
    faces = np.concatenate([t1, t2])
    if orientation < 0:
        faces = faces[:, ::-1]
    return pts, np.ascontiguousarray(faces), uvs


def face_grid(rec: Reconstruction, index: int, crop: torch.Tensor,
              landmarks: torch.Tensor | None = None) -> np.ndarray:
    """The visual check of one face: a (S, 5 S, 3) uint8 row of :data:`GRID_PANELS`.

    crop: (3, S, S) input in [0, 1]; landmarks: (68, 2) given landmarks (image convention)."""
    i = index
    inp = crop[None].float().cpu()
    marked = inp
    if landmarks is not None:
        marked = draw_landmarks(marked, landmarks[None].cpu(), (0.0, 1.0, 0.0))
    marked = draw_landmarks(marked, rec.landmarks2d[i:i + 1].cpu(), (1.0, 0.0, 0.0))
    detail = rec.shape_detail_images if rec.shape_detail_images is not None else rec.shape_images
    textured = rec.images_detail if rec.images_detail is not None else rec.images
    alpha = rec.alpha[i:i + 1].cpu()
    over = textured[i:i + 1].cpu() * alpha + inp * (1 - alpha)
    panels = [inp, marked, rec.shape_images[i:i + 1].cpu(), detail[i:i + 1].cpu(), over]
    return np.concatenate([to_uint8(p)[0] for p in panels], axis=1)


def codes_dict(codes: Codes, index: int) -> dict[str, Any]:
    """The codes of sample ``index`` as JSON lists (light as 9 x 3)."""
    return {k: v[index].detach().cpu().tolist() for k, v in codes.as_dict().items()
            if v is not None}


def input_pixels(landmarks: torch.Tensor, size: int, architecture: str) -> torch.Tensor:
    """Landmarks (..., 2) in the crop's [-1, 1] image convention -> pixels (x right, y down)
    of a square input of side ``size`` that was resized whole to the model's crop.

    ``deca`` (imported DECA weights): DECA's own mapping ``(u + 1) size / 2`` (its
    ``tensor_vis_landmarks``, no half-pixel shift), so the points are the ones DECA reports;
    ``wildface``: pixel centres at integers, ``(u + 1) size / 2 - 0.5``, as the rasterizer
    and the crops (:func:`recon.render.image_to_pixel`).
    """
    if architecture == "deca":
        return (landmarks + 1.0) * (size / 2.0)
    return image_to_pixel(landmarks, size, size)


# The per-face outputs that the files are made of (the renders only derive from them).
_FACE_OUTPUTS = ("vertices", "landmarks2d", "now7", "uv_displacement", "uv_detail_vertices")


def check_face_finite(rec: Reconstruction, index: int) -> None:
    """Raise :class:`NonFiniteOutput` naming every code (``codes.shape``, ...) and output
    (``vertices``, ``landmarks2d``, ``now7``, ``uv_displacement``, ``uv_detail_vertices``) of
    face ``index`` of ``rec`` that holds ``inf`` or ``nan``; outputs not computed are skipped."""
    values = {f"codes.{k}": v for k, v in rec.codes.as_dict().items()}
    values.update({k: getattr(rec, k) for k in _FACE_OUTPUTS})
    bad = [k for k, v in values.items()
           if v is not None and not bool(torch.isfinite(v[index]).all())]
    if bad:
        raise NonFiniteOutput(f"non-finite values (inf or nan) in "
                              f"{', '.join(bad)}; nothing written")


def write_face(out_dir: str | os.PathLike, recon: FaceReconstructor, rec: Reconstruction,
               index: int, crop: torch.Tensor, landmarks: torch.Tensor | None = None,
               extra: dict[str, Any] | None = None, input_size: int | None = None) -> Path:
    """Write every output of face ``index`` of ``rec`` (see the module doc) to ``out_dir``.

    rec: a rendered reconstruction with detail; crop: (3, S, S) input in [0, 1];
    landmarks: (68, 2) given landmarks in the crop's image convention, for the grid;
    input_size: the side of an aligned input resized whole to the crop (None: a crop of a
    photo): then ``landmarks2d`` are that input's pixels and ``displacement.npy`` is written.
    Raises :class:`NonFiniteOutput` (and writes nothing, not even the folder) when the face's
    codes or outputs are not finite (:func:`check_face_finite`).
    """
    check_face_finite(rec, index)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = recon.model
    i = index
    flame = model.flame
    uvs, uv_faces = flame.uv_coords.cpu().numpy(), flame.uv_faces.cpu().numpy()
    albedo = to_uint8(rec.albedo[i:i + 1])[0]
    coarse_normals = model.renderer.world2uv(
        _vertex_normals(rec.vertices[i:i + 1], model.renderer.faces))
    write_obj(out / "coarse.obj", rec.vertices[i], flame.faces, uvs, uv_faces, texture=albedo,
              normal_map=encode_normals(coarse_normals)[0])
    covered = model.renderer.uv.covered[0, 0] > 0.5
    verts, faces, texel_uv = grid_mesh(rec.uv_detail_vertices[i], covered,
                                       model.renderer.uv.orientation)
    write_obj(out / "detail.obj", verts, faces, texel_uv, faces, texture=albedo,
              normal_map=encode_normals(rec.uv_detail_normals[i:i + 1])[0])
    max_z = float(model.network_config.max_z)
    atomic_write_bytes(out / "displacement.png", displacement_png(rec.uv_displacement[i], max_z))
    atomic_write_bytes(out / "grid.png", png_bytes(face_grid(rec, i, crop, landmarks)))
    files = ["coarse.obj", "detail.obj", "displacement.png", "grid.png"]
    lmk = rec.landmarks2d[i].detach().float().cpu()
    units = ("face model units (metres); landmarks2d in the crop's [-1, 1] image "
             "convention (x right, y down)")
    aligned: dict[str, Any] = {}
    if input_size is not None:
        architecture = model.network_config.architecture
        lmk = input_pixels(lmk, int(input_size), architecture)
        units = ("face model units (metres); landmarks2d in pixels of the input (x right, "
                 "y down)")
        aligned = {"aligned": True, "input_size": int(input_size),
                   "landmarks2d_pixels": "deca: (u + 1) size / 2" if architecture == "deca"
                   else "wildface: (u + 1) size / 2 - 0.5 (pixel centres at integers)"}
        atomic_write_bytes(out / "displacement.npy", npy_bytes(
            rec.uv_displacement[i, 0].detach().cpu().numpy().astype(np.float32)))
        files.append("displacement.npy")
    params = {
        "model": recon.info.as_dict(),
        "codes": codes_dict(rec.codes, i),
        "landmarks2d": lmk.tolist(),
        "now7": rec.now7[i].cpu().tolist(),
        "units": units,
        "max_z": max_z,
        "expression_names": recon.expression_names,
        "files": files,
        **aligned,
        **(extra or {}),
    }
    atomic_write_bytes(out / "params.json", json.dumps(params, indent=1).encode())
    return out


def _vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vertex_normals(verts, faces), dim=-1)


def codes_from_params(params: dict[str, Any], device: str | torch.device = "cpu") -> Codes:
    """The codes of a ``params.json`` (as written by :func:`write_face`), batch of 1."""
    c = params["codes"]

    def t(key: str) -> torch.Tensor | None:
        return None if key not in c else torch.tensor(c[key], dtype=torch.float32,
                                                      device=device)[None]

    return Codes(shape=t("shape"), tex=t("tex"), exp=t("exp"), pose=t("pose"), cam=t("cam"),
                 light=t("light"), detail=t("detail"))


__all__ = ["DEFAULT_CROP_SCALE", "FaceModelMismatch", "FaceReconstructor", "GRID_PANELS",
           "ModelInfo", "NonFiniteOutput", "check_face_finite", "codes_dict",
           "codes_from_params", "displacement_png", "encode_normals", "face_grid",
           "face_model_fingerprint", "grid_mesh", "input_pixels", "load_model", "png_bytes",
           "read_displacement_png", "resolve_face_model", "to_uint8", "write_face"]
