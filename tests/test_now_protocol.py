"""The NoW protocol on data with known answers: crop, alignment, distances, statistics."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.spatial import ConvexHull

from recon.evaluation.alignment import landmark_alignment, refine_alignment, umeyama
from recon.evaluation.config import EvaluationConfig
from recon.evaluation.now import crop_region, crop_scan, cumulative_curve, evaluate_image, evaluate_now, summarize
from recon.evaluation.now_synthetic import (
    head_mesh,
    landmark_vertices,
    random_similarity,
    subdivide,
    write_synthetic_now,
)
from recon.evaluation.point_to_mesh import MeshDistance


@pytest.fixture(scope="module")
def head():
    verts, faces = head_mesh(30, 60)
    lmk = verts[landmark_vertices(verts)]
    scan, _ = subdivide(verts, faces, 2)
    return verts, faces, lmk, scan


def test_crop_formula_by_hand():
    lmk = np.zeros((7, 3))
    lmk[0], lmk[3] = [-50, 0, 0], [50, 0, 0]      # outer eye corners: 100 apart
    lmk[1], lmk[2] = [-15, 0, 0], [15, 0, 0]      # inner eye corners: midpoint at origin
    lmk[4] = [0, -40, 0]                          # nose bottom: nose distance 40
    centre, radius = crop_region(lmk)
    np.testing.assert_allclose(centre, [0, -40 + 0.3 * 40, 0])
    assert radius == pytest.approx(1.4 * (100 + 40) / 2)
    pts = np.array([[0, -28 + radius, 0], [0, -28 + radius + 1e-6, 0], [0, -28, 0]])
    assert crop_scan(pts, lmk).tolist() == [pts[0].tolist(), pts[2].tolist()]


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(7, 3))
    tf = random_similarity(rng, scale=2.5, max_angle_deg=170)
    est = umeyama(src, tf.apply(src))
    assert est.scale == pytest.approx(2.5)
    np.testing.assert_allclose(est.rotation, tf.rotation, atol=1e-10)
    np.testing.assert_allclose(est.translation, tf.translation, atol=1e-10)
    assert np.linalg.det(est.rotation) == pytest.approx(1.0)
    # a mirrored target still gets a proper rotation (no reflections)
    assert np.linalg.det(umeyama(src, src * [-1, 1, 1]).rotation) == pytest.approx(1.0)
    fixed = umeyama(src, tf.apply(src), scale=1.0)
    assert fixed.scale == 1.0


@pytest.mark.parametrize("metrical", [False, True])
def test_known_similarity_scores_zero(head, metrical):
    verts, faces, lmk, scan = head
    tf = random_similarity(np.random.default_rng(1), scale=1e-3, max_angle_deg=60)
    res = evaluate_image(scan, lmk, tf.apply(verts), faces, tf.apply(lmk),
                         EvaluationConfig(metrical=metrical))
    assert len(res.distances) > 1000
    assert res.distances.max() < 1e-6
    assert res.transform.scale == pytest.approx(1000.0)


def test_metrical_keeps_wrong_scale_nonmetrical_removes_it(head):
    verts, faces, lmk, scan = head
    tf = random_similarity(np.random.default_rng(2), scale=0.9e-3)  # 10% too small, in metres
    args = (scan, lmk, tf.apply(verts), faces, tf.apply(lmk))
    assert np.median(evaluate_image(*args, EvaluationConfig()).distances) < 1e-6
    metrical = evaluate_image(*args, EvaluationConfig(metrical=True))
    assert metrical.transform.scale == 1000.0
    assert np.median(metrical.distances) > 1.0


def test_refinement_fixes_bad_landmarks(head):
    verts, faces, lmk, scan = head
    rng = np.random.default_rng(4)
    tf = random_similarity(rng)
    noisy = tf.apply(lmk + rng.normal(scale=3.0, size=lmk.shape))  # 3 mm landmark errors
    cropped = crop_scan(scan, lmk)
    mesh = MeshDistance(tf.apply(verts), faces)
    init = landmark_alignment(noisy, lmk)
    before = init.scale * mesh.query(init.inverse_apply(cropped)).distances
    res = refine_alignment(cropped, mesh, init, max_iters=100, tol=0)
    after = res.transform.scale * mesh.query(res.transform.inverse_apply(cropped)).distances
    assert np.median(before) > 0.5
    assert np.median(after) < 0.02
    assert min(res.history) == pytest.approx(np.mean(after**2), rel=1e-9)
    assert 0 < res.iterations < 100  # converged before the cap
    none = refine_alignment(cropped, mesh, init, max_iters=0)
    assert none.transform is init and none.iterations == 0


def test_known_offsets_give_expected_distances():
    # Convex "head"; scan points moved outward along face normals by known offsets. With
    # the crop covering the whole object, no rigid motion can reduce all offsets, so the
    # protocol must report them (metrical: no scale to absorb an inflation).
    rng = np.random.default_rng(5)
    u = rng.normal(size=(600, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    hull = ConvexHull(u * [25.0, 60.0, 40.0])  # far from a sphere: no sliding direction
    verts, faces = hull.points, hull.simplices
    tri = verts[faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    # area-uniform samples: over a closed surface the normals then cancel, so the offsets
    # exert no net pull on the rigid refinement
    f = rng.choice(len(faces), 20000, p=area / area.sum())
    base = np.einsum("ij,ijk->ik", rng.dirichlet([2, 2, 2], 20000), verts[faces[f]])
    offsets = rng.uniform(0.0, 2.0, 20000)
    scan = base + offsets[:, None] * hull.equations[f, :3]
    # landmarks: far-apart mesh vertices so that the crop sphere holds the whole object
    lmk = np.array([[-60, 0, 0], [-1, 60, 0], [1, 60, 0], [60, 0, 0], [0, 0, -50], [-5, -5, 5], [5, -5, 5.0]])
    centre, radius = crop_region(lmk)
    assert (np.linalg.norm(scan - centre, axis=1) <= radius).all()
    tf = random_similarity(rng)
    res = evaluate_image(scan, lmk, tf.apply(verts), faces, tf.apply(lmk),
                         EvaluationConfig(metrical=True, refine_points=None))
    # The exact optimum sits a little off the true pose (the random offsets pull with
    # ~1/sqrt(N) net force): per point within 0.1 mm, statistics within 0.01 mm, and the
    # refinement's objective is no worse than that of the true pose.
    np.testing.assert_allclose(res.distances, offsets, atol=0.1)
    assert np.mean(res.distances**2) <= np.mean(offsets**2)
    assert np.median(res.distances) == pytest.approx(np.median(offsets), abs=0.01)
    assert res.distances.mean() == pytest.approx(offsets.mean(), abs=0.01)


def test_summary_and_curve():
    d = np.array([0.5, 1.0, 1.5, 2.0, 10.0])
    s = summarize(d)
    assert (s["median"], s["mean"], s["n"]) == (1.5, 3.0, 5)
    assert s["std"] == pytest.approx(np.std(d))
    thr, pct = cumulative_curve(d, max_mm=8.0)
    assert thr[0] == 0 and thr[-1] == pytest.approx(8.0)
    assert pct[np.searchsorted(thr, 1.0)] == pytest.approx(40.0)
    assert pct[-1] == pytest.approx(80.0)  # 10 mm is beyond the curve
    assert (np.diff(pct) >= 0).all()


def test_evaluate_now_on_synthetic_dataset(tmp_path):
    syn = write_synthetic_now(tmp_path, n_subjects=2, images_per_challenge=1,
                              mesh_resolution=(24, 48), deformation_mm=1.0, seed=3)
    # one prediction removed: counted as missing, not fatal
    missing = syn.images[-1]
    (syn.predictions_dir / missing.subject / missing.challenge_dir / f"{missing.stem}.obj").unlink()
    broken = syn.images[0]
    np.save(syn.predictions_dir / broken.subject / broken.challenge_dir / f"{broken.stem}.npy", np.zeros((5, 3)))
    out = tmp_path / "out"
    m = evaluate_now(syn.dataset_dir, syn.predictions_dir, out, EvaluationConfig(workers=1))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["median"] == pytest.approx(m["median"])
    assert {"median", "mean", "std"} <= saved.keys()
    assert set(saved["challenges"]) == {"neutral", "expression", "occlusion", "selfie"}
    assert saved["n_images"] == 6 and saved["n_missing"] == 1 and saved["n_failed"] == 1
    assert saved["missing"] == [{"image": missing.rel_path, "reason": "missing predicted mesh"}]
    [failed] = saved["failed"]
    assert failed["image"] == broken.rel_path
    assert "invalid prediction" in failed["reason"] and "7x3" in failed["reason"]
    # deformation amplitude 1 mm: errors are sub-millimetre but clearly non-zero
    assert 0.05 < saved["median"] < 1.0 and saved["std"] > 0
    table = pq.read_table(out / "distances.parquet").to_pandas()
    assert len(table) == 6 and set(table["challenge"]) == {"neutral", "expression", "occlusion", "selfie"}
    all_d = np.concatenate(table["distances"].to_list())
    assert len(all_d) == saved["n_points"]
    assert np.median(all_d) == pytest.approx(saved["median"], rel=1e-5)
    curve = np.loadtxt(out / "cumulative_curve.csv", delimiter=",", skiprows=1)
    assert curve.shape[1] == 6 and curve[-1, 1] > 99
    assert (out / "cumulative_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_now_without_predictions_is_an_error(tmp_path):
    syn = write_synthetic_now(tmp_path, n_subjects=1, mesh_resolution=(16, 32))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no prediction"):
        evaluate_now(syn.dataset_dir, empty, tmp_path / "out", EvaluationConfig(workers=1))


def test_cli_evaluate_now(tmp_path):
    from typer.testing import CliRunner

    from flows.cli.evaluate import app

    runner = CliRunner()
    r = runner.invoke(app, ["synthetic-now", "--out", str(tmp_path), "--subjects", "1",
                            "--deformation-mm", "0"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "eval"
    r = runner.invoke(app, ["now", "--dataset", str(tmp_path / "dataset"), "--predictions",
                            str(tmp_path / "predictions"), "--out", str(out), "--metrical",
                            "--workers", "1", "--set", "evaluation.refine_iters=5"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    # exact shapes score ~0 (OBJ stores metres to 6 decimals: 1 um quantisation)
    assert m["metrical"] is True and m["median"] < 1e-3
    assert "neutral" in r.output
    r = runner.invoke(app, ["now", "--dataset", str(tmp_path / "dataset"), "--predictions",
                            str(tmp_path / "nowhere"), "--out", str(out)])
    assert r.exit_code == 1 and "not found" in r.output
    r = runner.invoke(app, ["now", "--dataset", str(tmp_path), "--predictions", str(tmp_path),
                            "--out", str(out), "--set", "evaluation.refine_itrs=5"])
    assert r.exit_code == 2 and "refine_itrs" in r.output


def test_predict_hook_writes_layout_that_scores_zero(tmp_path):
    from recon.evaluation.predict import predict_now

    syn = write_synthetic_now(tmp_path / "syn", n_subjects=1, mesh_resolution=(16, 32))
    root = "images"
    for im in syn.images[:-1]:  # the last image is missing: a recorded failure
        p = syn.dataset_dir / root / im.rel_path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    verts, faces = head_mesh(16, 32, radii=(72.0, 95.0, 88.0))
    calls = []

    def predict_neutral(path):
        calls.append(path)
        if "occlusions" in str(path):
            raise RuntimeError("no face found")
        tf = random_similarity(np.random.default_rng(len(calls)))
        return tf.apply(verts), faces, tf.apply(verts[landmark_vertices(verts)])

    out = tmp_path / "pred"
    s = predict_now(predict_neutral, syn.dataset_dir, out, image_root=root)
    assert s.written == 2 and s.skipped == 0
    assert sorted(r for r, _ in s.failed) == sorted(im.rel_path for im in syn.images[2:])
    assert any("no face found" in why for _, why in s.failed)
    again = predict_now(predict_neutral, syn.dataset_dir, out, image_root=root)
    assert again.skipped == 2 and again.written == 0  # idempotent rerun
    # the written layout is what the protocol reads (a different head than the scan's
    # subject, so the score is clearly non-zero but finite)
    m = evaluate_now(syn.dataset_dir, out, tmp_path / "eval", EvaluationConfig(workers=1))
    assert m["n_images"] == 2 and m["n_missing"] == 2 and np.isfinite(m["median"])
    assert m["n_failed"] == 0

    def predict_nan(path):
        verts, faces, lmk = predict_neutral(path)
        return np.where(np.arange(len(verts))[:, None] == 0, np.nan, verts), faces, lmk

    s = predict_now(predict_nan, syn.dataset_dir, tmp_path / "nan", image_root=root)
    assert s.written == 0 and any("NaN or infinite" in why for _, why in s.failed)
    assert not list((tmp_path / "nan").rglob("*.obj"))


@pytest.mark.slow
def test_parallel_workers_match_serial(tmp_path):
    syn = write_synthetic_now(tmp_path, n_subjects=2, mesh_resolution=(16, 32), deformation_mm=0.5)
    serial = evaluate_now(syn.dataset_dir, syn.predictions_dir, tmp_path / "a", EvaluationConfig(workers=1))
    parallel = evaluate_now(syn.dataset_dir, syn.predictions_dir, tmp_path / "b", EvaluationConfig(workers=2))
    for k in ("median", "mean", "std", "n_points"):
        assert parallel[k] == pytest.approx(serial[k], rel=1e-6)


def _malformed_predictions(syn):
    """Break three predictions the ways found in the field: a PLY whose header promises more
    than it holds, a PLY with an unknown property type, an OBJ with NaN coordinates."""
    from recon.formats.mesh_io import read_obj, write_ply

    broken = {}
    for image, kind in zip(syn.images, ("truncated_ply", "bad_type_ply", "nan_obj")):
        obj = syn.predictions_dir / image.subject / image.challenge_dir / f"{image.stem}.obj"
        verts, faces, _, _ = read_obj(obj)
        if kind == "nan_obj":
            text = obj.read_text().splitlines()
            first_v = next(i for i, ln in enumerate(text) if ln.startswith("v "))
            text[first_v] = "v nan 0 inf"
            obj.write_text("\n".join(text) + "\n")
        else:
            obj.unlink()
            ply = obj.with_suffix(".ply")
            write_ply(ply, verts, faces)
            data = ply.read_bytes()
            ply.write_bytes(data[: len(data) // 2] if kind == "truncated_ply"
                            else data.replace(b"property float x", b"property quad x", 1))
        broken[image.rel_path] = kind
    return broken


def test_malformed_predictions_fail_their_scan_only(tmp_path):
    syn = write_synthetic_now(tmp_path, n_subjects=2, images_per_challenge=1,
                              mesh_resolution=(16, 32), deformation_mm=0.5, seed=5)
    broken = _malformed_predictions(syn)
    out = tmp_path / "out"
    m = evaluate_now(syn.dataset_dir, syn.predictions_dir, out, EvaluationConfig(workers=1))
    assert m["n_images"] == len(syn.images) - 3 and m["n_missing"] == 0 and m["n_failed"] == 3
    reasons = {f["image"]: f["reason"] for f in m["failed"]}
    assert set(reasons) == set(broken)
    by_kind = {kind: reasons[image] for image, kind in broken.items()}
    assert "malformed PLY" in by_kind["truncated_ply"] and ".ply" in by_kind["truncated_ply"]
    assert "malformed PLY" in by_kind["bad_type_ply"] and "quad" in by_kind["bad_type_ply"]
    assert "NaN or infinite" in by_kind["nan_obj"] and ".obj" in by_kind["nan_obj"]
    assert np.isfinite(m["median"]) and json.loads((out / "metrics.json").read_text())["n_failed"] == 3


def test_cli_exit_status_says_predictions_failed(tmp_path):
    from typer.testing import CliRunner

    from flows.cli.evaluate import app

    syn = write_synthetic_now(tmp_path, n_subjects=1, images_per_challenge=1,
                              mesh_resolution=(16, 32), seed=2)
    args = ["now", "--dataset", str(syn.dataset_dir), "--predictions", str(syn.predictions_dir),
            "--out", str(tmp_path / "eval"), "--workers", "1", "--set", "evaluation.refine_iters=3"]
    runner = CliRunner()
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "0 failed" in r.output, r.output
    broken = _malformed_predictions(syn)
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "3 failed" in r.output and "Traceback" not in r.output
    for image in broken:
        assert image in r.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_failed"] == 3
