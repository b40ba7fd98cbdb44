"""Demo-head identity and expression blendshapes (metres per standard deviation).

Identity: named smooth variations (head size, face width, ...) and seeded random
low-frequency fields, sorted by variance like a PCA basis. Expression: named facial actions (smile,
mouth_open, ...), then seeded random low-frequency fields confined to the face. Around the
eyes every field except the lid action moves rigidly with the eyeball, so lids never cut
into the eyes. Expressions: the named actions first (``EXPRESSION_NAMES``), then extras by
decreasing variance.
"""
from __future__ import annotations

import numpy as np

from recon.face_model.demo_head.geometry import MOUTH_HALF_WIDTH, MOUTH_Y, Surface, gauss2, smoothstep

N_SHAPE = 300
N_EXP = 100
SEED = 20211  # fixed: the demo head is the same on every machine


def _eye_rigid_weight(surf: Surface) -> dict[str, np.ndarray]:
    """Per eye: (V,) weight that is 1 on the eyeball and lids, fading out around them."""
    v = surf.verts
    out = {}
    for name, c in surf.eye_centers.items():
        d = np.sqrt(((v[:, 0] - c[0]) / 0.017) ** 2 + ((v[:, 1] - c[1]) / 0.013) ** 2)
        w = (1 - smoothstep(1.0, 1.6, d)) * (v[:, 2] > 0.03) * (np.sign(v[:, 0]) == np.sign(c[0]))
        w[surf.eyeballs[name]] = 1.0
        out[name] = w
    return out


def _rigidify_eyes(surf: Surface, fields: np.ndarray, at_centres: dict[str, np.ndarray]) -> np.ndarray:
    """Make ``fields`` (V, 3, N) a pure translation at each eye (eyeball and lids), the
    translation being ``at_centres[eye]`` (3, N), blended smoothly into the surroundings."""
    out = fields.copy()
    for name, w in _eye_rigid_weight(surf).items():
        ww = w[:, None, None]
        out = (1 - ww) * out + ww * at_centres[name][None]
    return out


def _random_fields(rng: np.random.Generator, p: np.ndarray, n: int, wavelengths: tuple[float, float],
                   mirror_frac: float) -> np.ndarray:
    """n smooth vector fields evaluated at p (N, 3) -> (N, 3, n), max |value| ~1 per field.
    Each is a sum of 6 random plane waves; a share of them is made mirror-symmetric in x."""
    m = 6
    k = rng.normal(size=(n, m, 3))
    k /= np.linalg.norm(k, axis=2, keepdims=True)
    k *= (2 * np.pi / rng.uniform(*wavelengths, size=(n, m)))[..., None]
    phase = rng.uniform(0, 2 * np.pi, size=(n, m))
    amp = rng.normal(size=(n, m, 3)) / np.sqrt(m)
    sym = rng.random(n) < mirror_frac
    flip = np.array([-1.0, 1.0, 1.0])

    def evaluate(q: np.ndarray) -> np.ndarray:
        s = np.sin((q @ k.reshape(-1, 3).T).reshape(len(q), n, m) + phase)  # (P, n, m)
        return np.matmul(s.transpose(1, 0, 2), amp).transpose(1, 2, 0)  # (P, 3, n)

    val = evaluate(p)
    mirrored = evaluate(p * flip) * flip[None, :, None]
    val = np.where(sym[None, None], (val + mirrored) / np.sqrt(2), val)
    return val


