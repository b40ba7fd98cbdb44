"""The single-process trainer: learning, checkpoints, bit-identical resume (CPU), callbacks."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from recon.config import SynthConfig
from recon.training.checkpoint import (checkpoint_due, checkpoint_path, list_checkpoints,
                                       load_checkpoint, save_checkpoint)
from recon.training.data import SampleStore
from recon.training.trainer import Trainer, TrainerCallback
from reconstruct_fixtures import tiny_config

slow = pytest.mark.slow  # the tests that train; the rest are plain functions


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from recon.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig(identities=4, images_per_identity=3, image_size=96, seed=3,
                               occluder_probability=0.0, selfie_probability=0.0))
    return root


@pytest.fixture(scope="module")
def store(synth_root):
    from recon.synth import iter_samples

    return SampleStore.from_samples(iter_samples(synth_root))


def _cfg(**extra):
    return tiny_config(**extra)


class Record(TrainerCallback):
    """Every step's terms; at each checkpoint, the trainer's model weights as the callback
    reads them (``trainer.model``)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.terms: dict[int, dict[str, float]] = {}
        self.checkpoints: list = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.trainers: set[int] = set()
        self.stop_at = stop_at

    def on_step(self, trainer, step, terms):
        assert trainer.step == step
        self.trainers.add(id(trainer))
        self.terms[step] = terms
        if step == self.stop_at:
            raise KeyboardInterrupt  # a killed run

    def on_checkpoint(self, trainer, path):
        self.trainers.add(id(trainer))
        self.checkpoints.append(path)
        self.weights.append(_params(trainer))


def _losses(rec: Record) -> dict[int, dict[str, float]]:
    drop = ("step_time_s", "images_per_s")
    return {s: {k: v for k, v in t.items() if k not in drop} for s, t in rec.terms.items()}


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()
            if isinstance(v, torch.Tensor)}


@slow
def test_coarse_training_decreases_the_loss(synth_root, tmp_path):
    from recon.synth import iter_samples

    # one batch worth of images (2 identities x 2) at a fixed crop: the coarse stage (full
    # losses) must fit them within a few dozen steps
    tiny = SampleStore.from_samples(s for s in iter_samples(synth_root, {"id0000", "id0001"})
                                    if s["key"].endswith(("img000", "img001")))
    rec = Record()
    cfg = _cfg(**{"train.steps": 30, "train.checkpoint_every": 100, "data.shift": 0.0,
                  "data.scale_min": 1.6, "data.scale_max": 1.6})
    result = Trainer(cfg, "coarse", tmp_path, tiny, device="cpu", callbacks=[rec]).run()
    assert result.step == 30 and result.skipped == 0
    losses = [rec.terms[s]["loss"] for s in range(1, 31)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    lmk = [rec.terms[s]["landmarks"] for s in range(1, 31)]
    assert sum(lmk[-5:]) < 0.8 * sum(lmk[:5])
    # the end of the run is always checkpointed
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints", "coarse")] == [30]


@slow
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_is_bit_identical(store, tmp_path, schedule):
    # resumes inside the landmark-only phase and crosses into the full losses
    cfg = _cfg(**{"train.steps": 6, "train.checkpoint_every": 3, "train.pretrain_steps": 4,
                  "train.lr_schedule": schedule})
    full = Record()
    straight = Trainer(cfg, "coarse", tmp_path / "a", store, device="cpu", callbacks=[full])
    straight.run()
    first = Trainer(cfg, "coarse", tmp_path / "b", store, device="cpu")
    assert first.run(3).step == 3
    second_rec = Record()
    second = Trainer(cfg, "coarse", tmp_path / "b", store, device="cpu", callbacks=[second_rec])
    assert second.resumed_from == 3
    second.run()
    assert _losses(second_rec) == {s: _losses(full)[s] for s in (4, 5, 6)}
    # the rate each step used: the config's schedule (cosine: decays from lr to its end)
    assert [full.terms[s]["lr"] for s in range(1, 7)] == [cfg.train.lr_at(s) for s in range(6)]
    a, b = _params(straight), _params(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "coarse-000000006.pt")
    assert ckpt["step"] == 6 and ckpt["face_model"] == second.model.face_model_name
    assert '"train"' in ckpt["config"]


@slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_precision_run_on_cuda_resumes_with_its_grad_scaler(store, tmp_path):
    cfg = _cfg(**{"train.steps": 4, "train.checkpoint_every": 2, "train.amp": True})
    first = Trainer(cfg, "coarse", tmp_path, store, device="cuda")
    assert first.scaler is not None
    assert first.run(2).step == 2
    scale = first.scaler.get_scale()
    second = Trainer(cfg, "coarse", tmp_path, store, device="cuda")
    assert second.resumed_from == 2 and second.scaler.get_scale() == scale
    result = second.run()
    assert result.step == 4 and all(map(math.isfinite, result.terms.values()))
    assert next(second.model.parameters()).is_cuda


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path):
    path = checkpoint_path(tmp_path, "coarse", 2)
    kw = dict(stage="coarse", step=2, model={"w": torch.ones(2)}, optimizer={},
              config_json="{}", face_model="tiny")
    save_checkpoint(path, **kw)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        # torch.save fails part-way through: a lambda cannot be pickled
        save_checkpoint(path, **{**kw, "step": 3}, extra={"bad": lambda: 0})
    assert load_checkpoint(path, stage="coarse")["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("total, every, saved", [
    (6, 2, [2, 4, 6]),
    (7, 3, [3, 6, 7]),      # the end is saved although it is off the period
    (3, 5, [3]),            # a run shorter than the period: the end only
    (5, 1, [1, 2, 3, 4, 5]),
    (10, 10, [10]),         # the end on the period is saved once
])
def test_checkpoint_rule_every_n_steps_and_at_the_end(total, every, saved):
    assert [s for s in range(1, total + 1) if checkpoint_due(s, total, every)] == saved


