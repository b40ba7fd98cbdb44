"""The ``pipeline`` flow: validation before work, and the whole chain on a tiny synthetic set
(preprocess -> coarse -> detail on Ray Train -> held-out evaluation -> registered version)."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import ConfigError

# Merged into the `e2e` fixture's tiny run (conftest.py): one Ray worker, a bigger synthetic set.
E2E_CONFIG = {
    "train": {"steps": 2, "pretrain_steps": 1},
    "ray": {"num_cpus": 2, "num_workers": 1, "cpus_per_worker": 1},
    "synth": {"identities": 6, "images_per_identity": 3, "image_size": 128},
}


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
def test_pipeline_end_to_end(e2e, prefect_server):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import _copy_tree, pipeline
    from recon.synth import generate

    root, uri = e2e.root, e2e.tracking_uri
    held = e2e.cfg.synth.model_copy(update={"identities": 2, "seed": 99})
    generate(root / "heldout", held, e2e.cfg.face_model)
    _copy_tree(e2e.data / "images", root / "input")
    out = pipeline(input=str(root / "input"), out=str(root / "out"),
                   config=str(e2e.config), overrides=[f"ray.storage_path={root / 'ray'}"],
                   heldout=str(root / "heldout"), use_ray_preprocess=False,
                   tracking_uri=uri)
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
    assert sorted(p.name for p in Path(root / "out" / "eval" / "meshes").glob("*.obj"))
    assert (root / "out" / "train" / "detail" / "figures" / "detail.png").is_file()
