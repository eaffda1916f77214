"""Drift (JS divergence of profiles), MetricsEngine alerts and confidence, MetricsTracker."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from kiln.errors import ConfigError, KilnError
from kiln.tracking import (
    AlertConfig,
    ExperimentDB,
    MetricsEngine,
    MetricsTracker,
    compare_profiles,
    compute_profile,
    js_divergence,
)


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def test_js_divergence_bounds():
    assert js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert 0 < js_divergence([3, 1], [1, 3]) < 1
    with pytest.raises(ValueError, match="length"):
        js_divergence([1, 2], [1, 2, 3])


def test_profile_is_json_and_has_fixed_edges(rng):
    x = rng.normal(size=(500, 3))
    profile = compute_profile(x, predictions=rng.normal(size=(500, 4)), bins=8,
                              feature_names=["a", "b", "c"])  # fmt: skip
    assert json.loads(json.dumps(profile)) == profile
    assert set(profile["features"]) == {"a", "b", "c"}
    feat = profile["features"]["a"]
    assert len(feat["edges"]) == 9 and len(feat["counts"]) == 10  # + under/overflow
    assert sum(feat["counts"]) == 500 and feat["counts"][0] == feat["counts"][-1] == 0
    assert profile["predictions"]["kind"] == "class"
    assert sum(profile["predictions"]["counts"]) == 500


def test_drift_identical_shifted_and_disjoint(rng):
    ref = compute_profile(rng.normal(size=(5000, 3)), feature_names=["a", "b", "c"])
    same = compare_profiles(ref, rng.normal(size=(5000, 3)))
    assert same.status == "healthy" and same.js_divergence < 0.02
    assert same.affected_features == []

    shifted_x = rng.normal(size=(5000, 3))
    shifted_x[:, 1] += 1.0
    shifted = compare_profiles(ref, shifted_x, warning=0.1, critical=0.5)
    assert shifted.affected_features == ["b"]
    assert shifted.status == "warning"
    assert shifted.details["b"] > 0.1 > shifted.details["a"]
    assert shifted.mean_divergence < shifted.js_divergence

    disjoint = compare_profiles(ref, rng.normal(size=(5000, 3)) + 100)
    assert disjoint.status == "critical"
    assert disjoint.js_divergence == pytest.approx(1.0)
    assert all(0 <= v <= 1 for v in disjoint.details.values())
    assert set(disjoint.affected_features) == {"a", "b", "c"}


def test_prediction_drift_is_scored(rng):
    x = rng.normal(size=(1000, 2))
    ref = compute_profile(x, predictions=np.zeros(1000, dtype=np.int64))
    from kiln.tracking.drift import profile_like

    cur = profile_like(ref, x, predictions=np.ones(1000, dtype=np.int64))
    drift = compare_profiles(ref, cur)
    assert drift.details["predictions"] == pytest.approx(1.0)
    assert drift.affected_features == ["predictions"]


def test_profiles_with_other_edges_are_refused(rng):
    ref = compute_profile(rng.normal(size=(100, 2)))
    other = compute_profile(rng.normal(size=(100, 2)) * 5)
    with pytest.raises(ValueError, match="bin edges"):
        compare_profiles(ref, other)


def test_image_inputs_are_reduced_to_chunks(rng):
    profile = compute_profile(rng.random((2000, 1, 28, 28)), max_features=16)
    assert profile["reduction"] == "chunk_mean" and len(profile["features"]) == 16
    assert compare_profiles(profile, rng.random((2000, 1, 28, 28))).status == "healthy"
    brighter = rng.random((2000, 1, 28, 28)) + 0.1
    assert compare_profiles(profile, brighter).status == "critical"


def test_engine_log_epoch_returns_drift_and_stores_metrics(rng):
    engine = MetricsEngine(drift_threshold_warning=0.1, drift_threshold_critical=0.2)
    ref = compute_profile(rng.normal(size=(2000, 2)))
    drift = engine.log_epoch(0, {"loss": 1.0}, {"loss": 0.9, "accuracy": 0.5}, 1e-3, 0.5, 2.0,
                             reference_profile=ref, current_profile=rng.normal(size=(2000, 2)) + 5)  # fmt: skip
    assert drift.status == "critical"
    assert engine.log_epoch(1, {"loss": 0.8}, {"loss": 0.7}) is None
    summary = engine.get_summary()
    assert summary["val_loss"]["best"] == 0.7 and summary["val_loss"]["best_epoch"] == 1
    assert summary["drift_js_divergence"]["last"] == pytest.approx(drift.js_divergence)
    assert summary["learning_rate"]["last"] == 1e-3


def test_alerts_fire_on_spike_drop_and_gradient_norm_with_patience():
    engine = MetricsEngine(alert_config=AlertConfig(
        val_loss_spike_threshold=0.2, accuracy_drop_threshold=0.05,
        gradient_norm_threshold=5.0, patience_epochs=2))  # fmt: skip
    engine.log_epoch(0, {"loss": 1}, {"loss": 1.0, "accuracy": 0.8}, gradient_norm=1.0)
    engine.log_epoch(1, {"loss": 1}, {"loss": 1.5, "accuracy": 0.7}, gradient_norm=9.0)
    assert not engine.has_alerts()  # one bad epoch < patience 2
    engine.log_epoch(2, {"loss": 1}, {"loss": 1.6, "accuracy": 0.7}, gradient_norm=9.0)
    alerts = engine.get_alerts()
    assert {a["type"] for a in alerts} == {"val_loss_spike", "accuracy_drop", "gradient_norm"}
    assert all(a["epoch"] == 2 and "message" in a and "value" in a for a in alerts)
    engine.get_alerts(clear=True)
    engine.log_epoch(3, {"loss": float("nan")}, {"loss": 1.0, "accuracy": 0.8})
    assert [a["type"] for a in engine.get_alerts()] == ["non_finite_loss"]


def test_healthy_training_raises_no_alerts():
    engine = MetricsEngine()
    for epoch, loss in enumerate([1.0, 0.8, 0.6, 0.5]):
        engine.log_epoch(epoch, {"loss": loss}, {"loss": loss, "accuracy": 1 - loss / 2},
                         gradient_norm=1.0)  # fmt: skip
    assert not engine.has_alerts() and engine.get_alerts() == []


def test_bad_engine_settings_are_collected():
    with pytest.raises(ConfigError) as info:
        MetricsEngine(gradient_accumulation_steps=0, drift_threshold_warning=0.5,
                      drift_threshold_critical=0.2)  # fmt: skip
    assert len(info.value.errors) == 2
    with pytest.raises(ConfigError, match="patience_epochs"):
        AlertConfig(patience_epochs=0)


def test_wandb_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(KilnError, match="pip install wandb"):
        MetricsEngine(use_wandb=True)


def test_log_confidence_top1_top5_entropy():
    engine = MetricsEngine()
    uniform = np.zeros((4, 10))
    out = engine.log_confidence(uniform, labels=np.arange(4))
    assert out["top1_confidence"] == pytest.approx(0.1)
    assert out["top5_confidence"] == pytest.approx(0.5)
    assert out["entropy"] == pytest.approx(math.log(10))
    sure = np.full((2, 3), -50.0)
    sure[:, 2] = 50.0
    out = engine.log_confidence(sure, labels=np.array([2, 0]))
    assert out["top1_confidence"] == pytest.approx(1.0)
    assert out["top5_confidence"] == pytest.approx(1.0)  # k = min(5, 3)
    assert out["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert out["top1_accuracy"] == 0.5 and out["top5_accuracy"] == 1.0


def test_log_confidence_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    out = MetricsEngine().log_confidence(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    assert out["top1_confidence"] == pytest.approx(0.25)


def test_log_scalar_uses_optimizer_steps():
    engine = MetricsEngine(gradient_accumulation_steps=4)
    for step in range(8):
        engine.log_scalar("train/batch_loss", float(step), step=step)
    rows = engine.tracker.rows()
    assert sorted(set(rows["step"])) == [0, 1]


def test_tracker_update_and_summary_in_memory():
    tracker = MetricsTracker()
    tracker.update({"loss": 1.0, "acc": 0.5})
    tracker.update({"loss": 0.5, "acc": 0.7})
    tracker.update({"loss": 0.7, "acc": 0.6}, step=10)
    summary = tracker.get_summary()
    assert summary["loss"] == {"last": 0.7, "min": 0.5, "max": 1.0, "mean": pytest.approx(2.2 / 3),
                               "count": 3, "best": 0.5, "best_epoch": None, "mode": "min"}  # fmt: skip
    assert summary["acc"]["best"] == 0.7 and summary["acc"]["mode"] == "max"
    assert list(tracker.rows()["step"]) == [0, 0, 1, 1, 10, 10]


def test_tracker_log_epoch_history_seed_002_style():
    tracker = MetricsTracker()
    tracker.log_epoch(0, {"loss": 0.9}, {"loss": 0.8}, learning_rate=1e-3, gradient_norm=0.5)
    tracker.log_epoch(1, {"loss": 0.6}, {"loss": 0.7}, learning_rate=1e-4)
    summary = tracker.get_summary()
    assert summary["val_loss"]["best_epoch"] == 1
    table = summary[["epoch", "train_loss", "val_loss"]]
    assert list(table["epoch"]) == [0, 1] and list(table["train_loss"]) == [0.9, 0.6]


def test_tracker_and_engine_share_the_experiment_db(tmp_path):
    db = ExperimentDB(tmp_path / "kiln.db")
    run_id = db.log_run("r")
    engine = MetricsEngine(db=db, run_id=run_id)
    engine.log_epoch(0, {"loss": 1.0}, {"loss": 0.9, "accuracy": 0.5})
    engine.log_epoch(1, {"loss": 0.7}, {"loss": 0.6, "accuracy": 0.6})
    metrics = db.get_metrics(run_id)
    assert set(metrics["name"]) == {"train_loss", "val_loss", "val_accuracy"}
    assert db.get_best_run("val_loss")["epoch"] == 1
    # a second tracker over the same run sees the same rows: one store, not two
    again = MetricsTracker(db=db, run_id=run_id).get_summary()
    assert again["val_accuracy"]["best"] == 0.6
    with pytest.raises(ValueError, match="db and run_id go together"):
        MetricsTracker(db=db)
