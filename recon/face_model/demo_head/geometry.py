"""Demo-head surface: a (row, column) grid over a head-shaped surface of revolution, sculpted
by smooth fields into a face, with slits for the eyes and the mouth, plus two eyeballs and a
closed mouth cavity behind the lips.

Frame as FLAME: metres, y up, face toward +z. Rows run from the crown (row 0) down to the
neck; columns run around the head (column ``NC // 2`` is the midline of the face, x grows
with the column index at the front). Everything here is deterministic numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NC = 72  # columns around the head
N_DOME = 15  # rows from the crown down to the brow band
FACE_Y = (0.052, -0.112)  # dense band of rows (forehead .. under the chin)
FACE_ROW_STEP = 0.0037
NECK_BOTTOM = -0.175

EYE_CENTER = (0.030, 0.031, 0.060)  # left eye (+x); right eye mirrored
EYEBALL_RADIUS = 0.0122
LID_RADIUS = 0.0140
EYE_HALF_WIDTH = 0.0128  # half the palpebral fissure
EYE_SLIT_Y = 0.0285  # where the lids meet when closed
LID_OPEN_UP = np.deg2rad(27.0)  # upper lid rotation of the (open) template
LID_OPEN_DOWN = np.deg2rad(7.0)
MOUTH_Y = -0.043
MOUTH_HALF_WIDTH = 0.0245
# Mouth cavity: a closed dark ellipsoid behind the lips, seen when the mouth opens.
MOUTH_BAG_CENTER = (0.0, MOUTH_Y - 0.004, 0.046)
MOUTH_BAG_RADII = (0.031, 0.016, 0.026)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def gauss2(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-(((x - cx) / sx) ** 2) - ((y - cy) / sy) ** 2)


@dataclass
class Surface:
    """The head grid and its bookkeeping (all arrays index the final vertex list)."""

    verts: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3)
    vt: np.ndarray  # (T, 2)
    ft: np.ndarray  # (F, 3)
    row: np.ndarray  # (V,) float grid row (-1 pole, eyeballs -2)
    col: np.ndarray  # (V,) float grid column
    side: np.ndarray  # (V,) +1 above / -1 below the slit the vertex borders (0 elsewhere)
    face_rc: np.ndarray  # (F, 3, 2) grid (row, col) of every face corner (NaN for pole/eyes)
    face_maxrow: np.ndarray  # (F,) largest corner row (to choose a slit side)
    row_y: np.ndarray  # (NR,) base height of every row
    grid_index: np.ndarray  # (NR, NC) vertex id of the original grid vertex
    head_count: int
    eye_slit_row: int
    mouth_row: int
    eye_slit_cols: dict[str, np.ndarray] = field(default_factory=dict)  # 'left'/'right' -> cols
    mouth_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dup_of: dict[int, int] = field(default_factory=dict)  # duplicate vertex -> original
    eyeballs: dict[str, np.ndarray] = field(default_factory=dict)  # 'left'/'right' -> vertex ids
    mouth_bag: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    eye_centers: dict[str, np.ndarray] = field(default_factory=dict)
    lid_open: np.ndarray | None = None  # (V, 3) displacement that opened the lids
    face_weight: np.ndarray | None = None  # (V,) frontness of the face


def row_heights() -> tuple[np.ndarray, np.ndarray]:
    """Per row: (y, dome scale s in (0, 1]); rows snapped to the eye slit and the mouth."""
    top, brow = 0.128, FACE_Y[0]
    alpha = np.linspace(0, np.pi / 2, N_DOME + 1)[1:]
    y_dome = brow + (top - brow) * np.cos(alpha)
    s_dome = np.sin(alpha)
    n_face = int(round((FACE_Y[0] - FACE_Y[1]) / FACE_ROW_STEP))
    y_face = np.linspace(FACE_Y[0], FACE_Y[1], n_face + 1)[1:]
    for target in (EYE_SLIT_Y, MOUTH_Y):
        k = int(np.argmin(np.abs(y_face - target)))
        y_face[k] = target
    y_neck = np.linspace(FACE_Y[1], NECK_BOTTOM, 6)[1:]
    y = np.concatenate([y_dome, y_face, y_neck])
    s = np.concatenate([s_dome, np.ones(len(y_face) + len(y_neck))])
    return y, s


def column_angles() -> np.ndarray:
    """Azimuth of every column (0 = front), denser at the face."""
    t = 2 * np.pi * np.arange(NC) / NC - np.pi
    return t - 0.64 * np.sin(t)


def _profile(y: np.ndarray) -> dict[str, np.ndarray]:
    """Cross-section of the head at height y: half width, front/back depth, centre z."""
    yb = np.clip(y, NECK_BOTTOM, FACE_Y[0])
    wx = np.interp(yb, [-0.175, -0.115, -0.095, -0.07, -0.045, -0.01, 0.02, 0.052],
                   [0.058, 0.056, 0.054, 0.058, 0.066, 0.074, 0.077, 0.077])
    front = np.interp(yb, [-0.175, -0.118, -0.104, -0.092, -0.075, -0.045, 0.0, 0.03, 0.052],
                      [0.035, 0.036, 0.052, 0.074, 0.084, 0.088, 0.090, 0.090, 0.089])
    back = np.interp(yb, [-0.175, -0.10, -0.06, -0.03, 0.0, 0.052], [0.072, 0.070, 0.086, 0.100, 0.108, 0.110])
    zc = np.interp(yb, [-0.175, -0.1, -0.06, 0.052], [-0.028, -0.026, -0.012, -0.006])
    return {"wx": wx, "front": front, "back": back, "zc": zc}


def _face_relief(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Forward (+z) relief of the face features, metres."""
    ax = np.abs(x)
    dz = np.zeros_like(x)
    # Brow ridge and forehead.
    dz += 0.0055 * gauss2(ax, y, 0.028, 0.045, 0.026, 0.009)
    dz += 0.002 * gauss2(ax, y, 0.0, 0.06, 0.04, 0.02)
    # Nose: ridge from the nasion to the tip, then the columella down to the lip.
    ridge = np.interp(y, [-0.024, -0.018, -0.010, -0.003, 0.004, 0.03, 0.042], [0.0, 0.006, 0.022, 0.026, 0.023, 0.002, 0.0])
    width = np.interp(y, [-0.024, -0.01, -0.003, 0.01, 0.035], [0.006, 0.0095, 0.0105, 0.0075, 0.0065])
    dz += ridge * np.exp(-((x / width) ** 2))
    dz += 0.010 * gauss2(ax, y, 0.013, -0.010, 0.0065, 0.006)  # alae
    dz -= 0.003 * gauss2(ax, y, 0.0, 0.030, 0.010, 0.006)  # nasion dip
    # Cheekbones and cheeks; nasolabial groove.
    dz += 0.006 * gauss2(ax, y, 0.047, 0.008, 0.016, 0.016)
    dz -= 0.0025 * gauss2(ax - (0.018 + 0.35 * (-0.01 - y)), y, 0.0, -0.03, 0.004, 0.018)
    # Lips (upper above, lower below the mouth line) and the philtrum.
    dz += 0.0055 * gauss2(x, y, 0.0, MOUTH_Y + 0.0055, 0.021, 0.0048)
    dz += 0.0060 * gauss2(x, y, 0.0, MOUTH_Y - 0.0068, 0.019, 0.0055)
    dz -= 0.0015 * gauss2(x, y, 0.0, MOUTH_Y, 0.024, 0.0012)
    dz += 0.0025 * gauss2(x, y, 0.0, -0.030, 0.010, 0.008)
    # Chin, and the groove above it.
    dz += 0.0055 * gauss2(x, y, 0.0, -0.078, 0.017, 0.011)
    dz -= 0.0025 * gauss2(x, y, 0.0, -0.062, 0.016, 0.0035)
    # Temples.
    dz -= 0.004 * gauss2(ax, y, 0.062, 0.045, 0.012, 0.018)
    return dz


