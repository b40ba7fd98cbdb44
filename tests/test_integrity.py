"""Numerical integrity: non-finite numbers are refused by the config, stop training with a
clear error, never reach a checkpoint, are refused at model load, and fail only the face
whose reconstruction they reach (nothing written for it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.config import ConfigError, load_config
from recon.training.checkpoint import (NonFiniteState, assert_finite_state, checkpoint_path,
                                       load_checkpoint, save_checkpoint)
from reconstruct_fixtures import tiny_config


# -- configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("override, field", [
    ("train.lr=.inf", "train.lr"),          # YAML's infinity: passes `gt=0`
    ("train.lr=nan", "train.lr"),           # the string pydantic reads as a float
    ("train.lr=.nan", "train.lr"),
    ("loss.photometric=.inf", "loss.photometric"),
    ("model.refine.lr=.inf", "model.refine.lr"),
    ("synth.face_fraction=[0.4, .inf]", "synth.face_fraction.1"),
    ("ray.resources_per_worker={accel: .nan}", "ray.resources_per_worker.accel"),
    ("services.start_timeout_s=.inf", "services.start_timeout_s"),
    ("reconstruct.animation_fps=.inf", "reconstruct.animation_fps"),
    ("evaluation.curve_max_mm=.inf", "evaluation.curve_max_mm"),
])
def test_non_finite_numbers_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{field}: Input should be a finite number" in str(err.value)


def test_non_finite_number_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: .inf\n  grad_clip: -.inf\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.lr: Input should be a finite number" in str(err.value)
    assert "train.grad_clip" in str(err.value)


def test_max_skipped_steps_is_at_least_one():
    assert load_config(None).train.max_skipped_steps == 3
    with pytest.raises(ConfigError, match=r"train\.max_skipped_steps"):
        load_config(None, ["train.max_skipped_steps=0"])


def test_cli_refuses_an_infinite_learning_rate_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from flows.cli.main import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--stage", "coarse", "--data",
                                      str(tmp_path / "none"), "--out", str(out),
                                      "--set", "train.lr=.inf"])
    assert result.exit_code != 0
    assert "train.lr" in result.output and "finite" in result.output
    assert "Traceback" not in result.output
    assert not (out / "checkpoints").exists() and not list(out.glob("*.jsonl"))


# -- checkpoints ---------------------------------------------------------------------------
def _state(**poison: float) -> dict[str, torch.Tensor]:
    state = {"enc.weight": torch.ones(3, 2), "enc.bias": torch.zeros(3),
             "bn.num_batches_tracked": torch.tensor(4)}
    for key, value in poison.items():
        state[key.replace("__", ".")][0] = value
    return state


def test_assert_finite_state_names_the_first_bad_tensor():
    assert_finite_state(_state(), "model")  # finite: no error
    assert_finite_state({"rng": torch.randint(0, 255, (8,), dtype=torch.uint8)}, "rng")
    with pytest.raises(NonFiniteState, match=r"weights\.pt: .* in enc\.bias \(1 entries\)"):
        assert_finite_state(_state(enc__bias=float("nan")), "weights.pt")
    with pytest.raises(NonFiniteState, match=r"optimizer\.state\.0\.exp_avg"):
        assert_finite_state({"optimizer": {"state": {0: {"exp_avg": torch.tensor([-np.inf])}}}},
                            "ckpt")
    with pytest.raises(NonFiniteState, match=r"scaler\.scale"):
        assert_finite_state({"scaler": {"scale": float("inf")}}, "ckpt")


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_save_refuses_a_non_finite_state_and_writes_nothing(tmp_path, where):
    kw = dict(stage="coarse", model=_state(), optimizer={"state": {0: {"exp_avg": torch.ones(2)}}},
              config_json="{}", face_model="tiny")
    good = save_checkpoint(checkpoint_path(tmp_path, "coarse", 1), step=1, **kw)
    bad = dict(kw)
    if where == "model":
        bad["model"] = _state(enc__weight=float("inf"))
    else:
        bad["optimizer"] = {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}}
    with pytest.raises(NonFiniteState, match=where):
        save_checkpoint(checkpoint_path(tmp_path, "coarse", 2), step=2, **bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no file, no temp file
    assert load_checkpoint(good)["step"] == 1


# -- training ------------------------------------------------------------------------------
def _trainer(tmp_path, synth, **overrides):
    from recon.synth import iter_samples
    from recon.training.data import SampleStore
    from recon.training.trainer import Trainer

    samples = list(iter_samples(synth))
    cfg = tiny_config(**{"model.backbone": "mobilenet_v3_small", "model.image_size": 32,
                         "model.uv_size": 16, "train.checkpoint_every": 1, **overrides})
    return Trainer(cfg, "coarse", tmp_path, SampleStore.from_samples(samples), device="cpu")


def _assert_every_written_checkpoint_finite(root: Path) -> int:
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".pt", ".tmp")]
    assert not [p for p in files if p.suffix == ".tmp"]
    for p in files:  # every tensor of every file, read back independently of the writer
        payload = torch.load(p, weights_only=True)
        stack = [payload]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v).all(), p
    return len(files)


def test_training_stops_after_consecutive_skipped_steps(tmp_path, synth,
                                                        monkeypatch):
    from recon.training.steps import CoarseStep
    from recon.training.trainer import NonFiniteTraining

    forward = CoarseStep.__call__

    def nan_loss(self, batch):  # the loss of every step turns NaN: every step is skipped
        loss, terms = forward(self, batch)
        return loss * float("nan"), terms

    monkeypatch.setattr(CoarseStep, "__call__", nan_loss)
    trainer = _trainer(tmp_path, synth, **{"train.steps": 10, "train.max_skipped_steps": 2})
    with pytest.raises(NonFiniteTraining, match=r"at step 2: 2 consecutive steps skipped "
                                                r"\(train\.max_skipped_steps=2\).*the loss"):
        trainer.run()
    assert trainer.step_fn.skipped == 2
    # Step 1's checkpoint (weights untouched, finite) stays; nothing was written at step 2.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["coarse-000000001.pt"]
    assert _assert_every_written_checkpoint_finite(tmp_path) == 1


def test_a_huge_learning_rate_stops_training_with_finite_checkpoints_only(tmp_path,  # noqa
                                                                         synth):
    from recon.training.trainer import NonFiniteTraining

    # Finite, so the config takes it: step 1 throws the weights to ~1e30, later forward
    # passes overflow and their steps are skipped.
    trainer = _trainer(tmp_path, synth, **{"train.steps": 10, "train.lr": 1e30})
    with pytest.raises(NonFiniteTraining, match=r"training diverged at step 4: 3 consecutive"):
        trainer.run()
    assert trainer.step == 3  # no step after the error, nor its checkpoint
    assert _assert_every_written_checkpoint_finite(tmp_path) == 3


# -- reconstruction ------------------------------------------------------------------------
def test_load_model_refuses_non_finite_weights(checkpoint, tmp_path):
    from recon.inference.reconstruct import load_model

    payload = torch.load(checkpoint, weights_only=True)
    key = next(k for k in payload["model"] if k.startswith("coarse_encoder")
               and payload["model"][k].is_floating_point())
    payload["model"][key].view(-1)[0] = float("nan")
    diverged = tmp_path / "detail-000000100.pt"
    torch.save(payload, diverged)  # as a run without these checks could have written it
    with pytest.raises(NonFiniteState, match=rf"{diverged.name}: .* in {key} \(1 entries\)"):
        load_model(diverged)
    load_model(checkpoint)  # the finite original loads


def _poison_shape(codes, row: int):
    shape = codes.shape.clone()
    shape[row, 0] = float("nan")
    return codes.replace(shape=shape)


def test_write_face_refuses_a_non_finite_face_and_writes_nothing(checkpoint, synth,  # noqa
                                                                 tmp_path):
    from PIL import Image

    from recon.inference.reconstruct import NonFiniteOutput, load_model, write_face

    r = load_model(checkpoint)
    crops = np.stack([np.asarray(Image.open(p).convert("RGB").resize((r.image_size,) * 2))
                      for p in sorted((synth / "images").rglob("*.jpg"))[:2]])
    rec = r.decode(_poison_shape(r.encode(crops), 1))  # the NaN code reaches the mesh
    x = r.to_tensor(crops)
    write_face(tmp_path / "face_00", r, rec, 0, x[0])
    assert (tmp_path / "face_00" / "coarse.obj").is_file()
    with pytest.raises(NonFiniteOutput, match=r"codes\.shape, vertices, "):
        write_face(tmp_path / "face_01", r, rec, 1, x[1])
    assert not (tmp_path / "face_01").exists()


def test_batch_reports_the_non_finite_face_failed_and_goes_on(synth, checkpoint,
                                                              tmp_path, monkeypatch):
    from flows.reconstruct import MARKER, run_batch
    from recon.inference.reconstruct import FaceReconstructor

    photos = tmp_path / "photos"
    for key in ("id0000/img000", "id0001/img001"):
        for ext in (".jpg", ".pts"):
            dst = photos / (key.replace("/", "_") + ext)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(synth / "images" / (key + ext), dst)
    encode, calls = FaceReconstructor.encode, []

    def diverging_on_the_first_input(self, crops):
        calls.append(1)
        codes = encode(self, crops)
        return _poison_shape(codes, 0) if len(calls) == 1 else codes

    monkeypatch.setattr(FaceReconstructor, "encode", diverging_on_the_first_input)
    out = tmp_path / "out"
    summary = run_batch([str(photos)], str(out), str(checkpoint), tiny_config())
    bad, good = out / "id0000_img000", out / "id0001_img001"
    marker = json.loads((bad / MARKER).read_text())
    assert marker["status"] != "ok" and marker["faces"] == []
    assert marker["failed_faces"][0]["face"] == "face 0"
    assert "non-finite values (inf or nan) in codes.shape" in marker["failed_faces"][0]["reason"]
    assert not list(bad.rglob("*.obj")) and not list(bad.rglob("params.json"))
    assert json.loads((good / MARKER).read_text())["status"] == "ok"
    params = json.loads((good / "face_00" / "params.json").read_text())
    assert np.isfinite(params["codes"]["shape"]).all()
    assert summary["counts"]["ok"] == 1
