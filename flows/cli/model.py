"""``wildface model ...``: inspect, convert and export the FLAME-format face model; import
DECA's released network weights."""
from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="The 3D face model (FLAME files or the built-in 'demo-head').", no_args_is_help=True)

MODEL_HELP = "'demo-head' (built in, not FLAME), a FLAME .pkl or a converted .npz"


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _load(model: str, landmarks: str | None = None):
    from recon.config import FaceModelConfig
    from recon.face_model.face_assets import FaceModelFormatError
    from recon.face_model.flame_io import load_face_model
    from recon.formats.safe_pickle import UnsafePickleError

    try:
        return load_face_model(FaceModelConfig(path=model, landmarks=landmarks))
    except (UnsafePickleError, FaceModelFormatError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def info(
    model: str = typer.Option("demo-head", "--model", help=MODEL_HELP),
    landmarks: str | None = typer.Option(None, "--landmarks", help="landmark embedding for a FLAME .pkl"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Vertex/face counts, component counts, joints and landmark counts of a face model."""
    summary = _load(model, landmarks).summary()
    summary["source"] = model
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for k, v in summary.items():
        typer.echo(f"{k}: {v}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="FLAME model pickle (generic_model.pkl, FLAME 2023 .pkl)"),
    dst: Path = typer.Argument(..., help="output .npz (the cached format)"),
    landmarks: Path | None = typer.Option(None, "--landmarks", help="DECA landmark_embedding.npy"),
    masks: Path | None = typer.Option(None, "--masks", help="FLAME_masks.pkl"),
    texture: Path | None = typer.Option(None, "--texture", help="FLAME_texture.npz (mean, tex_dir, vt, ft)"),
    deca_data: Path | None = typer.Option(
        None, "--deca-data", help="DECA's data/ folder: its landmark embedding, "
        "head_template.obj UVs, albedo space, UV masks, fixed displacement, mean texture and "
        "dense template are read and stored with the model (missing ones are noted)"),
) -> None:
    """Convert FLAME files to the cached .npz, safely (refused pickles write nothing)."""
    from recon.face_model.face_assets import FaceModelFormatError
    from recon.face_model.deca_data import load_flame_with_deca_data
    from recon.face_model.flame_io import convert as do_convert
    from recon.formats.safe_pickle import UnsafePickleError

    if dst.suffix != ".npz":
        _fail(f"{dst}: the output must end in .npz")
    try:
        if deca_data is None:
            out = do_convert(src, dst, landmarks=landmarks, masks=masks, texture=texture)
        else:
            out = load_flame_with_deca_data(src, deca_data, landmarks=landmarks, masks=masks,
                                            texture=texture).save_npz(dst)
    except UnsafePickleError as e:
        _fail(f"refused {e}")  # the message names the file
    except (FaceModelFormatError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    typer.echo(str(out))


@app.command()
def export(
    params: Path = typer.Option(..., "--params", help="JSON with shape, expression, pose (6), neck_pose, eye_pose"),
    out: Path = typer.Option(..., "--out", help="output mesh (.obj or .ply)"),
    model: str = typer.Option("demo-head", "--model", help=MODEL_HELP),
    landmarks: str | None = typer.Option(None, "--landmarks", help="landmark embedding for a FLAME .pkl"),
) -> None:
    """Pose the model with PARAMS.json; write the mesh and <stem>.landmarks.json."""
    import torch

    from recon.face_model.flame import FLAME
    from recon.formats.files import atomic_write_bytes
    from recon.formats.mesh_io import write_obj, write_ply

    try:
        p = json.loads(params.read_text())
    except (OSError, json.JSONDecodeError) as e:
        _fail(f"{params}: {e}")
    if not isinstance(p, dict):
        _fail(f"{params}: expected a JSON object")
    unknown = set(p) - {"shape", "expression", "pose", "neck_pose", "eye_pose"}
    if unknown:
        _fail(f"{params}: unknown keys {sorted(unknown)}")
    assets = _load(model, landmarks)
    n_shape = max(len(p.get("shape", [])), 1)
    n_exp = max(len(p.get("expression", [])), 1)
    if n_shape > assets.n_shape_total or n_exp > assets.n_exp_total:
        _fail(f"the model has {assets.n_shape_total} shape and {assets.n_exp_total} expression components")
    flame = FLAME(assets, n_shape=n_shape, n_exp=n_exp)

    def vec(key: str, n: int) -> torch.Tensor:
        vals = p.get(key) or []
        if len(vals) > n or not all(isinstance(x, (int, float)) for x in vals):
            _fail(f"'{key}' must be a list of at most {n} numbers")
        t = torch.zeros(1, n)
        t[0, : len(vals)] = torch.tensor([float(x) for x in vals])
        return t

    with torch.no_grad():
        res = flame(vec("shape", n_shape), vec("expression", n_exp), vec("pose", 6),
                    neck_pose=vec("neck_pose", 3), eye_pose=vec("eye_pose", 6))
    verts = res.vertices[0].numpy()
    if out.suffix == ".ply":
        write_ply(out, verts, assets.faces)
    else:
        write_obj(out, verts, assets.faces, uvs=assets.vt, uv_faces=assets.ft)
    lmk = {
        "model": assets.name,
        "units": "metres",
        "landmarks3d": res.landmarks3d[0].tolist(),
        "landmarks2d": res.landmarks2d[0].tolist(),
        "now7": res.now7[0].tolist(),
    }
    lmk_path = out.with_name(out.stem + ".landmarks.json")
    atomic_write_bytes(lmk_path, json.dumps(lmk, indent=1).encode())
    typer.echo(str(out))


@app.command("import-deca")
def import_deca(
    checkpoint: Path = typer.Argument(..., help="DECA's released deca_model.tar (or a "
                                      "checkpoint of DECA's trainer)"),
    face_model: str = typer.Option(..., "--face-model", help="the FLAME model DECA's weights "
                                   "go with: a converted .npz (`wildface model convert`) or a "
                                   "FLAME .pkl with --landmarks"),
    landmarks: str | None = typer.Option(None, "--landmarks", help="landmark embedding for a "
                                         "FLAME .pkl"),
    out: Path = typer.Option(..., "--out", help="the wildface checkpoint to write (.pt)"),
) -> None:
    """Turn DECA's released weights into a wildface model (architecture deca) that
    reconstruct, animate, evaluate predict and `train --init-from` accept. Reads the file
    weights-only: one that needs arbitrary unpickling is refused and nothing is written."""
    from flows.config import load_config
    from recon.config import DEMO_HEAD, FaceModelConfig
    from recon.face_model.deca_import import (DECA_FACE_COUNTS, DecaCheckpointError, import_deca,
                                   imported_from)
    from recon.face_model.face_assets import FaceModelFormatError
    from recon.formats.safe_pickle import UnsafePickleError
    from recon.training.checkpoint import CheckpointError, save_checkpoint

    if out.suffix != ".pt":
        _fail(f"{out}: the output must end in .pt")

    def absolute(path: str | None) -> str | None:
        # the checkpoint records the face model; it must still resolve from another folder
        return path if path in (None, DEMO_HEAD) else str(Path(path).resolve())

    fm = FaceModelConfig(path=absolute(face_model), landmarks=absolute(landmarks),
                         **DECA_FACE_COUNTS)
    try:
        model = import_deca(checkpoint, fm)
        cfg = load_config(None, {"face_model": fm.model_dump(),
                                 "model": model.network_config.model_dump()})
        save_checkpoint(out, stage="detail", step=0, model=model.state_dict(), optimizer={},
                        config_json=cfg.model_dump_json(), face_model=model.face_model_name,
                        extra={"imported_from": imported_from(checkpoint)})
    except (DecaCheckpointError, CheckpointError, UnsafePickleError, FaceModelFormatError,
            FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(str(out))