@slow
def test_interrupted_run_resumes_at_the_last_checkpoint_and_callbacks_see_the_trainer(
        store, tmp_path):
    cfg = _cfg(**{"train.steps": 6, "train.checkpoint_every": 2})
    straight = Trainer(cfg, "coarse", tmp_path / "a", store, device="cpu")
    straight.run()
    killed = Record(stop_at=5)
    trainer = Trainer(cfg, "coarse", tmp_path / "b", store, device="cpu", callbacks=[killed])
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    ckpt_dir = tmp_path / "b" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpt_dir, "coarse")] == [2, 4]
    # the callbacks got this trainer, and its model at each checkpoint is what was saved
    assert killed.trainers == {id(trainer)} and sorted(killed.terms) == [1, 2, 3, 4, 5]
    for path, seen in zip(killed.checkpoints, killed.weights, strict=True):
        saved = load_checkpoint(path)["model"]
        assert seen and all(torch.equal(saved[k], seen[k]) for k in seen)
    assert [p.name for p in killed.checkpoints] == [p.name for _, p in
                                                    list_checkpoints(ckpt_dir, "coarse")]
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    again = Trainer(cfg, "coarse", tmp_path / "b", store, device="cpu")
    assert again.resumed_from == 4
    assert again.run().step == 6
    a, b = _params(straight), _params(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


@slow
def test_detail_stage_starts_from_coarse_and_keeps_it_frozen(store, tmp_path):
    cfg = _cfg(**{"train.steps": 2, "train.checkpoint_every": 2})
    coarse = Trainer(cfg, "coarse", tmp_path / "c", store, device="cpu").run()
    with pytest.raises(ValueError, match="coarse checkpoint"):
        Trainer(cfg, "detail", tmp_path / "d", store, device="cpu")
    detail = Trainer(cfg, "detail", tmp_path / "d", store, device="cpu",
                     coarse_checkpoint=coarse.checkpoint)
    before = _params(detail)
    result = detail.run()
    assert result.step == 2 and result.checkpoint is not None
    after = _params(detail)
    coarse_keys = [k for k in before if k.startswith("coarse_encoder.")]
    detail_keys = [k for k in before if k.startswith(("detail_encoder.", "detail_decoder."))
                   and before[k].is_floating_point()]
    assert coarse_keys and all(torch.equal(before[k], after[k]) for k in coarse_keys)
    assert any(not torch.equal(before[k], after[k]) for k in detail_keys)
    ckpt = load_checkpoint(result.checkpoint, stage="detail")
    assert ckpt["coarse_checkpoint"] == str(coarse.checkpoint)
