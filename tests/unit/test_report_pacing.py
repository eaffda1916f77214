"""Which epochs reach ray.train.report from worker actors (kiln.engine.worker._ReportPacer)."""

from __future__ import annotations

import pytest

from kiln.engine import worker


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(worker.time, "monotonic", clock)
    # One process stands for every rank: agreement is the local decision.
    monkeypatch.setattr(worker, "_agree", lambda flag, distributed: flag)
    return clock


def _reported(pacer, clock, epoch_seconds, epochs):
    out = []
    for epoch in range(1, epochs + 1):
        clock.now += epoch_seconds
        if pacer.due(last_epoch=epoch == epochs):
            out.append(epoch)
    return out


def test_in_process_runs_report_every_epoch(clock):
    pacer = worker._ReportPacer(5.0, distributed=False)
    assert _reported(pacer, clock, 0.01, 6) == [1, 2, 3, 4, 5, 6]


def test_actors_report_at_most_once_per_interval_and_always_the_last_epoch(clock):
    pacer = worker._ReportPacer(0.25, distributed=True)
    # 0.1 s epochs: every third epoch is 0.3 s after the previous report.
    assert _reported(pacer, clock, 0.1, 10) == [3, 6, 9, 10]


def test_epochs_longer_than_the_interval_are_all_reported(clock):
    pacer = worker._ReportPacer(0.25, distributed=True)
    assert _reported(pacer, clock, 0.5, 4) == [1, 2, 3, 4]


def test_zero_interval_reports_every_epoch(clock):
    pacer = worker._ReportPacer(0.0, distributed=True)
    assert _reported(pacer, clock, 0.01, 3) == [1, 2, 3]


def test_default_interval_is_the_controller_poll(clock, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    assert worker._ReportPacer(None, distributed=True).interval == 0.5
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "not-a-number")
    from ray.train.v2._internal.constants import DEFAULT_HEALTH_CHECK_INTERVAL_S

    assert worker._ReportPacer(None, distributed=True).interval == DEFAULT_HEALTH_CHECK_INTERVAL_S
