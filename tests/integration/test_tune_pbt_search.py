"""PBT over kiln trials on a real local Ray: losers restart from winners' checkpoints with
perturbed learning rates, and a resumed Trainer run uses its config's learning rate."""

from __future__ import annotations

import math

import pytest
from ray import tune

from kiln import Trainer
from kiln.config import TrainingConfig
from kiln.tracking import ExperimentDB
from kiln.tune import search

pytestmark = [pytest.mark.integration]

BASE = TrainingConfig(
    epochs=6,
    batch_size=16,
    validation_split=0.3,
    lr_scheduler="constant",
    warmup_ratio=0.0,
    random_seed=0,
    model={"name": "mlp", "hidden": [16]},
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pbt_restarts_losers_from_winners_checkpoints(ray_local, tmp_path):
    from ray.tune import ExperimentAnalysis

    result = search(
        BASE,
        None,
        "iris",
        None,
        {"learning_rate": tune.loguniform(1e-5, 1e-1)},
        num_samples=4,
        scheduler="pbt",
        perturbation_interval=2,
        metric="val_loss",
        mode="min",
        seed=1,
        name="pbt-iris",
        storage_path=tmp_path / "tune",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
        data_dir=tmp_path / "datasets",
    )
    trials = result.trials
    table = trials.to_string()
    assert len(trials) == 4 and (trials["status"] == "completed").all(), table
    assert (trials["epochs"] == 6).all() and not trials["stopped_early"].any(), table

    # at least one trial took over another trial's checkpoint
    restored = trials[trials["restored_from"].map(len) > 0]
    assert len(restored) >= 1, table
    ids = set(trials["trial_id"])
    for _, row in restored.iterrows():
        assert set(row["restored_from"]) <= ids - {row["trial_id"]}, table

    # the winner is finite and clearly better than the worst trial after its first epoch
    frames = ExperimentAnalysis(result.experiment_path).trial_dataframes
    # (a trial's table can start after epoch 1 when PBT restarted it from a donor early)
    first = [df.loc[df["epoch"] == df["epoch"].min(), "val_loss"].iloc[0] for df in frames.values()]
    best = result.best_metrics["val_loss"]
    assert math.isfinite(best) and best < 0.8 * max(first), (best, first, table)
    # best_config is the winner's config when it reported its best epoch
    df = frames[result.best_trial_id]
    at_best = df.loc[df["epoch"] == result.best_metrics["epoch"], "config/learning_rate"]
    assert result.best_config.learning_rate == pytest.approx(at_best.iloc[-1])
    assert 1e-5 <= result.best_config.learning_rate <= 1e-1  # perturbed within the range

    # every trial is a run grouped under the search id, restores among its params
    db = ExperimentDB(tmp_path / "kiln.db")
    runs = db.list_runs(group="pbt-iris")
    assert len(runs) == 4 and set(runs["status"]) == {"completed"}
    db.close()


@pytest.mark.timeout(120)
def test_a_resumed_trainer_run_uses_its_configs_learning_rate(tmp_path):
    def trainer(**kw):
        cfg = BASE.replace(tracking=False, run_name="lr", **kw)
        return Trainer(training_config=cfg, storage_path=tmp_path / "runs")

    first = trainer(epochs=2, learning_rate=1e-2).train("iris")
    assert [h["learning_rate"] for h in first["history"]] == [1e-2, 1e-2]
    resumed = trainer(epochs=3, learning_rate=2e-3).train(
        "iris", resume_from=first["latest_checkpoint_path"]
    )
    assert resumed["resumed_from"] == first["latest_checkpoint_path"]
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][-1]["learning_rate"] == 2e-3
