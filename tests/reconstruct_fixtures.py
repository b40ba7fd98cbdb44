"""The tiny run every training, reconstruct, evaluate and end-to-end test starts from, and
helpers made with the project's own code: a synthetic set from ``recon.synth``, checkpoints
from ``recon.training`` (the trainer, or ``save_checkpoint`` of a freshly initialised model).
The shared fixtures built from them (``synth``, ``checkpoint``, ``e2e``) are in conftest.py."""
from __future__ import annotations

from pathlib import Path

import torch

from flows.config import WildfaceConfig, load_config
from recon.config import SynthConfig

# The demo head with few components, a small backbone and small images: seconds per step on
# 2 cores. Tests change what their assertion needs with overrides (``tiny_config(**extra)``).
TINY = {
    "face_model.n_shape": 10, "face_model.n_exp": 10, "face_model.n_tex": 5,
    "model.backbone": "mobilenet_v3_small", "model.hidden": 32, "model.image_size": 64,
    "model.uv_size": 32, "model.n_detail": 8,
    "loss.identity": 0.0, "loss.mrf": 0.0,
    "train.identities_per_batch": 2, "train.images_per_identity": 2,
    "train.detail_identities_per_batch": 2, "train.detail_images_per_identity": 2,
    "train.lr": 1e-3, "train.pretrain_steps": 0, "train.amp": False,
}


def tiny_tree() -> dict[str, dict]:
    """``TINY`` as a config file's tree: ``{section: {key: value}}``."""
    tree: dict[str, dict] = {}
    for key, value in TINY.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


# What an end-to-end run adds to ``TINY``: checkpoints, metrics and figures every step or two. A
# test module adds or changes sections with a module-level ``E2E_CONFIG`` (merged per section:
# its keys replace these).
E2E_EXTRA: dict[str, dict] = {
    "train": {"checkpoint_every": 2},
    "tracking": {"log_every": 1, "figure_every": 2, "figure_images": 2},
}


def e2e_tree(extra: dict[str, dict]) -> dict[str, dict]:
    """``TINY`` as a config file's tree, with ``E2E_EXTRA`` then ``extra`` merged per section."""
    tree = tiny_tree()
    for more in (E2E_EXTRA, extra):
        for section, values in more.items():
            tree.setdefault(section, {}).update(values)
    return tree


# Ray Train's controller settings for the tiny runs (it reads them from the driver's
# environment): it polls its workers every 0.5 s instead of 2 s (each stage's end and a dead
# worker are seen sooner), and starts no preemption watcher (one process per stage; nothing
# drains the nodes of a test's Ray).
RAY_TRAIN_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                      "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


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


def untrained_checkpoint(path: Path, cfg: WildfaceConfig | None = None, seed: int = 0,
                         stage: str = "detail") -> Path:
    """A ``stage`` checkpoint of a freshly initialised model (random networks)."""
    from recon.deca import DECA
    from recon.training.checkpoint import save_checkpoint

    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    model = DECA(cfg.face_model, cfg.model)
    return save_checkpoint(path, stage=stage, step=0, model=model.state_dict(),
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

