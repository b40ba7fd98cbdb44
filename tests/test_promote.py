"""Promotion: the pure rule, then the registry I/O against a real MLflow store."""
from __future__ import annotations

import getpass
import math
import socket
from pathlib import Path

import pytest

from infra.offline import apply_offline_env

apply_offline_env()

from flows.promote import decide, promote_version  # noqa: E402
from recon.evaluation.config import PromotionConfig  # noqa: E402

MODEL = "wildface-deca-test"


@pytest.mark.parametrize("challenger,champion,margin,lower,has,expected", [
    (1.10, 1.20, 0.0, True, True, True),     # better
    (1.30, 1.20, 0.0, True, True, False),    # worse
    (1.20, 1.20, 0.0, True, True, False),    # a tie is not a win
    (1.15, 1.20, 0.05, True, True, False),   # better, but not by more than the margin
    (1.14, 1.20, 0.05, True, True, True),
    (0.80, 0.70, 0.0, False, True, True),    # higher is better
    (0.60, 0.70, 0.0, False, True, False),
    (1.50, None, 0.0, True, False, True),    # no champion yet
    (1.50, math.nan, 0.0, True, True, True),  # champion never measured
    (None, 1.20, 0.0, True, True, False),    # challenger never measured
    (math.nan, None, 0.0, True, False, False),
])
def test_decide(challenger, champion, margin, lower, has, expected):
    promoted, reason = decide(challenger, champion, margin=margin, lower_is_better=lower, has_champion=has)
    assert promoted is expected and reason


