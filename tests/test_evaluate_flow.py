"""`wildface evaluate predict` writes a NoW-layout set that `evaluate now` scores; the
`evaluate` flow scores a registered version and logs to its run; `promote` and `retrain`
deployments are in prefect.yaml with the configured cron."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reconstruct_fixtures import tiny_config

REPO = Path(__file__).resolve().parent.parent
FAST_NOW = ["evaluation.workers=1", "evaluation.refine_iters=3"]




def test_predict_writes_a_now_set_that_evaluate_now_scores(synth, checkpoint, tmp_path):
    from typer.testing import CliRunner

    from flows.cli.main import app
    from recon.evaluation.now_io import image_list_path, read_image_list, read_landmarks, read_mesh

    runner = CliRunner()
    preds = tmp_path / "preds"
    res = runner.invoke(app, ["evaluate", "predict", "--model", str(checkpoint), "--dataset",
                              str(synth / "now"), "--out", str(preds)])
    assert res.exit_code == 0, res.output
    images = read_image_list(image_list_path(synth / "now", "val"))
    assert "4 written" in res.output and len(images) == 4
    for im in images:
        stem = preds / im.subject / im.challenge_dir / Path(im.rel_path).stem
        verts, faces = read_mesh(stem.with_suffix(".obj"))
        assert verts.shape[1] == 3 and faces.shape[1] == 3
        assert read_landmarks(stem.with_suffix(".npy")).shape == (7, 3)
    res = runner.invoke(app, ["evaluate", "now", "--dataset", str(synth / "now"),
                              "--predictions", str(preds), "--out", str(tmp_path / "score"),
                              *sum((["--set", s] for s in FAST_NOW), [])])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "score" / "metrics.json").read_text())
    assert metrics["n_images"] == 4 and metrics["n_missing"] == 0
    assert 0 < metrics["median"] <= metrics["mean"] + 1e-9 < 100  # mm, a plausible head error
    # reruns keep what exists
    res = runner.invoke(app, ["evaluate", "predict", "--model", str(checkpoint), "--dataset",
                              str(synth / "now"), "--out", str(preds)])
    assert "0 written, 4 kept" in res.output


def test_deployments_and_schedule_match_the_config():
    from flows.config import load_config

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_flow = {d["entrypoint"].split(":")[1]: d for d in spec["deployments"]}
    assert {"evaluate", "promote", "retrain"} <= set(by_flow)
    cfg = load_config(None)
    schedule = by_flow["retrain"]["schedules"][0]
    assert schedule["cron"] == cfg.retrain.cron and schedule["timezone"] == cfg.retrain.timezone
    for name in ("evaluate", "promote", "retrain"):  # entrypoints resolve
        module, func = by_flow[name]["entrypoint"].split(":")
        assert (REPO / module).is_file() and f"def {func}(" in (REPO / module).read_text()


@pytest.mark.slow
def test_evaluate_flow_logs_to_the_model_versions_run(synth, checkpoint, prefect_server,
                                                       tmp_path):
    """Register the model in a sqlite MLflow store, run the flow on it by alias, find the
    NoW metrics and the curve on the version's run; promote then makes it champion."""
    from mlflow.tracking import MlflowClient

    from flows import registry, tracking
    from flows.evaluate import evaluate
    from flows.promote import promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(**{"tracking.uri": uri, "evaluation.workers": 1,
                         "evaluation.refine_iters": 3})
    exp_id = tracking.setup(uri, cfg.tracking.experiment)
    client = MlflowClient(uri, uri)
    run_id = client.create_run(exp_id, run_name="detail").info.run_id
    model_uri = registry.log_reconstructor(uri, cfg, run_id=run_id,
                                           detail_checkpoint=str(checkpoint),
                                           coarse_checkpoint=str(checkpoint))
    version = registry.register_model(uri, cfg, model_uri, run_id=run_id, data=str(synth))

    result = evaluate(model="models:/wildface-deca@challenger", dataset=str(synth / "now"),
                      out=str(tmp_path / "eval"), cfg=cfg, tracking_uri=uri)
    decision = promote(cfg=cfg)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["now_median"] == pytest.approx(result["metrics"]["now_median"])
    assert {"now_mean", "now_std", "now_n_images"} <= set(metrics)
    assert metrics["now_n_images"] == 4
    logged = [f.path for f in client.list_artifacts(run_id, "evaluation/now")]
    assert "evaluation/now/cumulative_curve.png" in logged
    mv = client.get_model_version(cfg.tracking.registered_model, version["version"])
    assert float(mv.tags["metric.now_median"]) == pytest.approx(metrics["now_median"], rel=1e-5)
    assert result["model"]["version"] == version["version"]

    # The gate compares with the mean face measured on the same images: the decision follows
    # the logged numbers (this briefly trained model may or may not beat it).
    assert decision["challenger_value"] == pytest.approx(metrics["now_median"])
    assert decision["baseline_value"] == pytest.approx(metrics["now_mean_face_median"])
    assert metrics["now_mean_face_median"] > 0
    assert decision["promoted"] == (metrics["now_median"] < metrics["now_mean_face_median"])
    if not decision["promoted"]:
        assert "mean face" in decision["reason"]
        decision = promote(cfg=cfg.model_copy(update={"promotion": cfg.promotion.model_copy(
            update={"baseline_metric": None})}))
        assert decision["promoted"]
    champion = client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert str(champion.version) == version["version"]

    # the registered model carries its face model: another one is refused
    from flows.registry import load_reconstructor
    from recon.inference.reconstruct import FaceModelMismatch
    from tiny_face_model import tiny_face_assets

    other = tiny_face_assets().save_npz(tmp_path / "grid.npz")
    with pytest.raises(FaceModelMismatch):
        load_reconstructor("models:/wildface-deca@champion", face_model=str(other),
                           directory=tmp_path / "dl", tracking_uri=uri)
    loaded = load_reconstructor(f"models:/wildface-deca/{version['version']}",
                                directory=tmp_path / "dl2", tracking_uri=uri)
    assert loaded.info.source["run_id"] == run_id


@pytest.mark.slow
def test_retrain_without_new_photos_does_not_train(prefect_server, tmp_path):
    from flows.retrain import retrain

    (tmp_path / "photos").mkdir()
    result = retrain(input=str(tmp_path / "photos"), out=str(tmp_path / "out"),
                     use_ray_preprocess=False)
    assert result["skipped"] == "0 new photo(s)"
    assert retrain(out=str(tmp_path / "out"))["skipped"] == "no input location"