def identity_basis(surf: Surface) -> np.ndarray:
    """(V, 3, N_SHAPE) identity blendshapes."""
    v = surf.verts
    centre = np.array([0.0, 0.0, -0.005])
    named = [
        # (sigma in metres at the largest point, field fn(p) -> (N,3) with max norm ~1)
        (0.0045, lambda p: (p - centre) / 0.13),  # head size
        (0.0040, lambda p: np.stack([p[:, 0] / 0.078, 0 * p[:, 0], 0 * p[:, 0]], 1)),  # head / face width
        (0.0035, lambda p: np.stack([0 * p[:, 0], 0 * p[:, 0], np.minimum(p[:, 2] + 0.005, 0) / 0.1], 1)),  # head length
        (0.0032, lambda p: np.stack([0 * p[:, 0], -smoothstep(0.02, -0.09, p[:, 1]), 0 * p[:, 0]], 1)),  # lower face height
        (0.0030, lambda p: np.stack([p[:, 0] / 0.07 * smoothstep(-0.01, -0.07, p[:, 1]) * smoothstep(-0.13, -0.09, p[:, 1]),
                                     0 * p[:, 0], 0 * p[:, 0]], 1)),  # jaw width
        (0.0028, lambda p: _nose(p)[:, None] * np.array([0, -0.35, 1.0])),  # nose length / protrusion
        (0.0022, lambda p: _nose(p)[:, None] * np.stack([np.sign(p[:, 0]) * np.minimum(np.abs(p[:, 0]) / 0.012, 1), 0 * p[:, 0], 0 * p[:, 0]], 1)),  # nose width
        (0.0022, lambda p: np.stack([0 * p[:, 0], gauss2(np.abs(p[:, 0]), p[:, 1], 0.03, 0.047, 0.03, 0.012), 0 * p[:, 0]], 1)),  # brow height
        (0.0025, lambda p: _radial_xz(p) * gauss2(np.abs(p[:, 0]), p[:, 1], 0.05, -0.025, 0.02, 0.025)[:, None]),  # cheek fullness
        (0.0025, lambda p: np.stack([0 * p[:, 0], 0 * p[:, 0], gauss2(p[:, 0], p[:, 1], 0.0, -0.078, 0.022, 0.015)], 1)),  # chin protrusion
        (0.0020, lambda p: np.stack([0 * p[:, 0], 0 * p[:, 0], np.clip((p[:, 1] - 0.04) / 0.06, 0, 1)], 1)),  # forehead slope
        (0.0015, lambda p: np.stack([np.sign(p[:, 0]) * gauss2(np.abs(p[:, 0]), p[:, 1], 0.03, 0.03, 0.02, 0.02), 0 * p[:, 0], 0 * p[:, 0]], 1)),  # eye spacing
        (0.0015, lambda p: np.stack([0 * p[:, 0], 0 * p[:, 0], gauss2(p[:, 0], p[:, 1], 0.0, MOUTH_Y, 0.02, 0.01)], 1)),  # lip fullness
        (0.0020, lambda p: np.stack([0 * p[:, 0], 0 * p[:, 0], np.maximum(p[:, 2], 0) / 0.1], 1)),  # face depth
        (0.0018, lambda p: _radial_xz(p) * smoothstep(-0.09, -0.12, p[:, 1])[:, None]),  # neck thickness
    ]
    V = len(v)
    P = np.concatenate([v, surf.eye_centers["left"][None], surf.eye_centers["right"][None]])
    rng = np.random.default_rng(SEED)
    n_rand = N_SHAPE - len(named)
    fields = np.concatenate(
        [np.stack([fn(P) for _, fn in named], -1), _random_fields(rng, P, n_rand, (0.06, 0.30), mirror_frac=0.6)], -1
    )
    fields = _rigidify_eyes(surf, fields[:V], {"left": fields[V], "right": fields[V + 1]})
    sigmas = np.concatenate([[s for s, _ in named], 0.0016 * (1 + np.arange(n_rand)) ** -0.75])
    fields *= sigmas / np.maximum(np.abs(fields).max(axis=(0, 1)), 1e-12)
    # Like a PCA basis: ordered by variance (mean squared displacement over the vertices).
    order = np.argsort(-(fields**2).mean(axis=(0, 1)), kind="stable")
    return fields[:, :, order].astype(np.float32)


def _nose(p: np.ndarray) -> np.ndarray:
    return gauss2(p[:, 0], p[:, 1], 0.0, 0.0, 0.014, 0.02) * smoothstep(0.06, 0.085, p[:, 2])


def _radial_xz(p: np.ndarray) -> np.ndarray:
    d = p[:, [0, 2]] - np.array([0.0, -0.01])
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    return np.stack([d[:, 0], 0 * d[:, 0], d[:, 1]], 1)


EXPRESSION_NAMES = [
    "smile", "mouth_open", "brows_up", "eyes_closed", "frown", "pucker", "cheek_puff",
    "lip_corners_down", "smirk_left", "smirk_right", "sneer", "squint", "mouth_wide",
    "lips_pressed", "brows_inner_up",
]