@pytest.mark.parametrize("challenger,baseline,champion,has,expected,why", [
    (2.16, 1.70, None, False, False, "not better than the mean face"),  # worse than no model
    (1.70, 1.70, None, False, False, "not better than the mean face"),  # a tie is no knowledge
    (1.60, 1.70, None, False, True, "no champion yet"),
    (1.60, 1.70, 1.65, True, True, "better by"),
    (1.60, 1.70, 1.50, True, False, "over the champion"),
    (1.60, None, None, False, False, "no mean-face baseline"),
    (1.60, math.nan, None, False, False, "no mean-face baseline"),
])
def test_decide_requires_beating_the_mean_face(challenger, baseline, champion, has, expected, why):
    promoted, reason = decide(challenger, champion, margin=0.0, has_champion=has,
                              baseline=baseline, needs_baseline=True)
    assert promoted is expected and why in reason
    # with a margin, the mean face must be beaten by more than it, too
    assert not decide(1.60, None, margin=0.1, has_champion=False, baseline=1.70,
                      needs_baseline=True)[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite tracking store for the module (creating one takes seconds)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("now-eval", artifact_location=(root / "artifacts").as_uri())
    return root, uri, client, exp


def _model_folder(src: Path) -> dict[str, Path]:
    """The smallest folder a promotion checks: an MLmodel naming a checkpoint (finite weights
    of the checkpoint format), a config and a face model (never read by the promotion)."""
    import torch

    from recon.training.checkpoint import FORMAT_VERSION

    (src / "artifacts").mkdir(parents=True)
    files = {"MLmodel": src / "MLmodel", "checkpoint": src / "artifacts" / "detail-000000001.pt",
             "config": src / "artifacts" / "config.json",
             "face_model": src / "artifacts" / "face_model.npz"}
    files["MLmodel"].write_text("flavors:\n  python_function:\n    artifacts:\n" + "".join(
        f"      {k}: {{path: {v.relative_to(src)}}}\n" for k, v in files.items()
        if k != "MLmodel"))
    torch.save({"format": FORMAT_VERSION, "stage": "detail", "step": 1,
                "model": {"w": torch.zeros(2)}}, files["checkpoint"])
    files["config"].write_text("{}")
    files["face_model"].write_bytes(b"unused")
    return files


@pytest.fixture()
def registry(store, request):
    """A fresh registered model per test; ``add_version(median)`` registers a version whose
    run logged ``now_median``, with its files' sha256 recorded as registration records them,
    and ``now_mean_face_median`` (``baseline``: the mean face's, 2.0 unless given), with its
    files' sha256 recorded as registration records them, and gives it the challenger alias."""
    from flows.registry import model_checksums

    root, uri, client, exp = store
    name = f"{MODEL}-{request.node.name}".replace("[", "-").replace("]", "")
    client.create_registered_model(name)

    def add_version(median: float | None, baseline: float = 2.0) -> str:
        run = client.create_run(exp)
        if median is not None:
            client.log_metric(run.info.run_id, "now_median", median)
        client.log_metric(run.info.run_id, "now_mean_face_median", baseline)
        client.set_terminated(run.info.run_id)
        src = root / "models" / run.info.run_id
        record = model_checksums(_model_folder(src))
        mv = client.create_model_version(name, source=src.as_uri(), run_id=run.info.run_id,
                                         tags=record)
        client.set_registered_model_alias(name, "challenger", mv.version)
        return str(mv.version)

    return name, uri, client, add_version


@pytest.mark.slow
def test_better_challenger_promoted_worse_not(registry):
    MODEL, _, client, add_version = registry
    cfg = PromotionConfig(margin=0.05)

    v0 = add_version(1.50, baseline=1.52)  # no champion, but no better than the mean face
    d0 = promote_version(client, MODEL, cfg)
    assert not d0.promoted and "mean face" in d0.reason
    assert client.get_model_version(MODEL, v0).tags["promotion.baseline_value"] == "1.52"

    v1 = add_version(1.50)
    d1 = promote_version(client, MODEL, cfg)
    assert d1.promoted and d1.champion_version is None and d1.reason.endswith("no champion yet")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v1

    v2 = add_version(1.30)  # better by 0.20 > 0.05
    d2 = promote_version(client, MODEL, cfg)
    assert d2.promoted and (d2.challenger_value, d2.champion_value) == (1.30, 1.50)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v2
    moved = client.get_model_version(MODEL, v2).tags  # who moved the alias, and from where
    assert moved["alias.champion.set_by"] == f"{getpass.getuser()}@{socket.gethostname()}"
    assert moved["alias.champion.previous"] == v1 and moved["alias.champion.set_at"]

    v3 = add_version(1.27)  # better by 0.03, within the margin
    d3 = promote_version(client, MODEL, cfg)
    assert not d3.promoted
    v4 = add_version(1.90)  # worse
    d4 = promote_version(client, MODEL, cfg)
    assert not d4.promoted
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v2

    # decision and both numbers are recorded on each challenger version
    for v, decision, ch, champ in ((v2, "promoted", "1.3", "1.5"), (v3, "rejected", "1.27", "1.3"),
                                   (v4, "rejected", "1.9", "1.3")):
        mv = client.get_model_version(MODEL, v)
        assert mv.tags["promotion.decision"] == decision
        assert mv.tags["promotion.challenger_value"] == ch
        assert mv.tags["promotion.champion_value"] == champ
        assert mv.tags["promotion.metric"] == "now_median"
        assert f"promotion: {decision}" in mv.description and ch in mv.description
    assert client.get_model_version(MODEL, v3).tags["promotion.champion_version"] == v2

    # rerunning on the champion itself changes nothing
    d5 = promote_version(client, MODEL, cfg, version=v2)
    assert not d5.promoted and "already" in d5.reason


@pytest.mark.slow
def test_unmeasured_challenger_is_never_promoted(registry):
    MODEL, _, client, add_version = registry
    add_version(None)
    d = promote_version(client, MODEL, PromotionConfig())
    assert not d.promoted and d.challenger_value is None
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(MODEL, "champion")


@pytest.mark.slow
def test_promote_flow_runs_in_prefect(registry, prefect_server, tmp_path, monkeypatch):
    from flows.config import load_config
    from flows.promote import promote

    MODEL, uri, client, add_version = registry
    add_version(1.4)
    v2 = add_version(1.2)
    client.set_registered_model_alias(MODEL, "champion", "1")
    cfg = load_config(overrides={"tracking.uri": uri, "tracking.registered_model": MODEL,
                                 "promotion.margin": 0.1})
    result = promote(cfg=cfg)
    assert result["promoted"] and result["challenger_version"] == v2
    assert result["champion_value"] == pytest.approx(1.4)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v2


def test_the_demo_says_plainly_whether_the_model_beat_the_mean_face():
    from flows.pipeline import gate_sentence

    worse = {"promoted": False, "reason": "not better than the mean face", "metric": "now_median",
             "lower_is_better": True, "challenger_value": 2.16, "baseline_value": 1.70}
    assert "no better than the mean face" in gate_sentence(worse)
    assert "refused" in gate_sentence(worse) and "2.16 vs 1.7" in gate_sentence(worse)
    better = dict(worse, promoted=True, challenger_value=1.2)
    assert "learned something" in gate_sentence(better) and "champion" in gate_sentence(better)
    unmeasured = dict(worse, challenger_value=None, reason="challenger has no value")
    assert "could not judge" in gate_sentence(unmeasured)
