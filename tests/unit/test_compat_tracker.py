"""MetricsTracker with ``use_wandb``: one W&B run, started once (or the active one joined)."""

from __future__ import annotations

import sys
import types

import pytest


class _FakeRun:
    def __init__(self, project):
        self.project, self.rows, self.finished = project, [], False

    def log(self, values, step=None):
        self.rows.append((step, dict(values)))

    def finish(self):
        self.finished = True


@pytest.fixture()
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.run = None
    module.inits = []

    def init(project=None, **kwargs):
        module.run = _FakeRun(project)
        module.inits.append(project)
        return module.run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_tracker_starts_one_wandb_run_and_finishes_it(fake_wandb):
    from kiln.tracking import MetricsTracker

    tracker = MetricsTracker(use_wandb=True, wandb_project="kiln-tests")
    tracker.update({"loss": 1.0})
    tracker.log_epoch(1, {"loss": 0.5}, {"loss": 0.6})
    assert fake_wandb.inits == ["kiln-tests"]  # init once, before the first log
    run = fake_wandb.run
    assert run.rows == [
        (0, {"loss": 1.0}),
        (None, {"train_loss": 0.5, "val_loss": 0.6, "epoch": 1}),
    ]
    tracker.close()
    assert run.finished


def test_tracker_joins_an_active_wandb_run(fake_wandb):
    from kiln.tracking import MetricsTracker

    active = fake_wandb.init(project="mine")
    tracker = MetricsTracker(use_wandb=True)
    tracker.update({"acc": 0.9}, step=3)
    tracker.close()
    assert fake_wandb.inits == ["mine"] and active.rows == [(3, {"acc": 0.9})]
    assert not active.finished  # the caller's run stays open
