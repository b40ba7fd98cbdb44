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


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["face_model.n_shape"])


def test_named_config_files_validate():
    from flows.config import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(path)