def _eye_window(x: np.ndarray, y: np.ndarray, cx: float) -> np.ndarray:
    rho = np.sqrt(((x - cx) / 0.016) ** 2 + ((y - EYE_CENTER[1]) / 0.0115) ** 2)
    return 1.0 - smoothstep(0.75, 2.1, rho)


def _sphere_grid(center: np.ndarray, radius: float, n_rings: int, n_seg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """UV sphere with its poles on the z axis (front pole = +z).
    Returns verts (N,3), faces, polar angle per vertex, azimuth per vertex."""
    theta = np.linspace(0, np.pi, n_rings + 1)[1:-1]
    phi = 2 * np.pi * np.arange(n_seg) / n_seg
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 0, 1.0]], ring, [[0, 0, -1.0]]]) * radius + center
    polar = np.concatenate([[0.0], th.ravel(), [np.pi]])
    azim = np.concatenate([[0.0], ph.ravel(), [0.0]])
    n_r = len(theta)
    idx = lambda r, s: 1 + r * n_seg + (s % n_seg)  # noqa: E731
    faces = []
    back = len(verts) - 1
    for s in range(n_seg):
        faces.append([0, idx(0, s), idx(0, s + 1)])
        faces.append([back, idx(n_r - 1, s + 1), idx(n_r - 1, s)])
        for r in range(n_r - 1):
            faces.append([idx(r, s), idx(r + 1, s), idx(r + 1, s + 1)])
            faces.append([idx(r, s), idx(r + 1, s + 1), idx(r, s + 1)])
    faces = np.asarray(faces, np.int64)
    # Orient outward.
    tri = verts[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    if np.sum(n * (tri.mean(1) - center)) < 0:
        faces = faces[:, ::-1].copy()
    return verts, faces, polar, azim


def _rotate_about_x(p: np.ndarray, c: np.ndarray, ang: np.ndarray) -> np.ndarray:
    d = p - c
    ca, sa = np.cos(ang), np.sin(ang)
    y = d[:, 1] * ca - d[:, 2] * sa
    z = d[:, 1] * sa + d[:, 2] * ca
    return np.stack([d[:, 0], y, z], 1) + c


def build_surface() -> Surface:
    row_y, row_s = row_heights()
    NR = len(row_y)
    u = column_angles()
    prof = _profile(row_y)
    # Dome rows use the brow-band cross-section scaled by s.
    S, U = np.meshgrid(row_s, u, indexing="ij")
    Y = np.repeat(row_y[:, None], NC, 1)
    wx = prof["wx"][:, None]
    depth = np.where(np.cos(U) > 0, prof["front"][:, None], prof["back"][:, None])
    X = S * wx * np.sin(U)
    Z = prof["zc"][:, None] + S * depth * np.cos(U)
    front_w = smoothstep(0.15, 0.75, np.cos(U)) * smoothstep(0.2, 0.85, S)
    Z = Z + front_w * _face_relief(X, Y)
    grid = np.stack([X, Y, Z], -1)  # (NR, NC, 3)

    # Eye sockets: blend toward a lid ellipsoid around each eyeball.
    eye_centers = {"left": np.array(EYE_CENTER), "right": np.array([-EYE_CENTER[0], *EYE_CENTER[1:]])}
    for c in eye_centers.values():
        w = _eye_window(X, Y, c[0]) * front_w
        dx, dy = (X - c[0]) / 1.5, (Y - c[1]) / 1.3
        lid_z = c[2] + np.sqrt(np.maximum(LID_RADIUS**2 - dx**2 - dy**2, (0.3 * LID_RADIUS) ** 2))
        z = np.minimum(grid[..., 2], (1 - w) * grid[..., 2] + w * lid_z)  # sockets only sink
        # Keep the lids outside a sphere of LID_RADIUS around the eyeball centre.
        d2 = (X - c[0]) ** 2 + (Y - c[1]) ** 2
        floor = np.where((d2 < LID_RADIUS**2) & (np.cos(U) > 0.3), c[2] + np.sqrt(np.maximum(LID_RADIUS**2 - d2, 0.0)), -np.inf)
        grid[..., 2] = np.maximum(z, floor)

    # Vertex list: pole, grid, then slit duplicates, then eyeballs.
    pole = np.array([[0.0, 0.128, prof["zc"][0]]])
    grid_index = 1 + np.arange(NR * NC).reshape(NR, NC)
    verts = [pole, grid.reshape(-1, 3)]
    rows = [np.array([-1.0]), np.repeat(np.arange(NR, dtype=float), NC)]
    cols = [np.array([NC / 2]), np.tile(np.arange(NC, dtype=float), NR)]
    n = 1 + NR * NC

    eye_row = int(np.argmin(np.abs(row_y - EYE_SLIT_Y)))
    mouth_row = int(np.argmin(np.abs(row_y - MOUTH_Y)))
    xs_eye, xs_mouth = grid[eye_row, :, 0], grid[mouth_row, :, 0]
    front_cols = np.cos(u) > 0.3
    eye_cols = {k: np.where(front_cols & (np.abs(xs_eye - c[0]) < EYE_HALF_WIDTH))[0] for k, c in eye_centers.items()}
    mouth_cols = np.where(front_cols & (np.abs(xs_mouth) < MOUTH_HALF_WIDTH))[0]
    # Interior columns of a slit get a duplicate vertex for the lower side; the end columns
    # (eye / mouth corners) stay shared.
    dup: dict[tuple[int, int], int] = {}
    dup_of: dict[int, int] = {}
    for r, cset in [(eye_row, eye_cols["left"]), (eye_row, eye_cols["right"]), (mouth_row, mouth_cols)]:
        for j in cset[1:-1]:
            dup[(r, int(j))] = n
            dup_of[n] = int(grid_index[r, j])
            verts.append(grid[r, j][None])
            rows.append(np.array([float(r)]))
            cols.append(np.array([float(j)]))
            n += 1
    verts_arr = np.concatenate(verts)
    row_arr = np.concatenate(rows)
    col_arr = np.concatenate(cols)

    def vid(r: int, j: int, lower: bool) -> int:
        j %= NC
        if lower and (r, j) in dup:
            return dup[(r, j)]
        return int(grid_index[r, j])

    faces, face_rc = [], []
    for j in range(NC):
        faces.append([0, vid(0, j, False), vid(0, j + 1, False)])
        face_rc.append([[np.nan, np.nan], [0, j], [0, j + 1]])
    for r in range(NR - 1):
        for j in range(NC):
            a, b = vid(r, j, True), vid(r, j + 1, True)  # top corners use the lower copies
            c, d = vid(r + 1, j, False), vid(r + 1, j + 1, False)
            if j < NC // 2:
                tris = [([a, c, b], [(r, j), (r + 1, j), (r, j + 1)]), ([b, c, d], [(r, j + 1), (r + 1, j), (r + 1, j + 1)])]
            else:
                tris = [([a, c, d], [(r, j), (r + 1, j), (r + 1, j + 1)]), ([a, d, b], [(r, j), (r + 1, j + 1), (r, j + 1)])]
            for f, rc in tris:
                faces.append(f)
                face_rc.append(rc)
    faces_arr = np.asarray(faces, np.int64)
    face_rc_arr = np.asarray(face_rc, float)

    # Texture coordinates: the grid unrolled (face in the middle), with a seam column.
    NT = NR * (NC + 1)
    tv = 0.14 + 0.855 * (1 - (np.arange(NR) + 1) / NR)
    tu = np.arange(NC + 1) / NC
    TU, TV = np.meshgrid(tu, tv)
    vt = [np.stack([TU.ravel(), TV.ravel()], 1)]
    pole_vt = np.stack([(np.arange(NC) + 0.5) / NC, np.full(NC, 0.9975)], 1)
    vt.append(pole_vt)

    def tid(r: int, j: int) -> int:
        return r * (NC + 1) + j  # j may be NC (seam)

    ft = []
    for j in range(NC):
        ft.append([NT + j, tid(0, j), tid(0, j + 1)])
    for r in range(NR - 1):
        for j in range(NC):
            a, b, c, d = tid(r, j), tid(r, j + 1), tid(r + 1, j), tid(r + 1, j + 1)
            ft += [[a, c, b], [b, c, d]] if j < NC // 2 else [[a, c, d], [a, d, b]]
    ft_arr = np.asarray(ft, np.int64)
    n_vt = NT + NC

    side = np.zeros(len(verts_arr))
    for (r, j), dv in dup.items():
        side[grid_index[r, j]] = 1.0
        side[dv] = -1.0

    head_count = len(verts_arr)
    # Eyeballs.
    eyeballs, eye_vt_blocks = {}, []
    all_v, all_f, all_ft = [verts_arr], [faces_arr], [ft_arr]
    extra_rc = []
    for k, (name, c) in enumerate(eye_centers.items()):
        ev, ef, polar, azim = _sphere_grid(c, EYEBALL_RADIUS, 11, 16)
        base = sum(len(v) for v in all_v)
        eyeballs[name] = base + np.arange(len(ev))
        all_v.append(ev)
        all_f.append(ef + base)
        # UV: a small polar disc per eyeball in the strip under the head (front pole at the
        # disc centre), faces map corner-wise.
        cx, cy, rad = 0.07 + 0.14 * k, 0.07, 0.065
        evt = np.stack([cx + rad * (polar / np.pi) * np.cos(azim), cy + rad * (polar / np.pi) * np.sin(azim)], 1)
        tbase = n_vt + sum(len(b) for b in eye_vt_blocks)
        eye_vt_blocks.append(evt)
        all_ft.append(ef + tbase)
        extra_rc.append(np.full((len(ef), 3, 2), np.nan))
    bag_c, bag_r = np.array(MOUTH_BAG_CENTER), np.array(MOUTH_BAG_RADII)
    bv, bf, polar, azim = _sphere_grid(np.zeros(3), 1.0, 8, 14)
    base = sum(len(v) for v in all_v)
    mouth_bag = base + np.arange(len(bv))
    all_v.append(bv * bag_r + bag_c)
    all_f.append(bf + base)
    bvt = np.stack([0.35 + 0.065 * (polar / np.pi) * np.cos(azim), 0.07 + 0.065 * (polar / np.pi) * np.sin(azim)], 1)
    all_ft.append(bf + n_vt + sum(len(b) for b in eye_vt_blocks))
    eye_vt_blocks.append(bvt)
    extra_rc.append(np.full((len(bf), 3, 2), np.nan))
    verts_all = np.concatenate(all_v)
    faces_all = np.concatenate(all_f)
    ft_all = np.concatenate(all_ft)
    vt_all = np.concatenate(vt + eye_vt_blocks).astype(np.float32)
    V = len(verts_all)
    row_all = np.concatenate([row_arr, np.full(V - head_count, -2.0)])
    col_all = np.concatenate([col_arr, np.full(V - head_count, -2.0)])
    side_all = np.concatenate([side, np.zeros(V - head_count)])
    face_rc_all = np.concatenate([face_rc_arr] + extra_rc)
    # Largest corner row; a slit's lower band also counts its duplicated corners as lower.
    fmax = np.nanmax(np.where(np.isnan(face_rc_all[..., 0]), -9, face_rc_all[..., 0]), axis=1)

    surf = Surface(
        verts=verts_all, faces=faces_all, vt=vt_all, ft=ft_all, row=row_all, col=col_all, side=side_all,
        face_rc=face_rc_all, face_maxrow=fmax, row_y=row_y, grid_index=grid_index, head_count=head_count,
        eye_slit_row=eye_row, mouth_row=mouth_row, eye_slit_cols=eye_cols, mouth_cols=mouth_cols,
        dup_of=dup_of, eyeballs=eyeballs, eye_centers=eye_centers, mouth_bag=mouth_bag,
    )
    fw = np.zeros(V)
    fw[1 : 1 + NR * NC] = front_w.ravel()
    for dv, ov in dup_of.items():
        fw[dv] = fw[ov]
    surf.face_weight = fw
    _open_lids(surf)
    return surf


def eye_side_masks(surf: Surface) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per eye: (upper-lid weight, lower-lid weight) per vertex, for opening/closing the lids."""
    v = surf.verts
    out = {}
    slit_y = EYE_SLIT_Y
    for name, c in surf.eye_centers.items():
        head = np.zeros(len(v), bool)
        head[: surf.head_count] = True
        dx = (v[:, 0] - c[0]) / EYE_HALF_WIDTH
        across = np.clip(1 - dx**2, 0, 1) ** 0.7
        dy = v[:, 1] - slit_y
        lower = (surf.side < 0) | ((surf.row > surf.eye_slit_row) & (surf.side == 0))
        up_w = np.where(~lower & head, across * np.exp(-((np.maximum(dy, 0) / 0.0062) ** 2)), 0.0)
        lo_w = np.where(lower & head, across * np.exp(-((np.minimum(dy, 0) / 0.0045) ** 2)), 0.0)
        win = (np.abs(v[:, 0] - c[0]) < 0.025) & (np.abs(v[:, 1] - c[1]) < 0.025) & (v[:, 2] > 0.03)
        out[name] = (up_w * win, lo_w * win)
    return out


def lid_rotation(surf: Surface, verts: np.ndarray, up_angle: float, down_angle: float) -> np.ndarray:
    """Rotate the lids about each eye centre: upper lids by ``up_angle`` (up), lower lids by
    ``down_angle`` (down). Returns the new vertices."""
    out = verts.copy()
    for name, (up_w, lo_w) in eye_side_masks(surf).items():
        c = surf.eye_centers[name]
        for w, ang in ((up_w, -up_angle), (lo_w, down_angle)):
            m = w > 1e-6
            out[m] = _rotate_about_x(out[m], c, ang * w[m])
    return out


def _open_lids(surf: Surface) -> None:
    """The template has open eyes; the closed state is the un-rotated grid."""
    opened = lid_rotation(surf, surf.verts, LID_OPEN_UP, LID_OPEN_DOWN)
    surf.lid_open = opened - surf.verts
    surf.verts = opened
