"""kiln.tune.search on a real local Ray: ASHA stops losers, presets, resources, resume."""

from __future__ import annotations

import os
import signal

import pytest
from ray import tune

from kiln.config import TrainingConfig
from kiln.errors import ConfigError
from kiln.tracking import ExperimentDB, ModelRegistry
from kiln.tune import search

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = TrainingConfig(
    epochs=8,
    batch_size=16,
    validation_split=0.3,
    lr_scheduler="constant",
    warmup_ratio=0.0,
    random_seed=0,
    model={"name": "mlp", "hidden": [16]},
)


def _paths(tmp_path):
    return {
        "storage_path": tmp_path / "tune",
        "db_path": tmp_path / "kiln.db",
        "artifacts_dir": tmp_path / "artifacts",
        "data_dir": tmp_path / "datasets",
    }


@pytest.mark.timeout(180)
def test_asha_stops_losing_trials_early(ray_local, tmp_path):
    # Learning rates that learn come first, so they fill ASHA's rungs before the ones
    # that cannot learn (1e-6..1e-5 barely move in 8 epochs) reach them.
    lrs = [2e-2, 5e-2, 1e-6, 3e-6, 1e-5, 2e-6]
    result = search(
        BASE,
        None,
        "iris",
        None,
        {"learning_rate": tune.grid_search(lrs)},
        scheduler="asha",
        metric="val_loss",
        mode="min",
        register_as="iris-tuned",
        name="asha-iris",
        **_paths(tmp_path),
    )
    trials = result.trials.set_index("learning_rate")
    table = result.trials.to_string()
    assert len(trials) == 6 and set(trials["status"]) <= {"completed", "stopped"}, table
    stopped = trials[trials["stopped_early"]]
    assert (stopped["epochs"] < 8).all(), table
    cannot_learn = trials.loc[[1e-6, 3e-6, 1e-5, 2e-6]]
    assert cannot_learn["stopped_early"].sum() >= 3, table
    assert cannot_learn["epochs"].mean() < 8, table
    assert trials["epochs"].sum() <= 6 * 8 - 12, table  # ASHA saved real work
    best_row = result.trials.set_index("trial_id").loc[result.best_trial_id]
    assert best_row["epochs"] == 8 and not best_row["stopped_early"], table
    # the best config beats the worst trial by a clear margin
    assert result.best_config.learning_rate in (2e-2, 5e-2)
    best, worst = trials["best_val_loss"].min(), trials["best_val_loss"].max()
    assert best < 0.6 * worst, table
    assert result.best_metrics["val_loss"] == pytest.approx(best)
    assert result.best_metrics["val_accuracy"] > 0.85
    assert os.path.isdir(result.best_checkpoint)

    # every trial is a run grouped under the search id; the winner is registered
    db = ExperimentDB(tmp_path / "kiln.db")
    runs = db.list_runs(group="asha-iris")
    assert len(runs) == 6
    assert sorted(runs["status"]) == sorted(result.trials["status"])
    db.close()
    registry = ModelRegistry(tmp_path / "kiln.db", tmp_path / "artifacts")
    entry = registry.get_model(result.model_id)
    assert "asha-iris" in entry.description
    assert entry.training_run_id in set(runs["run_id"])
    registry.close()


@pytest.mark.timeout(180)
def test_preset_search(ray_local, tmp_path):
    result = search(
        BASE.replace(tracking=False),
        None,
        "iris",
        None,
        {
            "preset": tune.grid_search(["quick_prototype", "baseline"]),
            "epochs": 3,
            "model.hidden": [[16]],
        },
        scheduler="fifo",
        metric="val_accuracy",
        mode="max",
        **_paths(tmp_path),
    )
    assert sorted(result.trials["preset"]) == ["baseline", "quick_prototype"]
    assert (result.trials["epochs"] == 3).all()
    assert (result.trials["status"] == "completed").all()
    chosen = result.trials.set_index("trial_id").loc[result.best_trial_id, "preset"]
    expected = {"quick_prototype": ("constant", 1e-3), "baseline": ("cosine", 3e-4)}[chosen]
    assert (result.best_config.lr_scheduler, result.best_config.learning_rate) == expected
    assert result.best_config.model == {"name": "mlp", "hidden": [16]}
    assert not (tmp_path / "kiln.db").exists()  # tracking off: nothing recorded


@pytest.mark.timeout(60)
def test_impossible_resources_fail_before_any_trial(ray_local, tmp_path):
    paths = _paths(tmp_path)
    with pytest.raises(ConfigError, match=r"needs 64 CPU but the Ray cluster has 2"):
        search(
            BASE,
            None,
            "iris",
            None,
            {"learning_rate": [0.01]},
            resources_per_trial={"cpu": 64},
            **paths,
        )
    with pytest.raises(ConfigError, match=r"num_workers=4.*needs \d+ (CPU|GPU)"):
        search(BASE, None, "iris", None, {"preset": ["quick_prototype", "distributed"]}, **paths)
    with pytest.raises(ConfigError, match=r"num_workers=3.*needs 3 CPU"):
        search(BASE, None, "iris", None, {"num_workers": [0, 3]}, **paths)
    assert not paths["storage_path"].exists() or not any(paths["storage_path"].iterdir())


class _InterruptAfter(tune.Callback):
    """Sends Ctrl-C to this process once ``n`` trials have finished (an interrupted search)."""

    def __init__(self, n):
        self.n, self.done = n, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done == self.n:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.timeout(240)
def test_resume_an_interrupted_search(ray_local, tmp_path):
    space = {"learning_rate": tune.grid_search([1e-2, 2e-2, 3e-2, 4e-2])}
    common = dict(scheduler="fifo", max_concurrent_trials=1, name="resumable", **_paths(tmp_path))
    first = search(
        BASE.replace(epochs=4), None, "iris", None, space, callbacks=[_InterruptAfter(1)], **common
    )
    assert first.interrupted
    done_first = set(first.trials.loc[first.trials["status"] == "completed", "trial_id"])
    assert 1 <= len(done_first) < 4
    db = ExperimentDB(tmp_path / "kiln.db")
    assert len(db.list_runs(group="resumable")) == len(done_first)

    with pytest.raises(ConfigError, match="already exists"):
        search(BASE.replace(epochs=4), None, "iris", None, space, **common)

    second = search(BASE.replace(epochs=4), None, "iris", None, space, resume=True, **common)
    assert not second.interrupted
    assert (second.trials["status"] == "completed").all() and len(second.trials) == 4
    assert (second.trials["epochs"] == 4).all()
    # trials finished before the interruption were not run again
    assert done_first <= set(second.trials["trial_id"])
    runs = db.list_runs(group="resumable")
    assert len(runs) == 4 and runs["run_name"].is_unique
    db.close()
