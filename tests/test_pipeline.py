"""The ``pipeline`` flow: validation before work, and the whole chain on a tiny synthetic set
(preprocess -> coarse -> detail on Ray Train -> held-out evaluation -> registered version)."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import ConfigError

TINY = """
face_model: {n_shape: 20, n_exp: 10, n_tex: 10}
model: {backbone: mobilenet_v3_small, hidden: 32, image_size: 64, uv_size: 32, n_detail: 8}
loss: {identity: 0.0, mrf: 0.0}
train: {identities_per_batch: 2, images_per_identity: 2, detail_identities_per_batch: 2,
        detail_images_per_identity: 2, steps: 2, pretrain_steps: 1, checkpoint_every: 2,
        amp: false, lr: 1.0e-3}
ray: {num_cpus: 2, num_workers: 1, cpus_per_worker: 1}
tracking: {log_every: 1, figure_every: 2, figure_images: 2}
synth: {identities: 6, images_per_identity: 3, image_size: 128}
"""


def test_pipeline_validates_config_before_any_work(tmp_path):
    from flows.pipeline import pipeline

    with pytest.raises(ConfigError, match="train.steps"):
        pipeline.fn(input=str(tmp_path / "none"), out=str(tmp_path / "out"),
                    detail_overrides=["train.steps=-1"])
    with pytest.raises(ConfigError, match="ray.num_wokers"):
        pipeline.fn(input=str(tmp_path / "none"), out=str(tmp_path / "out"),
                    overrides=["ray.num_wokers=2"])
    with pytest.raises(ValueError, match="not a `wildface synth` folder"):
        pipeline.fn(input=str(tmp_path / "none"), out=str(tmp_path / "out"),
                    heldout=str(tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    import ray
    import torch
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.config import load_config
    from flows.pipeline import _copy_tree, pipeline
    from recon.synth import generate

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    cfg = load_config(config)
    torch.set_num_threads(2)
    generate(tmp_path / "synth", cfg.synth, cfg.face_model)
    held = cfg.synth.model_copy(update={"identities": 2, "seed": 99})
    generate(tmp_path / "heldout", held, cfg.face_model)
    _copy_tree(tmp_path / "synth" / "images", tmp_path / "input")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        with prefect_test_harness(server_startup_timeout=300):
            out = pipeline(input=str(tmp_path / "input"), out=str(tmp_path / "out"),
                           config=str(config), overrides=[f"ray.storage_path={tmp_path / 'ray'}"],
                           heldout=str(tmp_path / "heldout"), use_ray_preprocess=False,
                           tracking_uri=uri)
    finally:
        ray.shutdown()
    assert out["preprocess"]["shards_written"] >= 1
    assert out["coarse"]["step"] == 2 and out["detail"]["step"] == 2
    ev = out["evaluation"]
    assert ev["heldout_images"] == 6
    assert 0 < ev["heldout_shape_error_median_mm"] < 100
    assert ev["heldout_mean_shape_error_mm"] > 0
    assert ev["now_n_images"] == 6 and ev["now_median"] > 0  # the NoW protocol on HELDOUT/now

    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias("wildface-deca", "challenger")
    assert str(version.version) == out["model"]["version"]
    assert float(version.tags["metric.heldout_shape_error_median_mm"]) == \
        pytest.approx(ev["heldout_shape_error_median_mm"], rel=1e-4)
    run = client.get_run(version.run_id)
    assert run.data.metrics["heldout_shape_error_median_mm"] == \
        pytest.approx(ev["heldout_shape_error_median_mm"])
    assert run.data.tags["wildface.manifest_sha256"] == version.tags["manifest_sha256"] != "none"
    assert sorted(p.name for p in Path(tmp_path / "out" / "eval" / "meshes").glob("*.obj"))
    assert (tmp_path / "out" / "train" / "detail" / "figures" / "detail.png").is_file()
