"""DECA's conventions, each pinned against DECA's formula as published in its code
(yfeng95/DECA, ``decalib/``), rewritten here from the reading on fixed inputs.

What each reference below computes (DECA's names in brackets):
- camera [``util.batch_orth_proj``]: ``s * (x + tx, y + ty, z)``; DECA then negates y and z
  for the image (y down) and its landmarks; pixels are ``(u + 1) * size / 2``;
- pose [``FLAME.forward``]: ``pose (B, 6)`` = global | jaw axis-angle, full pose
  ``[global, neck = 0, jaw, eyes = 0]`` on FLAME's kinematic tree;
- SH shading [``SRenderY.add_SHlight``]: 9 bands ``[1, x, y, z, xy, xz, yz, x^2 - y^2,
  3z^2 - 1]`` times Lambertian-convolved constants, summed with the (9, 3) coefficients;
- albedo [``FLAMETex``]: ``mean + basis @ tex`` on flat arrays, (512, 512, 3) in C order,
  /255 for ``FLAME_texture.npz``, nearest resize to 256, channels reversed (BGR -> RGB);
  UV row 0 is v = 1 (``uvcoords * 2 - 1`` with y negated);
- detail normals [``DECA.displacement2normal``, ``util.vertex_normals``,
  ``util.generate_triangles``]: ``pos + z * mask * n + fixed * n`` on the texel grid,
  triangles ``(p00, p10, p01)``, ``(p01, p10, p11)`` inside margins x 2 / y 5, summed
  cross products, normalised; detail inside the mask, coarse outside;
- losses [``lossfunc`` and ``trainer.training_step``]: weighted 68-point L1
  (``weighted_landmark_loss``), ``eyed_loss``, ``lipd_loss``, masked photometric L1,
  ``1 - cos`` identity, shape consistency by swapping within a subject, ``IDMRFLoss``,
  ``z_sym`` with a 5 x 5 erosion, ``z_reg``, ``shading_smooth_loss``, code and light
  regularisers.
Where wildface reduces over the batch differently (docs/model.md, "Where wildface differs
from DECA"), the test states the factor.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recon.face_model.albedo import AlbedoModel
from recon.config import LossConfig
from recon.face_model.flame import FLAME
from recon.face_model.flame_io import _resize_texture_space
from recon.losses.consistency import identity_partners
from recon.losses.detail import displacement_l1, shading_smoothness, symmetry_loss
from recon.losses.identity import identity_loss
from recon.losses.landmarks import eye_closure_loss, lip_closure_loss, weighted_landmark_loss
from recon.losses.mrf import IDMRFLoss, mrf_features_loss
from recon.losses.photometric import photometric_loss
from recon.losses.regularizers import code_l2, light_grey_loss
from recon.render import (DecaRenderer, image_to_pixel, ndc_to_image, sh_shading,
                          sh_shading_packed, vertex_normals, weak_perspective_project)
from tiny_face_model import tiny_face_assets


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- camera

def deca_orth_proj(X: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """batch_orth_proj: X (B, N, 3), cam (B, 3) [s, tx, ty] -> s * (x + tx, y + ty, z)."""
    s, t = cam[:, None, :1], cam[:, None, 1:]
    return s * torch.cat([X[..., :2] + t, X[..., 2:]], dim=-1)


def test_weak_perspective_projection_and_image_flip():
    X = torch.randn(2, 20, 3, generator=_gen(0), dtype=torch.float64)
    cam = torch.tensor([[9.5, 0.01, -0.02], [7.0, -0.03, 0.05]], dtype=torch.float64)
    ndc = weak_perspective_project(X, cam)
    torch.testing.assert_close(ndc, deca_orth_proj(X, cam), rtol=0, atol=1e-14)
    # DECA's image space negates y and z (``trans_verts[:, :, 1:] = -trans_verts[:, :, 1:]``);
    # its 2D landmarks are the first two of those. wildface's landmarks2d (recon.deca.decode)
    # are ndc_to_image(project(...))[..., :2]: the same numbers.
    deca_image = deca_orth_proj(X, cam) * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(ndc_to_image(ndc)[..., :2], deca_image[..., :2], rtol=0, atol=1e-14)
    # A point up in the world (y > 0) and right (x > 0) lands in the image's upper right.
    up_right = weak_perspective_project(torch.tensor([[[0.05, 0.05, 0.0]]]), torch.tensor([[1.0, 0, 0]]))
    assert ndc_to_image(up_right)[0, 0, 0] > 0 and ndc_to_image(up_right)[0, 0, 1] < 0


def test_landmark_pixels_are_half_a_pixel_off_deca():
    """DECA reads [-1, 1] landmarks as pixels ``(u + 1) * size / 2`` (its datasets write
    ``px / size * 2 - 1``); wildface's pixel centres sit at integers (``- 0.5``), consistent
    with the rasterizer, where -1 / +1 are the outer image edges."""
    u = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [0.5, -0.25], [1.0, 1.0]])
    deca_px = (u + 1.0) * 224 / 2
    torch.testing.assert_close(image_to_pixel(u, 224, 224), deca_px - 0.5, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- pose

def rodrigues(aa: np.ndarray) -> np.ndarray:
    theta = np.linalg.norm(aa)
    k = aa / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(theta) * K + (1 - math.cos(theta)) * K @ K


def test_pose_layout_global_then_axis_angle_jaw():
    assets = tiny_face_assets()
    flame = FLAME(assets, 8, 3).double()
    v = assets.v_template.astype(np.float64)
    J = assets.J_regressor @ v  # joints of the template (zero shape)
    g, jaw = np.array([0.1, -0.25, 0.05]), np.array([0.3, 0.02, -0.04])
    pose = torch.tensor(np.concatenate([g, jaw])[None])
    out = flame(torch.zeros(1, 8, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), pose)
    # FLAME's tree: 0 global, 1 neck (child of 0), 2 jaw (child of 1); the tiny model's posedirs
    # are 0, so a vertex is the weighted blend of its joints' rigid motions.
    Rg, Rj = rodrigues(g), rodrigues(jaw)
    root = (v - J[0]) @ Rg.T + J[0]
    jawed = ((v - J[2]) @ Rj.T + J[2] - J[0]) @ Rg.T + J[0]
    w = assets.weights
    expected = w[:, 0:1] * root + w[:, 1:2] * root + w[:, 2:3] * jawed
    assert (w[:, 2] > 0.99).any() and (w[:, 0] > 0.99).any()  # both motions are exercised
    np.testing.assert_allclose(out.vertices[0].numpy(), expected, atol=1e-10)


# ----------------------------------------------------------------------------- SH lighting

def deca_sh(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """add_SHlight: normals (B, 3, H, W), sh (B, 9, 3) -> (B, 3, H, W)."""
    pi = math.pi
    c = [1 / math.sqrt(4 * pi)] + [(2 * pi / 3) * math.sqrt(3 / (4 * pi))] * 3 \
        + [(pi / 4) * 3 * math.sqrt(5 / (12 * pi))] * 3 \
        + [(pi / 4) * (3 / 2) * math.sqrt(5 / (12 * pi)), (pi / 4) * (1 / 2) * math.sqrt(5 / (4 * pi))]
    x, y, z = normals[:, 0], normals[:, 1], normals[:, 2]
    bands = [x * 0 + 1, x, y, z, x * y, x * z, y * z, x ** 2 - y ** 2, 3 * z ** 2 - 1]
    basis = torch.stack([b * ci for b, ci in zip(bands, c)], 1)  # (B, 9, H, W)
    return (sh[:, :, :, None, None] * basis[:, :, None]).sum(1)


def test_sh_shading_constants_and_band_order():
    n = F.normalize(torch.randn(2, 3, 5, 6, generator=_gen(1), dtype=torch.float64), dim=1)
    sh = torch.randn(2, 9, 3, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(sh_shading(n, sh), deca_sh(n, sh), rtol=0, atol=1e-12)
    # Each band alone: band k lights with exactly DECA's k-th basis function.
    for k in range(9):
        one = torch.zeros(1, 9, 3, dtype=torch.float64)
        one[0, k] = 1.0
        torch.testing.assert_close(sh_shading(n[:1], one), deca_sh(n[:1], one), rtol=0, atol=1e-12)
    # The packed (per covered pixel) version is the same function.
    pts = n.permute(0, 2, 3, 1).reshape(-1, 3)
    batch = torch.arange(2).repeat_interleave(30)
    packed = sh_shading_packed(pts, sh, batch)
    torch.testing.assert_close(packed, deca_sh(n, sh).permute(0, 2, 3, 1).reshape(-1, 3),
                               rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- albedo

def deca_flametex(mean: np.ndarray, basis: np.ndarray, code: torch.Tensor, divide: float
                  ) -> torch.Tensor:
    """FLAMETex: flat mean (1, N) + flat basis (N, K) @ code -> (B, 3, 256, 256), RGB."""
    m = torch.from_numpy(mean.reshape(1, -1) / divide).float()[None]
    b = torch.from_numpy(basis.reshape(-1, basis.shape[-1]) / divide).float()[None]
    tex = m + (b * code[:, None, :]).sum(-1)
    tex = tex.reshape(code.shape[0], 512, 512, 3).permute(0, 3, 1, 2)
    return F.interpolate(tex, [256, 256])[:, [2, 1, 0]]


def _albedo_model(mean_hw3: np.ndarray, basis: np.ndarray, n_tex: int) -> AlbedoModel:
    from dataclasses import replace

    return AlbedoModel(replace(tiny_face_assets(), albedo_mean=mean_hw3, albedo_basis=basis), n_tex)


@pytest.mark.parametrize("kind", ["FLAME_texture", "FLAME_albedo_from_BFM"])
def test_albedo_is_flametex(kind):
    rng = np.random.default_rng(3)
    K = 3
    # Channels differ (B < G < R) so a missing BGR -> RGB flip cannot pass.
    base = np.array([0.3, 0.5, 0.7], np.float32)  # stored order: B, G, R
    mean = base + 0.1 * rng.random((512, 512, 3), dtype=np.float32)
    basis = 0.02 * rng.standard_normal((512, 512, 3, K)).astype(np.float32)
    if kind == "FLAME_texture":  # (H, W, 3) and (H, W, 3, K) in 0..255
        tex, divide = {"mean": mean * 255, "tex_dir": basis * 255}, 255.0
        keys = ("mean", "tex_dir")
    else:  # BFM conversion: flat MU, PC (N, K) in 0..1
        tex, divide = {"MU": mean.reshape(1, -1), "PC": basis.reshape(-1, K)}, 1.0
        keys = ("MU", "PC")
    m, b = _resize_texture_space(tex, *keys)
    code = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]])
    ours = _albedo_model(m, b, K)(code)
    ref = deca_flametex(np.asarray(tex[keys[0]]), np.asarray(tex[keys[1]]), code, divide)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    assert (ours[:, 0] > ours[:, 2]).all()  # red first: the stored BGR was reversed


def test_malformed_texture_space_is_refused_naming_the_file():
    from recon.face_model.flame_io import FaceModelFormatError

    bad = {"MU": np.zeros((1, 10 * 12 * 3), np.float32), "PC": np.zeros((10 * 12 * 3, 2), np.float32)}
    with pytest.raises(FaceModelFormatError, match="FLAME_albedo_from_BFM.npz.*square RGB image"):
        _resize_texture_space(bad, "MU", "PC", source="FLAME_albedo_from_BFM.npz")
    short = {"mean": np.zeros((8, 8, 3), np.float32), "tex_dir": np.zeros((8, 8, 2), np.float32)}
    with pytest.raises(FaceModelFormatError, match="FLAME_texture.npz"):
        _resize_texture_space(short, "mean", "tex_dir", source="FLAME_texture.npz")


def test_uv_rows_start_at_v_one():
    """DECA maps a UV coordinate to ``(2u - 1, -(2v - 1))`` in its y-down image space: UV
    row 0 is v = 1. A UV map of the interpolated (u, v) must read back that convention."""
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    S = 8
    r = DecaRenderer(faces, uv, faces, image_size=S, uv_size=S).double()
    attrs = torch.cat([uv, torch.zeros(4, 1, dtype=torch.float64)], -1)[None]
    uvmap = r.world2uv(attrs)[0]
    centres = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    torch.testing.assert_close(uvmap[0], centres[None].expand(S, S), rtol=0, atol=1e-12)  # u = column
    torch.testing.assert_close(uvmap[1], (1 - centres)[:, None].expand(S, S), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- detail normals

def deca_dense_faces(h: int, w: int) -> torch.Tensor:
    """generate_triangles(h, w): margins x 2, y 5, each quad's two triangles, reordered."""
    tris = []
    for x in range(2, w - 1 - 2):
        for y in range(5, h - 1 - 5):
            tris.append([y * w + x, y * w + x + 1, (y + 1) * w + x])
            tris.append([y * w + x + 1, (y + 1) * w + x + 1, (y + 1) * w + x])
    return torch.tensor(tris)[:, [0, 2, 1]]


