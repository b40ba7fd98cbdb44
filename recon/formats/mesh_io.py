"""Mesh files: OBJ (UVs, texture and normal map through an .mtl) and PLY, written atomically
(:mod:`recon.formats.files`) and read with their vertices checked finite."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from recon.formats.files import atomic_write_bytes


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"{path.name}: image must be uint8 (H,W,3), got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{path.name}: image must be (H,W,3), got {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _as_np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def write_obj(
    path: str | os.PathLike,
    verts,
    faces,
    uvs=None,
    uv_faces=None,
    texture: np.ndarray | None = None,
    normal_map: np.ndarray | None = None,
) -> Path:
    """Write a triangle mesh as OBJ.

    verts: (V, 3); faces: (F, 3) 0-based; uvs: (T, 2) in [0, 1] (v up); uv_faces: (F, 3).
    texture / normal_map: (H, W, 3) uint8 images, row 0 = top (v = 1); written next to the
    OBJ as ``<stem>.png`` / ``<stem>_normals.png`` with a ``<stem>.mtl`` (``map_Kd`` /
    ``map_Bump``). Textures need ``uvs`` and ``uv_faces``.
    """
    path = Path(path)
    v = _as_np(verts).astype(np.float64)
    f = _as_np(faces).astype(np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"verts must be (V,3) and faces (F,3), got {v.shape} and {f.shape}")
    has_uv = uvs is not None and uv_faces is not None
    if (texture is not None or normal_map is not None) and not has_uv:
        raise ValueError("a texture or normal map needs uvs and uv_faces")
    out = io.StringIO()
    out.write("# wildface mesh\n")
    stem = path.stem
    if texture is not None or normal_map is not None:
        mtl = [f"newmtl {stem}", "Ka 1 1 1", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1"]
        if texture is not None:
            _write_png(path.with_name(f"{stem}.png"), texture)
            mtl.append(f"map_Kd {stem}.png")
        if normal_map is not None:
            _write_png(path.with_name(f"{stem}_normals.png"), normal_map)
            mtl.append(f"map_Bump {stem}_normals.png")
        atomic_write_bytes(path.with_name(f"{stem}.mtl"), ("\n".join(mtl) + "\n").encode())
        out.write(f"mtllib {stem}.mtl\nusemtl {stem}\n")
    np.savetxt(out, v, fmt="v %.6f %.6f %.6f")
    if has_uv:
        uv = _as_np(uvs).astype(np.float64)
        ft = _as_np(uv_faces).astype(np.int64)
        if ft.shape != f.shape:
            raise ValueError(f"uv_faces {ft.shape} must match faces {f.shape}")
        np.savetxt(out, uv, fmt="vt %.6f %.6f")
        idx = np.stack([f + 1, ft + 1], axis=2).reshape(-1, 6)
        np.savetxt(out, idx, fmt="f %d/%d %d/%d %d/%d")
    else:
        np.savetxt(out, f + 1, fmt="f %d %d %d")
    atomic_write_bytes(path, out.getvalue().encode())
    return path


def write_ply(path: str | os.PathLike, verts, faces, colors: np.ndarray | None = None) -> Path:
    """Binary little-endian PLY. verts (V, 3), faces (F, 3), optional colors (V, 3) uint8."""
    path = Path(path)
    v = _as_np(verts).astype("<f4")
    f = _as_np(faces).astype("<i4")
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(v)}",
              "property float x", "property float y", "property float z"]
    if colors is not None:
        c = _as_np(colors)
        if c.dtype != np.uint8 or c.shape != (len(v), 3):
            raise ValueError("colors must be (V,3) uint8")
        header += ["property uchar red", "property uchar green", "property uchar blue"]
        vdt = np.dtype([("p", "<f4", 3), ("c", "u1", 3)])
        vrec = np.empty(len(v), vdt)
        vrec["p"], vrec["c"] = v, c
    else:
        vrec = v
    header += [f"element face {len(f)}", "property list uchar int vertex_indices", "end_header"]
    fdt = np.dtype([("n", "u1"), ("i", "<i4", 3)])
    frec = np.empty(len(f), fdt)
    frec["n"], frec["i"] = 3, f
    data = ("\n".join(header) + "\n").encode() + vrec.tobytes() + frec.tobytes()
    atomic_write_bytes(path, data)
    return path


def read_obj(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read an OBJ: ``(verts (V,3) float32, faces (F,3) int64, uvs (T,2) | None, uv_faces (F,3) | None)``.

    Polygons are fan-triangulated; negative (relative) indices, ``v/vt/vn`` and ``v//vn`` forms,
    comments, groups and materials are handled. ``uv_faces`` is None unless every face has UVs.
    """
    verts: list[list[float]] = []
    uvs: list[list[float]] = []
    faces: list[list[int]] = []
    uv_faces: list[list[int]] = []
    all_uv = True
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            tag = parts[0]
            try:
                if tag == "v":
                    verts.append([float(x) for x in parts[1:4]])
                elif tag == "vt":
                    uvs.append([float(x) for x in parts[1:3]])
                elif tag == "f":
                    vi, ti = [], []
                    for tok in parts[1:]:
                        fields = tok.split("/")
                        a = int(fields[0])
                        vi.append(a - 1 if a > 0 else len(verts) + a)
                        if len(fields) > 1 and fields[1]:
                            b = int(fields[1])
                            ti.append(b - 1 if b > 0 else len(uvs) + b)
                    if len(vi) < 3:
                        raise ValueError("face with fewer than 3 vertices")
                    has_t = len(ti) == len(vi)
                    all_uv &= has_t
                    for k in range(1, len(vi) - 1):
                        faces.append([vi[0], vi[k], vi[k + 1]])
                        if has_t:
                            uv_faces.append([ti[0], ti[k], ti[k + 1]])
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{lineno}: bad OBJ line {line.strip()!r} ({e})") from e
    V = _finite(path, np.asarray(verts, dtype=np.float32).reshape(-1, 3))
    Fa = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if Fa.size and (Fa.min() < 0 or Fa.max() >= len(V)):
        raise ValueError(f"{path}: face index out of range")
    if uvs and all_uv and faces:
        T = np.asarray(uvs, dtype=np.float32).reshape(-1, 2)
        FT = np.asarray(uv_faces, dtype=np.int64).reshape(-1, 3)
        if FT.min() < 0 or FT.max() >= len(T):
            raise ValueError(f"{path}: texcoord index out of range")
        return V, Fa, T, FT
    return V, Fa, None, None


