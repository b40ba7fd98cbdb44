"""Small models for the reconstruct / animate / evaluate tests, made with the project's own
code: a synthetic set from ``recon.synth``, checkpoints from ``recon.training`` (the trainer,
or ``save_checkpoint`` of a freshly initialised model). Imported by test modules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flows.config import WildfaceConfig, load_config
from recon.config import SynthConfig

# The demo head with few components, a small backbone and small images: seconds per step.
TINY = {
    "face_model.n_shape": 10, "face_model.n_exp": 10, "face_model.n_tex": 5,
    "model.backbone": "resnet18", "model.hidden": 32, "model.image_size": 64,
    "model.uv_size": 32, "model.n_detail": 8,
    "loss.identity": 0.0, "loss.mrf": 0.0,
    "train.identities_per_batch": 2, "train.images_per_identity": 2,
    "train.detail_identities_per_batch": 2, "train.detail_images_per_identity": 2,
    "train.lr": 2e-3, "train.pretrain_steps": 0, "train.amp": False,
}


def tiny_config(**extra) -> WildfaceConfig:
    return load_config(None, {**TINY, **extra})


def make_synth(root: Path, identities: int = 4, images: int = 4, seed: int = 3,
               size: int = 96) -> Path:
    """A ``wildface synth`` folder (no occluders, no selfies: plain weak-perspective faces)."""
    from recon.synth import generate

    generate(root, SynthConfig(identities=identities, images_per_identity=images,
                               image_size=size, seed=seed, occluder_probability=0.0,
                               selfie_probability=0.0, batch_size=8))
    return root


def untrained_checkpoint(path: Path, cfg: WildfaceConfig | None = None, seed: int = 0) -> Path:
    """A detail-stage checkpoint of a freshly initialised model (random networks)."""
    from recon.deca import DECA
    from recon.training.checkpoint import save_checkpoint

    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    model = DECA(cfg.face_model, cfg.model)
    return save_checkpoint(path, stage="detail", step=0, model=model.state_dict(),
                           optimizer={}, config_json=cfg.model_dump_json(),
                           face_model=model.face_model_name)


def train_tiny(out: Path, synth: Path, coarse_steps: int, detail_steps: int = 2,
               cfg: WildfaceConfig | None = None) -> Path:
    """Coarse then detail stage with the project's trainer; returns the detail checkpoint."""
    from recon.synth import iter_samples
    from recon.training.data import SampleStore
    from recon.training.trainer import Trainer

    cfg = cfg or tiny_config()
    store = SampleStore.from_samples(iter_samples(synth))
    c_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"steps": coarse_steps, "checkpoint_every": max(1, coarse_steps)})})
    coarse = Trainer(c_cfg, "coarse", out / "coarse", store, device="cpu").run()
    d_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"steps": detail_steps, "checkpoint_every": max(1, detail_steps)})})
    detail = Trainer(d_cfg, "detail", out / "detail", store, device="cpu",
                     coarse_checkpoint=coarse.checkpoint).run()
    return Path(detail.checkpoint)


# Shared module-scoped fixtures: a tiny synthetic set and an untrained checkpoint.
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synth(tmp_path_factory.mktemp("synth"), identities=2, images=2, size=96)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("model") / "detail-000000000.pt")
