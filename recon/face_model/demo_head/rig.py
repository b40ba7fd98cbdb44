"""Demo-head rig: joints (as a regressor), skinning weights, landmark embedding."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from recon.face_model.demo_head.geometry import MOUTH_BAG_CENTER, MOUTH_Y, NC, Surface, column_angles, smoothstep
from recon.face_model.lbs import contour_bin_angle_deg

# Rest joint locations: global, neck, jaw (hinge between the ears), eyes = eyeball centres.
GLOBAL_JOINT = (0.0, -0.035, -0.015)
NECK_JOINT = (0.0, -0.050, -0.025)
JAW_JOINT = (0.0, -0.004, -0.008)


def _laplacian(n: int, faces: np.ndarray) -> sp.csr_matrix:
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    A = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    A = ((A + A.T) > 0).astype(float)
    return (sp.diags(np.asarray(A.sum(1)).ravel()) - A).tocsr()


def harmonic(L: sp.csr_matrix, fixed: np.ndarray, values: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Solve L w = 0 on ``active`` free vertices with w fixed where ``fixed``."""
    n = L.shape[0]
    w = np.zeros(n)
    w[fixed] = values[fixed]
    free = active & ~fixed
    Lff = L[free][:, free]
    rhs = -L[free][:, fixed] @ w[fixed]
    w[free] = spla.spsolve(Lff.tocsc(), rhs)
    return np.clip(w, 0.0, 1.0)


def skinning_weights(surf: Surface) -> np.ndarray:
    """(V, 5) weights: harmonic jaw and neck fields on the head; eyeballs on their joints."""
    v = surf.verts
    V = len(v)
    head = np.zeros(V, bool)
    head[: surf.head_count] = True
    L = _laplacian(V, surf.faces)
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    # Jaw: 1 on the chin/lower lip, 0 above the nose base, behind the ears and on the neck.
    on_mouth_row = surf.row == surf.mouth_row
    lower_lip = np.isin(np.arange(V), list(surf.dup_of)) & on_mouth_row
    upper_lip = np.isin(np.arange(V), list(surf.dup_of.values())) & on_mouth_row
    one = head & (((y < MOUTH_Y - 0.006) & (y > -0.098) & (np.abs(x) < 0.03) & (z > 0.04)) | lower_lip)
    zero = head & ((y > -0.014) | (z < -0.03) | (y < -0.13) | upper_lip)
    zero &= ~one
    vals = one.astype(float)
    w_jaw = harmonic(L, one | zero, vals, head)
    # Neck: 1 on the head, 0 at the bottom of the neck.
    top = head & (y > -0.06)
    bottom = head & (y < -0.16)
    w_neck = harmonic(L, top | bottom, top.astype(float), head)
    W = np.zeros((V, 5))
    W[:, 2] = w_jaw
    W[:, 1] = (1 - w_jaw) * w_neck
    W[:, 0] = (1 - w_jaw) * (1 - w_neck)
    W[~head] = 0
    # Mouth cavity: its lower half follows the jaw.
    bag = surf.mouth_bag
    wj = smoothstep(MOUTH_BAG_CENTER[1] + 0.004, MOUTH_BAG_CENTER[1] - 0.006, y[bag])
    W[bag, 2] = wj
    W[bag, 1] = 1 - wj
    W[surf.eyeballs["left"], 3] = 1.0
    W[surf.eyeballs["right"], 4] = 1.0
    return W.astype(np.float32)


def joint_regressor(surf: Surface) -> np.ndarray:
    """(5, V) dense regressor: for every joint, weights over nearby surface vertices that sum
    to 1 and reproduce the joint exactly on the template (minimum-norm correction of a
    uniform average), so joints follow identity changes."""
    v = surf.verts.astype(np.float64)
    head_ids = np.arange(surf.head_count)
    targets = [np.array(GLOBAL_JOINT), np.array(NECK_JOINT), np.array(JAW_JOINT)]
    candidates = []
    for t in targets:
        d = np.linalg.norm(v[head_ids] - t, axis=1)
        candidates.append(head_ids[np.argsort(d)[:160]])
    for name in ("left", "right"):
        candidates.append(surf.eyeballs[name])
        targets.append(surf.eye_centers[name])
    R = np.zeros((5, len(v)))
    for j, (ids, t) in enumerate(zip(candidates, targets)):
        A = np.concatenate([v[ids].T, np.ones((1, len(ids)))])  # (4, n)
        b = np.concatenate([t, [1.0]])
        w0 = np.full(len(ids), 1.0 / len(ids))
        w = w0 + A.T @ np.linalg.solve(A @ A.T, b - A @ w0)
        R[j, ids] = w
    return R.astype(np.float32)


