"""benchmarks/learning.py end to end at a toy size: it runs (on the GPU where there is one),
and the figures it reports agree with each other where they must."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run_script(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch) -> str:
    """``python benchmarks/learning.py ARGV`` in this process (torch and the project are
    imported already: a new interpreter would spend seconds on that); its standard output.
    Its torch thread count is put back afterwards."""
    from recon.devices import cpu_threads_within

    script = ROOT / "benchmarks" / "learning.py"
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.chdir(ROOT)
    with cpu_threads_within(torch.get_num_threads()):
        runpy.run_path(str(script), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.slow
def test_learning_benchmark_reports_consistent_figures(tmp_path: Path, capsys, monkeypatch
                                                       ) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = tmp_path / "learning.json"
    _run_script(["--device", device,
                 "--steps", "3", "--set", "train.pretrain_steps=1", "--identities", "6",
                 "--images-per-identity", "2", "--held-out", "2", "--image-size", "64",
                 "--optimum-steps", "8", "--optimum-images", "4", "--skip-paper",
                 "--timing-steps", "1", "--probe", "--json", str(out)], capsys, monkeypatch)
    report = json.loads(out.read_text())

    assert report["steps"] == 3
    assert report["held_out_images"] == 4 and report["held_out_identities"] == 2
    assert report["train_images"] == 8
    # The encoder's output layer starts at its bias (shape 0): untrained = mean shape.
    assert report["ratio_untrained_to_mean"] == pytest.approx(1.0, abs=0.01)
    assert report["error_mean_shape_mm"] == pytest.approx(1000 * report["error_mean_shape"])
    # The loss optimum fits all 4 held-out images here: its mean-shape baseline is the
    # benchmark's own, computed by another path.
    assert [o["photometric"] for o in report["loss_optimum"]] == [False, True]
    for o in report["loss_optimum"]:
        assert o["images"] == 4
        assert o["error_mean_shape"] == pytest.approx(report["error_mean_shape"], rel=1e-6)
        assert o["ratio"] == pytest.approx(o["error"] / o["error_mean_shape"])
    # The landmark-only bound: below the prior (1) and worse the noisier the landmarks.
    for yaw in (0.0, 30.0):
        ceiling = sorted(report["landmark_ceiling"], key=lambda c: c["noise_px"])
        ratios = [c["ratio"] for c in ceiling if c["yaw_deg"] == yaw]
        assert len(ratios) == 4
        assert all(0.0 < r < 1.0 for r in ratios)
        assert ratios == sorted(ratios)
    # The supervised probe trains as long as the benchmark's run, on the true codes.
    probe = report["supervised_probe"]
    assert probe["steps"] == 3 and probe["ratio"] > 0 and probe["train_mse_last_tenth"] > 0
    assert [t["config"] for t in report["step_time"]] == ["demo"]
    assert report["step_time"][0]["device"] == device


@pytest.mark.slow
def test_learning_benchmark_runs_the_keypoint_head_through_its_phases(tmp_path: Path, capsys,
                                                                       monkeypatch) -> None:
    out = tmp_path / "learning.json"
    printed = _run_script(
        ["--steps", "4",
         "--set", "model.head=keypoints", "--set", "train.keypoint_steps=2",
         "--set", "train.pretrain_steps=3", "--identities", "6", "--images-per-identity", "2",
         "--held-out", "2", "--image-size", "64", "--optimum-steps", "0", "--skip-paper",
         "--timing-steps", "1", "--json", str(out), "--set", "model.refine.steps=30",
         "--keep", str(tmp_path / "keep")], capsys, monkeypatch)
    report = json.loads(out.read_text())
    assert report["steps"] == 4
    # the encoder's located points, measured apart from the fitted model's landmarks
    assert report["held_out_keypoint_px"] > 0
    assert report["held_out_keypoint_px"] != report["held_out_landmark_px"]
    # the refined reconstruction is reported beside the encoder's, and the run is kept
    assert report["refine_steps"] == 30 and "+ refined" in printed
    assert report["refine_photometric"] == 2.0 and report["refine_seconds_per_image"] > 0
    assert report["error_refined_mm"] != report["error_trained_mm"]
    assert report["ratio_refined_to_mean"] > 0
    assert (tmp_path / "keep" / "synth").is_dir()
    assert list((tmp_path / "keep" / "run" / "checkpoints").glob("coarse-*.pt"))


def test_landmark_ceiling_matches_finite_difference_bound() -> None:
    """The landmark-only bound against the same linear-Gaussian bound built another way:
    central finite differences for both Jacobians, the similarity directions removed by a QR
    projection, the posterior's trace through its Cholesky factor."""
    import numpy as np

    from benchmarks.learning import landmark_ceiling
    from recon.deca import DECA, Codes
    from recon.evaluation.heldout import face_region
    from reconstruct_fixtures import tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    model = DECA(cfg.face_model, cfg.model).eval()
    region = face_region(cfg.face_model)
    ns, ne, nt = model.flame.n_shape, model.flame.n_exp, model.albedo.n_tex
    size, exp_std, yaw, noise = 64, 0.5, 30.0, [0.5, 2.0, 1e6]
    got = [c["ratio"] for c in landmark_ceiling(model, region, size, noise, exp_std, (yaw,))]

    def central(f, n: int, h: float) -> np.ndarray:
        with torch.no_grad():
            cols = [(f(h * e) - f(-h * e)).double() / (2 * h) for e in torch.eye(n)]
        return torch.stack(cols, 1).numpy()

    def face(shape: torch.Tensor) -> torch.Tensor:
        return model.neutral(shape[None]).vertices[0, region].reshape(-1)

    cam0 = torch.tensor(model.initial_camera(1 / 1.6))

    def landmarks_px(x: torch.Tensor) -> torch.Tensor:
        pose = x[ns + ne:ns + ne + 6] + torch.tensor([0, np.radians(yaw), 0, 0, 0, 0.0])
        codes = Codes(shape=x[None, :ns], tex=torch.zeros(1, nt), exp=x[None, ns:ns + ne],
                      pose=pose[None].float(), cam=(cam0 + x[ns + ne + 6:])[None],
                      light=torch.zeros(1, 9, 3))
        return model.decode(codes, with_detail=False, render=False).landmarks2d.reshape(-1) \
            * size / 2

    F = central(face, ns, 1e-2)  # linear in the shape code
    J = central(landmarks_px, ns + ne + 9, 1e-3)
    X = face(torch.zeros(ns)).detach().double().numpy().reshape(-1, 3)
    X = X - X.mean(0)
    S = np.stack([np.tile(np.eye(3)[k], len(X)) for k in range(3)]
                 + [np.cross(np.eye(3)[k], X).reshape(-1) for k in range(3)] + [X.reshape(-1)], 1)
    Q = np.linalg.qr(S)[0]
    FQ = F - Q @ (Q.T @ F)
    precision = np.diag([1.0] * ns + [exp_std ** -2] * ne + [1e-6] * 9)
    for sigma, ratio in zip(noise, got):
        cov = np.linalg.inv(J.T @ J / sigma ** 2 + precision)[:ns, :ns]
        # trace(FQ cov FQ^T) as the squared norm of FQ L, cov = L L^T
        want = np.linalg.norm(FQ @ np.linalg.cholesky(cov)) / np.linalg.norm(FQ)
        assert ratio == pytest.approx(want, rel=2e-3)
    assert got[0] < got[1] < got[2] == pytest.approx(1.0, abs=1e-4)