def deca_vertex_normals(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """vertex_normals, one mesh: v (N, 3), f (F, 3) -> (N, 3)."""
    n = torch.zeros_like(v)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    n.index_add_(0, f[:, 1], torch.cross(c - b, a - b, dim=-1))
    n.index_add_(0, f[:, 2], torch.cross(a - c, b - c, dim=-1))
    n.index_add_(0, f[:, 0], torch.cross(b - a, c - a, dim=-1))
    return F.normalize(n, eps=1e-6, dim=1)


def test_displacement_to_normals_is_displacement2normal():
    S = 32
    verts, faces = _bumped_grid(12)
    uv = (verts[:, :2] - verts[:, :2].min(0).values) / (verts[:, :2].max(0).values - verts[:, :2].min(0).values)
    r = DecaRenderer(faces, uv, faces, image_size=S, uv_size=S).double()
    uv_z = 0.004 * torch.randn(1, 1, S, S, generator=_gen(4), dtype=torch.float64)
    fixed = 0.002 * torch.randn(S, S, generator=_gen(5), dtype=torch.float64)
    # DECA's face-eye mask is 0 at the layout's border; here: 0 outside DECA's triangle
    # margins and wherever the layout's 3 x 3 neighbourhood is not covered.
    mask = torch.zeros(1, 1, S, S, dtype=torch.float64)
    mask[..., 7:S - 7, 4:S - 4] = 1.0
    mask = mask * r.uv.interior
    ours = r.displacement_to_normals(uv_z, verts[None], mask, fixed)

    # DECA, written from displacement2normal. The coarse normal map: wildface renormalises
    # the interpolated normal (a unit normal inside each triangle), DECA uses it as is; the
    # reference takes the renormalised one so that the comparison pins the rest.
    pos = r.world2uv(verts[None])
    n = F.normalize(r.world2uv(vertex_normals(verts[None], faces)), dim=1)
    detail = pos + uv_z * mask * n + fixed[None, None] * n
    dense = deca_vertex_normals(detail[0].permute(1, 2, 0).reshape(-1, 3), deca_dense_faces(S, S))
    dense = dense.reshape(S, S, 3).permute(2, 0, 1)[None]
    ref = dense * mask + n * (1 - mask)
    covered = r.uv.covered.bool().expand_as(ref)
    torch.testing.assert_close(ours[covered], ref[covered], rtol=0, atol=1e-10)
    assert (mask > 0).sum() > 100
    # Without the fixed displacement the normals change: it is applied.
    assert (r.displacement_to_normals(uv_z, verts[None], mask) - ours).abs().max() > 1e-3


def _bumped_grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = tiny_face_assets(n)
    return torch.tensor(a.v_template, dtype=torch.float64), torch.tensor(a.faces)


# ----------------------------------------------------------------------------- losses

def deca_kp_l1(real: torch.Tensor, pred: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """batch_kp_2d_l1_loss with weights: real (B, K, 3) with visibility, pred (B, K, 2)."""
    real = real.clone()
    real[:, :, 2] = weights[None] * real[:, :, 2]
    gt, p = real.reshape(-1, 3), pred.reshape(-1, 2)
    vis = gt[:, 2]
    return ((gt[:, :2] - p).abs().sum(1) @ vis) / (vis.sum() * 2.0 + 1e-8)


def deca_landmark_weights() -> torch.Tensor:
    w = torch.ones(68, dtype=torch.float64)
    w[5:7] = 2
    w[10:12] = 2
    w[27:36] = 1.5
    w[30] = w[31] = w[35] = 3
    w[60:68] = 1.5
    w[48:60] = 1.5
    w[48] = w[54] = 3
    return w


def _landmark_pair() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.rand(3, 68, 2, generator=_gen(6), dtype=torch.float64) * 2 - 1
    target = pred + 0.05 * torch.randn(3, 68, 2, generator=_gen(7), dtype=torch.float64)
    return pred, target


def test_weighted_landmark_loss_is_decas():
    pred, target = _landmark_pair()
    real = torch.cat([target, torch.ones(3, 68, 1, dtype=torch.float64)], -1)
    ref = deca_kp_l1(real, pred, deca_landmark_weights())
    assert weighted_landmark_loss(pred, target).item() == pytest.approx(ref.item(), rel=1e-12)


def test_eye_and_lip_distances_are_decas():
    pred, target = _landmark_pair()

    def dist(p, up, down):
        return ((p[:, up] - p[:, down]) ** 2).sum(2).sqrt()

    eye = (dist(pred, [37, 38, 43, 44], [41, 40, 47, 46])
           - dist(target, [37, 38, 43, 44], [41, 40, 47, 46])).abs().mean()
    lip = (dist(pred, [61, 62, 63], [67, 66, 65]) - dist(target, [61, 62, 63], [67, 66, 65])).abs().mean()
    assert eye_closure_loss(pred, target).item() == pytest.approx(eye.item(), rel=1e-9)
    assert lip_closure_loss(pred, target).item() == pytest.approx(lip.item(), rel=1e-9)


def test_photometric_loss_with_deca_settings():
    g = _gen(8)
    pred, img = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    img[0, :, :2] = 1.0  # saturated photo pixels, rendered brighter
    pred[0, :, :2] = 1.2
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.3).float()
    deca = (mask * (pred - img).abs()).mean()
    assert photometric_loss(pred, img, mask, saturation=False).item() == pytest.approx(deca.item(), rel=1e-6)
    # wildface's default forgives a render brighter than a saturated pixel: smaller here.
    assert photometric_loss(pred, img, mask).item() < deca.item() - 1e-4
    cfg = LossConfig()
    assert (cfg.photometric_render, cfg.photometric_saturation) == ("lit", True)
    assert LossConfig(photometric_render="albedo", photometric_saturation=False).photometric_render == "albedo"


class _Embed(torch.nn.Module):
    """A fixed linear 'recogniser' returning unit embeddings, as IdentityNetwork does."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.randn(3 * 8 * 8, 16, generator=_gen(9), dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1) @ self.w, dim=1)


def test_identity_loss_is_one_minus_cosine_on_the_overlay():
    g = _gen(10)
    render = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    real = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).double()
    net = _Embed()
    overlay = render * mask + real * (1 - mask)  # trainer: albedo x shading in the face region
    deca = (1.0 - F.cosine_similarity(net(overlay), net(real), dim=1)).mean()
    assert identity_loss(net, render, real, mask).item() == pytest.approx(deca.item(), rel=1e-12)


def test_shape_consistency_partners_share_the_subject():
    """DECA permutes shape codes within each subject's K images; wildface draws a cycle, so
    that no image keeps its own code (DECA's permutation may leave some in place)."""
    identity = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    partner, has = identity_partners(identity, _gen(11))
    assert (identity[partner] == identity).all()
    assert (partner[has] != torch.arange(10)[has]).all() and has[:9].all() and not has[9]


def deca_mrf(gen: torch.Tensor, tar: torch.Tensor, centre_dims=(1,)) -> torch.Tensor:
    """IDMRFLoss.mrf_loss: (B, C, H, W) features -> sum over the batch of -log(mean_t max_g cx).
    DECA centres on ``tar.mean(1)``; ``centre_dims=(2, 3)`` centres each channel instead."""
    mu = tar.mean(centre_dims, keepdim=True)
    g, t = gen - mu, tar - mu
    g, t = g / g.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(tar.shape[0]):
        # conv2d with 1x1 target patches: (1, N_t, H, W) cosine of each target patch at each g.
        cos = F.conv2d(g[i:i + 1], t[i].flatten(1).T[:, :, None, None])
        d = -(cos - 1) / 2
        rel = d / (d.min(dim=1, keepdim=True).values + 1e-5)
        w = torch.exp((1.0 - rel) / 0.5)
        cx = w / w.sum(dim=1, keepdim=True)
        total = total - torch.log(cx.flatten(2).max(dim=2).values.mean(dim=1)).sum()
    return total


def test_id_mrf_is_decas_per_image():
    g = _gen(12)
    gen = torch.randn(3, 8, 5, 4, generator=g, dtype=torch.float64)
    tar = torch.randn(3, 8, 5, 4, generator=g, dtype=torch.float64)
    # DECA sums over the batch; wildface averages (docs/model.md). DECA centres each position
    # on its channel mean: centre="channels"; wildface's default centres each channel.
    assert mrf_features_loss(gen, tar, "channels").item() == pytest.approx(deca_mrf(gen, tar).item() / 3, rel=1e-4)
    spatial = deca_mrf(gen, tar, centre_dims=(2, 3))
    assert mrf_features_loss(gen, tar).item() == pytest.approx(spatial.item() / 3, rel=1e-4)
    # Layers: style relu3_2 + relu4_2 and content relu4_2, all weight 1.
    feats = {"relu3_2": torch.randn(2, 4, 6, 6, generator=g), "relu4_2": torch.randn(2, 6, 3, 3, generator=g)}
    feats_t = {k: torch.randn(v.shape, generator=g) for k, v in feats.items()}
    net = lambda x: feats if x.sum() > 0 else feats_t  # noqa: E731 - gen images are all ones
    loss = IDMRFLoss(net, centre="channels")(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    ref = (deca_mrf(feats["relu3_2"].double(), feats_t["relu3_2"].double())
           + 2 * deca_mrf(feats["relu4_2"].double(), feats_t["relu4_2"].double())) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_detail_regularisers_are_decas():
    g = _gen(13)
    B, S = 2, 12
    uv_z = 0.01 * torch.randn(B, 1, S, S, generator=g, dtype=torch.float64)
    vis = torch.zeros(B, 1, S, S, dtype=torch.float64)
    vis[0, :, 1:11, 2:9] = 1.0
    vis[1, :, 0:7, 0:12] = 1.0
    # z_sym: scipy's binary_erosion with a 5 x 5 structure (outside counts as 0).
    eroded = torch.zeros_like(vis)
    for b in range(B):
        for i in range(S):
            for j in range(S):
                if 2 <= i < S - 2 and 2 <= j < S - 2:
                    eroded[b, 0, i, j] = float(vis[b, 0, i - 2:i + 3, j - 2:j + 3].min())
    sym = ((1 - eroded) * (uv_z - torch.flip(uv_z, [-1])).abs()).sum()
    assert symmetry_loss(uv_z, vis).item() == pytest.approx(sym.item() / B, rel=1e-12)
    assert displacement_l1(uv_z).item() == pytest.approx(uv_z.abs().mean().item(), rel=1e-12)
    shading = torch.rand(B, 3, S, S, generator=g, dtype=torch.float64)
    dx = shading[:, :, 1:-1, 1:] - shading[:, :, 1:-1, :-1]
    dy = shading[:, :, 1:, 1:-1] - shading[:, :, :-1, 1:-1]
    smooth = (dx ** 2).mean() + (dy ** 2).mean()
    assert shading_smoothness(shading).item() == pytest.approx(smooth.item(), rel=1e-12)


def test_code_and_light_regularisers_are_decas():
    g = _gen(14)
    code = torch.randn(4, 100, generator=g, dtype=torch.float64)
    # DECA: sum(x^2) / 2 over the batch; wildface: per image (weights x the batch, LossConfig).
    assert code_l2(code).item() == pytest.approx((code ** 2).sum().item() / 2 / 4, rel=1e-12)
    light = torch.randn(4, 9, 3, generator=g, dtype=torch.float64)
    ref = ((light.mean(dim=2)[:, :, None] - light) ** 2).mean()
    assert light_grey_loss(light).item() == pytest.approx(ref.item(), rel=1e-12)