def _finite(path: str | os.PathLike, verts: np.ndarray) -> np.ndarray:
    """``verts`` (V, 3), refused when a coordinate is NaN or infinite: such a mesh would
    render blank or score NaN without any error."""
    bad = ~np.isfinite(verts).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} of {len(verts)} vertices have NaN or infinite "
                         f"coordinates (first: vertex {int(np.argmax(bad)) + 1})")
    return verts


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a PLY written by :func:`write_ply` (binary little endian or ASCII, x/y/z first,
    triangle/polygon faces): ``(verts (V,3) float32, faces (F,3) int64)``. A malformed file
    raises ValueError naming it."""
    try:
        verts, faces = _parse_ply(path)
    except (ValueError, IndexError, KeyError, StopIteration) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(f"{path}:") else
                         f"{path}: malformed PLY ({type(e).__name__}: {msg})") from e
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError(f"{path}: face index out of range")
    return _finite(path, verts), faces


def _parse_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    data = Path(path).read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    body_start = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii", "replace").splitlines()
    fmt = next((ln.split()[1] for ln in header if ln.startswith("format")), "")
    elements: list[tuple[str, int, list[list[str]]]] = []
    for ln in header:
        p = ln.split()
        if p and p[0] == "element":
            elements.append((p[1], int(p[2]), []))
        elif p and p[0] == "property" and elements:
            elements[-1][2].append(p[1:])
    types = {"float": "f4", "float32": "f4", "double": "f8", "uchar": "u1", "uint8": "u1", "char": "i1",
             "int8": "i1", "short": "i2", "ushort": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4"}
    verts = np.zeros((0, 3), np.float32)
    faces: list[list[int]] = []
    if fmt == "ascii":
        lines = data[body_start:].decode().split("\n")
        pos = 0
        for name, count, props in elements:
            rows = [lines[pos + i].split() for i in range(count)]
            pos += count
            if name == "vertex":
                verts = np.array([[float(x) for x in r[:3]] for r in rows], np.float32).reshape(-1, 3)
            elif name == "face":
                for r in rows:
                    n = int(r[0])
                    idx = [int(x) for x in r[1 : 1 + n]]
                    faces += [[idx[0], idx[k], idx[k + 1]] for k in range(1, n - 1)]
    elif fmt == "binary_little_endian":
        pos = body_start
        for name, count, props in elements:
            if any(p[0] == "list" for p in props):
                (cnt_t, idx_t) = next((types[p[1]], types[p[2]]) for p in props if p[0] == "list")
                if len(props) != 1:
                    raise ValueError(f"{path}: only faces with a single list property are supported")
                for _ in range(count):
                    n = int(np.frombuffer(data, "<" + cnt_t, 1, pos)[0])
                    pos += np.dtype(cnt_t).itemsize
                    idx = np.frombuffer(data, "<" + idx_t, n, pos).astype(np.int64)
                    pos += n * np.dtype(idx_t).itemsize
                    faces += [[idx[0], idx[k], idx[k + 1]] for k in range(1, n - 1)]
            else:
                dt = np.dtype([(p[1], "<" + types[p[0]]) for p in props])
                rec = np.frombuffer(data, dt, count, pos)
                pos += count * dt.itemsize
                if name == "vertex":
                    verts = np.stack([rec["x"], rec["y"], rec["z"]], 1).astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported PLY format {fmt!r}")
    return verts, np.asarray(faces, np.int64).reshape(-1, 3)
