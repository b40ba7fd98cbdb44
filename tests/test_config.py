"""The typed configuration fails early and names the field."""
from __future__ import annotations

import pytest

from flows.config import ConfigError, WildfaceConfig, load_config


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, WildfaceConfig)
    assert cfg.face_model.path == "demo-head"


def test_yaml_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("face_model:\n  n_shape: 20\n")
    cfg = load_config(path, ["face_model.n_exp=10"])
    assert (cfg.face_model.n_shape, cfg.face_model.n_exp) == (20, 10)


def test_unknown_field_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("face_model:\n  n_shpe: 20\n")
    with pytest.raises(ConfigError, match=r"face_model\.n_shpe"):
        load_config(path)


def test_ill_typed_field_named():
    with pytest.raises(ConfigError, match=r"face_model\.n_shape"):
        load_config(None, ["face_model.n_shape=many"])


def test_an_invalid_config_names_overrides_by_key_only():
    """A refused config's message names its overrides without their values: one may carry a
    password (``--set services.database=postgresql://user:secret@host``)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["services.database=postgresql://user:s3cret@db.example:5432",
                           "face_model.n_shape=many"])
    assert "services.database" in str(err.value) and "face_model.n_shape" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["face_model.n_shape"])


def test_named_config_files_validate():
    from flows.config import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(path)


def test_learning_rate_schedules():
    const = load_config(None, ["train.lr=0.01", "train.steps=100"]).train
    assert {const.lr_at(s) for s in (0, 50, 100, 500)} == {0.01}
    cos = load_config(None, ["train.lr=0.01", "train.steps=100", "train.lr_schedule=cosine",
                             "train.lr_final_ratio=0.1"]).train
    assert cos.lr_at(0) == pytest.approx(0.01)
    assert cos.lr_at(50) == pytest.approx(0.0055)  # halfway: the mean of start and end
    assert cos.lr_at(100) == pytest.approx(0.001) and cos.lr_at(150) == pytest.approx(0.001)
    rates = [cos.lr_at(s) for s in range(101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # with a keypoint phase the cosine restarts where the codes start learning
    two = cos.model_copy(update={"keypoint_steps": 20})
    assert two.lr_at(0) == pytest.approx(0.01) and two.lr_at(10) == pytest.approx(0.0055)
    assert two.lr_at(20) == pytest.approx(0.01) and two.lr_at(60) == pytest.approx(0.0055)
    assert two.lr_at(100) == pytest.approx(0.001)
    with pytest.raises(ConfigError, match=r"train\.lr_schedule"):
        load_config(None, ["train.lr_schedule=linear"])


def test_stage_job_travels_as_json_and_a_bad_one_names_its_field():
    import json

    from flows.stage_job import StageJob, StageRun

    cfg = load_config(None, ["train.steps=7"])
    job = StageJob(stage="detail", config=cfg, data="/data/synth", coarse="/ckpt/coarse.pt",
                   mlflow=StageRun(tracking_uri="sqlite:////tmp/m.db", run_id="abc"))
    raw = json.loads(json.dumps(job.loop_config()))  # what Ray hands a worker: plain JSON
    back = StageJob.from_loop_config(raw)
    assert back == job and back.config.train.steps == 7
    bad = [({**raw, "stage": "fine"}, r"stage: Input should be 'coarse' or 'detail'"),
           ({**raw, "coarse": None}, r"coarse: .*the detail stage needs a coarse checkpoint"),
           ({**raw, "mlflow": {"tracking_uri": "sqlite:////tmp/m.db"}}, r"mlflow\.run_id: "),
           ({**raw, "steps": 7}, r"steps: Extra inputs"),  # the old untyped key
           ({**raw, "config": {**raw["config"], "train": {"lr": -1}}}, r"config\.train\.lr: ")]
    for job_dict, field in bad:
        with pytest.raises(ConfigError, match=r"invalid configuration \(stage job\):\n  " + field):
            StageJob.from_loop_config(job_dict)
    # a coarse stage needs no coarse checkpoint, and tracking is optional
    assert StageJob.from_loop_config({**raw, "stage": "coarse", "coarse": None,
                                      "mlflow": None}).mlflow is None