def expression_basis(surf: Surface) -> tuple[np.ndarray, list[str]]:
    """(V, 3, N_EXP) expression blendshapes and the names of the first ones.

    Unit coefficient = one standard deviation: ``eyes_closed`` closes the lids fully at 2.0,
    ``mouth_open`` parts the lips by ~1 cm per unit.
    """
    v = surf.verts
    V = len(v)
    x, y = v[:, 0], v[:, 1]
    ax = np.abs(x)
    zero = np.zeros(V)
    head = np.zeros(V, bool)
    head[: surf.head_count] = True
    front = surf.face_weight * head
    # Mouth slit bookkeeping: +1 above the lip line, -1 below; opening profile across the mouth.
    below = (y < MOUTH_Y - 1e-6) | ((surf.side < 0) & (surf.row == surf.mouth_row))
    mside = np.where(below, -1.0, 1.0)
    across = np.clip(1 - (x / MOUTH_HALF_WIDTH) ** 2, 0, 1) ** 0.6
    lip_band = np.exp(-(((y - MOUTH_Y) / 0.011) ** 2))
    corner = {s: gauss2(x, y, s * MOUTH_HALF_WIDTH, MOUTH_Y, 0.011, 0.011) for s in (-1, 1)}
    mouth = gauss2(x, y, 0.0, MOUTH_Y, 0.03, 0.018)
    cheeks = gauss2(ax, y, 0.045, -0.01, 0.018, 0.02)
    brows = gauss2(ax, y, 0.03, 0.048, 0.03, 0.012)
    inner_brows = gauss2(ax, y, 0.014, 0.046, 0.012, 0.01)
    lower_face = smoothstep(MOUTH_Y + 0.01, MOUTH_Y - 0.01, y) * smoothstep(-0.125, -0.095, y)

    def vec(dx, dy, dz):
        return np.stack([dx + zero, dy + zero, dz + zero], 1)

    fields: dict[str, tuple[float, np.ndarray]] = {}
    sx = np.sign(x)
    smile = sum(corner[s][:, None] * vec(s * 0.0045, 0.0055, -0.0025) for s in (-1, 1))
    smile = smile + cheeks[:, None] * vec(0.0, 0.0025, 0.0015)
    fields["smile"] = (1.0, smile)
    # Mouth open: the lower lip / chin region moves down; a jump across the lip slit parts the lips.
    lower_move = vec(0.0, -0.005, -0.001) * (lower_face * front * smoothstep(0.06, 0.0, ax))[:, None]
    part = (mside * across * lip_band)[:, None] * vec(0.0, 0.005, 0.0)
    fields["mouth_open"] = (1.0, lower_move + part)
    fields["brows_up"] = (1.0, brows[:, None] * vec(0.0, 0.005, 0.0005) + gauss2(x, y, 0, 0.07, 0.05, 0.02)[:, None] * vec(0, 0.002, 0))
    fields["eyes_closed"] = (1.0, -surf.lid_open / 2.0)  # the closed lids are the un-opened grid
    fields["frown"] = (1.0, brows[:, None] * vec(0, -0.003, 0.001) + inner_brows[:, None] * np.stack([-sx * 0.0025, zero - 0.001, zero + 0.001], 1))
    fields["pucker"] = (1.0, mouth[:, None] * np.stack([-x * 0.25, zero, zero + 0.006], 1))
    fields["cheek_puff"] = (1.0, _radial_xz(v) * (gauss2(ax, y, 0.04, -0.04, 0.02, 0.02) * 0.006)[:, None])
    fields["lip_corners_down"] = (1.0, sum(corner[s][:, None] * vec(s * 0.001, -0.004, -0.001) for s in (-1, 1)))
    fields["smirk_left"] = (1.0, corner[1][:, None] * vec(0.004, 0.005, -0.002))
    fields["smirk_right"] = (1.0, corner[-1][:, None] * vec(-0.004, 0.005, -0.002))
    fields["sneer"] = (1.0, gauss2(ax, y, 0.012, -0.015, 0.012, 0.012)[:, None] * vec(0, 0.004, 0.001))
    squint = np.zeros((V, 3))
    for name, c in surf.eye_centers.items():
        squint += gauss2(x, y, c[0], c[1] - 0.012, 0.016, 0.008)[:, None] * vec(0, 0.002, 0.0005)
    fields["squint"] = (1.0, squint)
    fields["mouth_wide"] = (1.0, sum(corner[s][:, None] * vec(s * 0.006, 0.0, -0.002) for s in (-1, 1)))
    fields["lips_pressed"] = (1.0, (mouth * lip_band)[:, None] * vec(0, 0, -0.003) - part * 0.3)
    fields["brows_inner_up"] = (1.0, inner_brows[:, None] * vec(0, 0.004, 0.0))
    assert list(fields) == EXPRESSION_NAMES
    rng = np.random.default_rng(SEED + 1)
    n_rand = N_EXP - len(fields)
    face_region = front * smoothstep(0.09, 0.06, y) * smoothstep(-0.12, -0.09, y)
    still = {name: np.zeros((3, 1)) for name in surf.eye_centers}
    named = np.stack([f * front[:, None] for _, f in fields.values()], -1)  # face only
    lids = named[:, :, EXPRESSION_NAMES.index("eyes_closed")].copy()
    named = _rigidify_eyes(surf, named, still)  # the eyes stay still under expressions ...
    named[:, :, EXPRESSION_NAMES.index("eyes_closed")] = lids  # ... except the lid action
    # Random extras: continuous fields, so both lips / lids move together (no tearing).
    rand = _random_fields(rng, v, n_rand, (0.03, 0.12), mirror_frac=0.5) * face_region[:, None, None]
    rand = _rigidify_eyes(surf, rand, still)
    rand *= 0.0012 * (1 + np.arange(n_rand)) ** -0.6 / np.maximum(np.abs(rand).max(axis=(0, 1)), 1e-12)
    rand = rand[:, :, np.argsort(-(rand**2).mean(axis=(0, 1)), kind="stable")]
    return np.concatenate([named, rand], -1).astype(np.float32), list(EXPRESSION_NAMES)
