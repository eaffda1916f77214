"""RetrainingTrigger: each condition, both metric directions, the minimum gap, reasons."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kiln.errors import ConfigError
from kiln.queue import RetrainingTrigger
from kiln.queue.triggers import metric_mode

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


def test_the_seed_example_fires_on_a_loss_that_rose_more_than_the_threshold():
    trigger = RetrainingTrigger(monitor_metric="val_loss", degradation_threshold=0.1,
                                min_days_between_retrains=7, drift_threshold=0.2)  # fmt: skip
    assert trigger.should_retrain({"val_loss": 0.42}, {"val_loss": 0.38}, drift_score=0.15)
    decision = trigger.decide({"val_loss": 0.42}, {"val_loss": 0.38}, drift_score=0.15)
    assert decision.fired == ["degradation"] and decision.degradation == pytest.approx(0.04 / 0.38)
    assert decision.reasons[0] == (
        "val_loss degraded +10.5% (0.38 -> 0.42, lower is better), threshold 10.0%"
    )
    assert "drift 0.150 < threshold 0.200" in decision.reasons


def test_a_loss_within_the_threshold_or_improving_does_not_fire():
    trigger = RetrainingTrigger()
    assert not trigger.should_retrain({"val_loss": 0.40}, {"val_loss": 0.38})
    decision = trigger.decide({"val_loss": 0.30}, {"val_loss": 0.38}, drift_score=0.05)
    assert not decision.retrain and decision.degradation < 0
    assert decision.reasons[-1] == "no condition fired"


def test_accuracy_degrades_when_it_falls():
    trigger = RetrainingTrigger(monitor_metric="val_accuracy", degradation_threshold=0.05)
    assert trigger.mode == "max"
    assert trigger.should_retrain({"val_accuracy": 0.80}, {"val_accuracy": 0.90})
    assert not trigger.should_retrain({"val_accuracy": 0.95}, {"val_accuracy": 0.90})
    reason = trigger.decide({"val_accuracy": 0.80}, {"val_accuracy": 0.90}).reasons[0]
    assert "higher is better" in reason and "+11.1%" in reason
    forced = RetrainingTrigger(monitor_metric="val_accuracy", mode="min")  # explicit mode wins
    assert forced.should_retrain({"val_accuracy": 0.99}, {"val_accuracy": 0.50})


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val_loss", "min"), ("perplexity", "min"), ("mae", "min"), ("val_accuracy", "max"),
     ("f1", "max"), ("auc", "max")],
)  # fmt: skip
def test_mode_follows_the_metric(metric, mode):
    assert metric_mode(metric) == mode


def test_drift_alone_fires():
    trigger = RetrainingTrigger(drift_threshold=0.2)
    decision = trigger.decide({"val_loss": 0.38}, {"val_loss": 0.38}, drift_score=0.25)
    assert decision.retrain and decision.fired == ["drift"]
    assert "drift 0.250 >= threshold 0.200" in decision.reasons


def test_a_recent_retrain_blocks_and_says_why():
    trigger = RetrainingTrigger(min_days_between_retrains=7)
    recent = (NOW - timedelta(days=2)).isoformat()
    decision = trigger.decide({"val_loss": 1.0}, {"val_loss": 0.5}, 0.9, recent, now=NOW)
    assert not decision.retrain and decision.blocked_by == "min_days"
    assert decision.fired == ["degradation", "drift"]
    assert decision.reasons[-1] == "retrained 2.0 days ago, minimum is 7"
    long_ago = NOW - timedelta(days=8)
    assert trigger.should_retrain({"val_loss": 1.0}, {"val_loss": 0.5}, None, long_ago, now=NOW)


def test_a_missing_metric_is_a_reason_not_a_crash():
    decision = RetrainingTrigger().decide({}, {"val_loss": 0.5}, drift_score=None)
    assert not decision.retrain
    assert decision.reasons[:2] == [
        "val_loss missing from the current metrics",
        "no drift score given",
    ]


def test_bad_settings_are_all_reported():
    with pytest.raises(ConfigError) as info:
        RetrainingTrigger(monitor_metric="", degradation_threshold=-1, min_days_between_retrains="7",
                          drift_threshold=1.5, mode="up")  # fmt: skip
    assert len(info.value.errors) == 5
    assert "drift_threshold=1.5 must be in (0, 1]" in str(info.value)