# ---------------------------------------------------------------- landmark embedding
def _row_of_y(surf: Surface, y: float) -> float:
    ry = surf.row_y
    return float(np.interp(-y, -ry, np.arange(len(ry))))


def _grid_xy(surf: Surface) -> np.ndarray:
    """(NR, NC, 3) template positions of the original grid vertices."""
    return surf.verts[surf.grid_index]


def _col_of_x(surf: Surface, r: float, x: float) -> float:
    """Fractional column at fractional row r where the front surface has abscissa x."""
    g = _grid_xy(surf)
    i0 = int(np.floor(r))
    i1 = min(i0 + 1, g.shape[0] - 1)
    f = r - i0
    xs = (1 - f) * g[i0, :, 0] + f * g[i1, :, 0]
    cols = np.where(np.cos(column_angles()) >= 0)[0]  # front half, x increasing
    return float(np.interp(x, xs[cols], cols))


def locate(surf: Surface, rc: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid points (N, 2) (row, col) -> (face ids (N,), barycentric coords (N, 3)).
    ``lower`` (N,) picks the face below a row line (the lower lip / lid of a slit)."""
    rc_f = surf.face_rc  # (F, 3, 2)
    valid = np.where(~np.isnan(rc_f[:, 0, 0]))[0]
    cell_of = {}
    for f in valid:  # every grid face lies in one cell (min row, min col)
        key = (int(rc_f[f, :, 0].min()), int(rc_f[f, :, 1].min()))
        cell_of.setdefault(key, []).append(f)
    out_f = np.zeros(len(rc), np.int64)
    out_b = np.zeros((len(rc), 3))
    for k, (p, low) in enumerate(zip(rc, lower)):
        i, j = int(np.floor(p[0])), int(np.floor(p[1]))
        cand = [f for di in (-1, 0) for dj in (-1, 0) for f in cell_of.get((i + di, j + dj), [])]
        best = None
        for f in cand:
            a, b, c = rc_f[f]
            v0, v1, d = b - a, c - a, p - a
            det = v0[0] * v1[1] - v0[1] * v1[0]
            l1 = (d[0] * v1[1] - d[1] * v1[0]) / det
            l2 = (v0[0] * d[1] - v0[1] * d[0]) / det
            bary = np.array([1 - l1 - l2, l1, l2])
            if bary.min() < -1e-9:
                continue
            key = surf.face_maxrow[f] * (1 if low else -1)
            if best is None or key > best[0]:
                best = (key, f, bary)
        if best is None:
            raise ValueError(f"landmark at grid {p} is outside the surface")
        out_f[k] = best[1]
        out_b[k] = np.clip(best[2], 0, 1) / np.clip(best[2], 0, 1).sum()
    return out_f, out_b


def _static_targets(surf: Surface) -> list[tuple[float, float, bool]]:
    """iBUG 17..67 as (row, col, lower-side) on the grid."""
    pts: list[tuple[float, float, bool]] = []

    def at(x: float, y: float, lower: bool = False) -> None:
        r = _row_of_y(surf, y)
        pts.append((r, _col_of_x(surf, r, x), lower))

    # Brows 17-21 (subject's right, outer -> inner), 22-26 mirrored.
    brow = [(0.052, 0.043), (0.042, 0.0485), (0.032, 0.050), (0.022, 0.0485), (0.013, 0.045)]
    for bx, by in brow:
        at(-bx, by)
    for bx, by in brow[::-1]:
        at(bx, by)
    # Nose bridge 27-30 and base 31-35.
    for ny in (0.029, 0.019, 0.009, -0.002):
        at(0.0, ny)
    for nx, ny in ((-0.013, -0.0135), (-0.0065, -0.0165), (0.0, -0.0185), (0.0065, -0.0165), (0.013, -0.0135)):
        at(nx, ny)
    # Eyes: corners are the slit ends, lids the slit's upper/lower rims.
    r_eye = float(surf.eye_slit_row)
    # Columns grow with x, so for both eyes iBUG's order is: the -x corner, two upper-lid
    # points toward +x, the +x corner, two lower-lid points back toward -x
    # (right eye 36-41: outer, upper, inner, lower; left eye 42-47: inner, upper, outer, lower).
    for name in ("right", "left"):
        cols = surf.eye_slit_cols[name]
        c0, c1 = float(cols[0]), float(cols[-1])
        third = (c1 - c0) / 3
        for c, low in ((c0, False), (c0 + third, False), (c0 + 2 * third, False), (c1, False),
                       (c0 + 2 * third, True), (c0 + third, True)):
            pts.append((r_eye, c, low))
    # Outer lips 48-59.
    mcols = surf.mouth_cols
    m0, m1 = float(mcols[0]), float(mcols[-1])
    r_m = float(surf.mouth_row)
    pts.append((r_m, m0, False))  # 48
    for lx, ly in ((-0.0155, MOUTH_Y + 0.0078), (-0.0065, MOUTH_Y + 0.0098), (0.0, MOUTH_Y + 0.0093),
                   (0.0065, MOUTH_Y + 0.0098), (0.0155, MOUTH_Y + 0.0078)):
        at(lx, ly)
    pts.append((r_m, m1, False))  # 54
    for lx, ly in ((0.0155, MOUTH_Y - 0.0085), (0.0065, MOUTH_Y - 0.0118), (0.0, MOUTH_Y - 0.0122),
                   (-0.0065, MOUTH_Y - 0.0118), (-0.0155, MOUTH_Y - 0.0085)):
        at(lx, ly)
    # Inner lips 60-67: corners slightly inside the slit ends, rims on the slit.
    cmid = (m0 + m1) / 2
    span = (m1 - m0) / 2
    pts.append((r_m, m0 + 0.08 * span, False))  # 60
    for f in (-0.4, 0.0, 0.4):  # 61 62 63 upper rim
        pts.append((r_m, cmid + f * span, False))
    pts.append((r_m, m1 - 0.08 * span, False))  # 64
    for f in (0.4, 0.0, -0.4):  # 65 66 67 lower rim
        pts.append((r_m, cmid + f * span, True))
    assert len(pts) == 51
    return pts


def _contour_nominal(surf: Surface) -> list[tuple[float, float]]:
    """Jaw contour 0..16 (frontal outline) as (row, col)."""
    out = []
    g = _grid_xy(surf)
    for k in range(17):
        th = (k / 16) * np.pi  # 0 -> subject's right, pi/2 -> chin, pi -> left
        cx = -np.cos(th)
        sy = np.sin(th)
        x = 0.071 * np.sign(cx) * np.abs(cx) ** 0.75
        y = 0.014 - (0.014 + 0.0905) * sy**1.6
        r = _row_of_y(surf, y)
        i0 = int(np.floor(r))
        half_w = g[i0, :, 0].max()
        x = float(np.clip(x, -0.985 * half_w, 0.985 * half_w))
        out.append((r, _col_of_x(surf, r, x)))
    return out


def landmark_embedding(surf: Surface) -> dict[str, np.ndarray]:
    static = _static_targets(surf)
    s_rc = np.array([(r, c) for r, c, _ in static])
    s_low = np.array([low for _, _, low in static])
    s_f, s_b = locate(surf, s_rc, s_low)
    contour = _contour_nominal(surf)
    c_f, c_b = locate(surf, np.array(contour), np.zeros(17, bool))
    # Dynamic contour: for every yaw bin, slide each contour point along its row toward the
    # face midline to the silhouette of the rotated head (points on the side turning away);
    # points on the side turning toward the camera stay on the jaw line.
    mid = NC / 2
    n_samp = 48
    dyn_f = np.zeros((79, 17), np.int64)
    dyn_b = np.zeros((79, 17, 3))
    cand_rc, owner = [], []
    for k, (r, c) in enumerate(contour):
        for t in np.linspace(0, 1, n_samp):
            cand_rc.append((r, mid + t * (c - mid)))
            owner.append(k)
    cand_rc = np.array(cand_rc)
    cf, cb = locate(surf, cand_rc, np.zeros(len(cand_rc), bool))
    pos = np.einsum("nk,nkd->nd", cb, surf.verts[surf.faces[cf]])
    owner = np.array(owner)
    for b in range(79):
        yaw = np.deg2rad(contour_bin_angle_deg(b))
        xr = pos[:, 0] * np.cos(yaw) + pos[:, 2] * np.sin(yaw)
        for k in range(17):
            sel = np.where(owner == k)[0]
            if k == 8:
                best = sel[-1]
            else:
                sgn = -1.0 if k < 8 else 1.0
                best = sel[np.argmax(sgn * xr[sel] + 1e-7 * np.arange(len(sel)))]
            dyn_f[b, k], dyn_b[b, k] = cf[best], cb[best]
    full_f = np.concatenate([c_f, s_f])
    full_b = np.concatenate([c_b, s_b])
    return {
        "static_lmk_faces_idx": s_f,
        "static_lmk_bary_coords": s_b.astype(np.float32),
        "dynamic_lmk_faces_idx": dyn_f,
        "dynamic_lmk_bary_coords": dyn_b.astype(np.float32),
        "full_lmk_faces_idx": full_f,
        "full_lmk_bary_coords": full_b.astype(np.float32),
    }

