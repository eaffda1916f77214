"""Step progress from Ray Train worker actors reaches the driver (issue 13).

One 2-worker fit on the session's local Ray: rank 0's step and epoch events arrive in
this process through the relay actor, in order, with the rank's step count (steps
the display had no time to show are dropped, each epoch's last is kept); the plain
epoch lines are the driver's (no worker prefix), and Ray's per-report INFO lines
("Reporting training result ...: TrainingReport(...)") and the placement-group
cleaner's warnings (this Ray has no dashboard) stay off the console.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from kiln import TaskSpec, Trainer, TrainingConfig
from kiln.engine.progress import EpochProgress, add_listener, remove_listener

ROWS, FEATURES, BATCH, EPOCHS = 512, 8, 16, 2


@pytest.mark.timeout(300)
def test_two_workers_step_progress_reaches_the_driver(ray_local, tmp_path, capfd):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, ROWS)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32) + y[:, None].astype(np.float32)
    seen: list[dict] = []
    add_listener(seen.append)
    progress = EpochProgress(EPOCHS, interval_s=0.0)  # every step: the test sees them all
    try:
        results = Trainer(
            training_config=TrainingConfig(
                epochs=EPOCHS,
                batch_size=BATCH,
                num_workers=2,
                validation_split=0.0,
                test_split=0.0,
                tracking=False,
                model={"name": "mlp", "hidden": [16]},
            ),
            task_spec=TaskSpec.classification(name="blobs", num_classes=2),
            hooks=[progress],
            verbose=False,
            storage_path=tmp_path / "runs",
        ).train((x, y))
    finally:
        remove_listener(seen.append)
    assert progress.relay is None  # the relay actor is gone after fit()
    steps = [e for e in seen if e["kind"] == "step"]
    epochs = [e for e in seen if e["kind"] == "epoch"]
    per_rank = ROWS // 2 // BATCH
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["line"].startswith("epoch   2/2  train_loss ")
    assert epochs[-1]["metrics"]["train_loss"] == pytest.approx(
        results["final_metrics"]["train_loss"]
    )
    assert {e["steps"] for e in steps} == {per_rank}
    assert all(1 <= e["step"] <= per_rank and e["loss"] is not None for e in steps)
    for epoch in (1, 2):  # the mailbox keeps the newest step: each epoch's last one arrives
        assert [e["step"] for e in steps if e["epoch"] == epoch][-1] == per_rank
    # events arrive in the order rank 0 made them (one caller, one actor)
    order = [(e["epoch"], e["step"] if e["kind"] == "step" else per_rank + 1) for e in seen]
    assert order == sorted(order)
    time.sleep(1.0)  # let Ray forward what the workers printed
    out, err = capfd.readouterr()
    assert "TrainingReport(" not in out + err
    assert "PlacementGroupCleaner" not in out + err  # no cleaner on a Ray without dashboard
    assert "RayTrainWorker" not in out or "epoch   1/2" not in out.split("RayTrainWorker")[1]


@pytest.mark.timeout(300)
def test_tune_trials_step_progress_reaches_the_driver_tagged(ray_local, tmp_path):
    from ray import tune

    from kiln.engine.progress import progress_mailbox
    from kiln.tune import search

    seen: list[dict] = []
    add_listener(seen.append)
    try:
        with progress_mailbox() as mailbox:  # what `kiln tune` does on a terminal
            hook = EpochProgress(2, interval_s=0.0)
            hook.relay = mailbox
            result = search(
                TrainingConfig(epochs=2, batch_size=16, model={"name": "mlp", "hidden": [8]}),
                None,
                "iris",
                None,
                {"learning_rate": tune.grid_search([1e-2, 2e-2])},
                scheduler="fifo",
                hooks=[hook],
                storage_path=tmp_path / "tune",
                db_path=tmp_path / "kiln.db",
                artifacts_dir=tmp_path / "artifacts",
                data_dir=tmp_path / "datasets",
            )
    finally:
        remove_listener(seen.append)
    trials = set(result.trials["trial_id"])
    assert len(trials) == 2
    steps = [e for e in seen if e["kind"] == "step"]
    assert {e["trial"] for e in steps} == trials  # each trial's steps, tagged with its id
    assert {(e["trial"], e["epoch"]) for e in seen if e["kind"] == "epoch"} == {
        (t, n) for t in trials for n in (1, 2)
    }
