"""Your own optimizer, schedule and metrics in a 2-worker DDP run (gloo, local Ray).

One run proves the promises together: the factories travel to the worker actors; a
torchmetrics metric and a plain callable are synchronised over the ranks (the two
ranks' validation rows are built so that their own accuracies differ widely, so a
rank-local value could not pass); a hook adds a metric; all of them land in the
history, the tracking database and the TensorBoard files; and a custom metric is the
``monitor`` that ranks checkpoints and feeds early stopping.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kiln import CallbackBase, TaskSpec, Trainer, TrainingConfig
from kiln.engine.checkpoint import load_checkpoint_state
from kiln.tracking import ExperimentDB
from kiln.tracking.tensorboard import read_scalars

pytestmark = [pytest.mark.integration]

FEATURES, CLASSES, N_TRAIN, N_VAL, BATCH, EPOCHS, LR = 6, 3, 96, 41, 16, 2, 0.05


def _data(n: int, seed: int, noisy_odd_rows: bool) -> tuple[np.ndarray, np.ndarray]:
    """An easy 3-class problem; with ``noisy_odd_rows`` odd rows (rank 1's validation
    rows: ranks take every 2nd row) get random labels, so rank 0 scores far higher."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    x[:, :CLASSES] += np.eye(CLASSES, dtype=np.float32)[y] * 3.0
    if noisy_odd_rows:
        y[1::2] = rng.integers(0, CLASSES, len(y[1::2]))
    return x, y.astype(np.int64)


def error_rate(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A callable metric: this batch's share of wrong predictions."""
    return (outputs.argmax(-1) != targets).float().mean()


class RankLogs(CallbackBase):
    """Adds ``val_gap`` to each epoch's record and writes what each rank saw."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.rows = str(out_dir), []

    def on_epoch_end(self, epoch, logs=None):
        logs["val_gap"] = logs["val_loss"] - logs["train_loss"]
        self.rows.append(dict(logs))

    def on_train_end(self, logs=None):
        Path(self.out_dir, f"rank{self.rank}.json").write_text(json.dumps(self.rows))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_custom_metrics_sync_record_and_rank_checkpoints_over_two_workers(tmp_path, ray_local):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import us
    train, val = _data(N_TRAIN, 0, False), _data(N_VAL, 1, True)
    steps_per_epoch = N_TRAIN // 2 // BATCH
    torch.manual_seed(0)
    results = Trainer(
        model=nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES)),
        training_config=TrainingConfig(
            epochs=EPOCHS,
            batch_size=BATCH,
            num_workers=2,
            random_seed=3,
            monitor="val_error_rate",
            mode="min",
            keep_best_k=1,
            keep_last_n=1,
            early_stopping_patience=EPOCHS,
            report_interval_s=0.0,
        ),
        task_spec=TaskSpec.classification(name="custom", num_classes=CLASSES),
        hooks=[RankLogs(tmp_path)],
        optimizer=lambda params, cfg: torch.optim.SGD(params, lr=LR, momentum=0.5, nesterov=True),
        lr_scheduler=lambda opt, cfg, total: torch.optim.lr_scheduler.StepLR(
            opt, step_size=total // cfg.epochs, gamma=0.5
        ),
        metrics={
            "tm_acc": MulticlassAccuracy(num_classes=CLASSES, average="micro"),
            "error_rate": error_rate,
        },
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
        verbose=False,
    ).train(train, val)
    history = results["history"]
    assert len(history) == EPOCHS and results["world_size"] == 2

    # synchronised: both ranks hold the value over all 41 rows, which is kiln's own
    # all-reduced accuracy (rank 0 has 21 easy rows, rank 1 20 noisy ones)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    custom = ("train_tm_acc", "val_tm_acc", "train_error_rate", "val_error_rate", "val_gap")
    for row0, row1, hist in zip(*ranks, history, strict=True):
        assert {k: row0[k] for k in custom} == {k: row1[k] for k in custom}
        assert hist["val_tm_acc"] == pytest.approx(hist["val_accuracy"], abs=1e-6)
        assert hist["train_tm_acc"] == pytest.approx(hist["train_accuracy"], abs=1e-6)
        assert hist["val_error_rate"] == pytest.approx(1 - hist["val_accuracy"], abs=1e-9)
        assert hist["val_gap"] == pytest.approx(hist["val_loss"] - hist["train_loss"])
    final = load_checkpoint_state(results["latest_checkpoint_path"])
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    model.load_state_dict(final.model_state)
    with torch.no_grad():
        right = (model(torch.as_tensor(val[0])).argmax(-1) == torch.as_tensor(val[1])).float()
    assert history[-1]["val_tm_acc"] == pytest.approx(float(right.mean()), abs=1e-6)
    assert float(right[0::2].mean()) - float(right[1::2].mean()) > 0.2  # ranks differ alone

    # the factories ran in the workers: SGD with Nesterov, the LR halved every epoch
    assert final.train_state["optimizer"]["param_groups"][0]["nesterov"] is True
    lrs = [h["learning_rate"] for h in history]
    assert lrs == pytest.approx([LR * 0.5**e for e in range(1, EPOCHS + 1)])
    assert history[-1]["global_step"] == EPOCHS * steps_per_epoch

    # the monitor: best checkpoint and early stopping follow val_error_rate
    errors = [h["val_error_rate"] for h in history]
    best_epoch = history[int(np.argmin(errors))]["epoch"]
    assert results["best_epoch"] == best_epoch
    best = load_checkpoint_state(results["checkpoint_path"])
    assert best.metadata["epoch"] == best_epoch
    assert best.metadata["metrics"]["val_error_rate"] == pytest.approx(min(errors))
    assert final.metadata["user"]["callbacks"][0]["best"] == pytest.approx(min(errors))

    # recorded: the tracking database and the TensorBoard event files
    db = ExperimentDB(tmp_path / "kiln.db")
    try:
        rows = db.get_metrics(results["run_id"], "val_tm_acc")
        params = db.get_run(results["run_id"])["params"]
    finally:
        db.close()
    assert list(rows["value"]) == pytest.approx([h["val_tm_acc"] for h in history])
    assert params["custom_metrics"] == {"tm_acc": "MulticlassAccuracy", "error_rate": "error_rate"}
    assert params["optimizer_factory"].startswith("<factory ")
    scalars = read_scalars(Path(results["run_dir"]) / "tensorboard")
    assert scalars["val_error_rate"] == [
        (h["epoch"], pytest.approx(h["val_error_rate"])) for h in history
    ]
    assert [v for _, v in scalars["val_gap"]] == pytest.approx([h["val_gap"] for h in history])


def test_report_to_mlflow_sends_the_run_with_its_custom_metric(tmp_path, monkeypatch):
    """In-process run (no Ray) with ``report_to: [mlflow]`` to a local file store; the
    held-out test rows are scored with the custom metric too."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    results = Trainer(
        training_config=TrainingConfig(
            epochs=2,
            batch_size=16,
            report_to=["mlflow"],
            monitor="val_tm_acc",
            mode="max",
            model={"name": "mlp", "hidden": [8]},
            test_split=0.25,
        ),
        task_spec=TaskSpec.classification(name="mlflow", num_classes=CLASSES),
        metrics={"tm_acc": MulticlassAccuracy(num_classes=CLASSES, average="micro")},
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
        verbose=False,
    ).train(_data(64, 0, False), _data(32, 1, False))
    test = results["test_metrics"]  # the held-out rows get the custom metrics too
    assert test["test_tm_acc"] == pytest.approx(test["test_accuracy"]) and test["test_rows"] == 16
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(results["mlflow_run_id"])
    steps = client.get_metric_history(run.info.run_id, "val_tm_acc")
    assert [(m.step, m.value) for m in steps] == [
        (h["epoch"], pytest.approx(h["val_tm_acc"])) for h in results["history"]
    ]
    assert run.data.tags["kiln.run_id"] == str(results["run_id"])
    assert run.data.params["monitor"] == "val_tm_acc"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")}
    assert "best_checkpoint/model.pt" in names
    # `kiln runs export` of the same run later replaces what report_to sent
    from kiln.tracking.mlflow_export import export_recorded_run

    again = export_recorded_run(tmp_path / "kiln.db", results["run_id"])
    active = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in active] == [again] != [results["mlflow_run_id"]]
    assert client.get_run(results["mlflow_run_id"]).info.lifecycle_stage == "deleted"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_tune_search_ranks_trials_by_a_custom_metric(tmp_path, ray_local):
    from ray import tune

    from kiln.tune import search

    result = search(
        TrainingConfig(
            epochs=2,
            batch_size=16,
            lr_scheduler="constant",
            warmup_ratio=0.0,
            model={"name": "mlp", "hidden": [8]},
            tracking=False,
        ),
        TaskSpec.classification(name="tuned", num_classes=CLASSES),
        _data(64, 0, False),
        _data(32, 1, False),
        {"learning_rate": tune.grid_search([0.05, 1e-6])},
        metric="val_tm_acc",
        mode="max",
        scheduler="fifo",
        metrics={"tm_acc": MulticlassAccuracy(num_classes=CLASSES, average="micro")},
        storage_path=tmp_path / "tune",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
    )
    table = result.trials.to_string()
    assert (result.trials["status"] == "completed").all(), table
    assert result.best_config.learning_rate == 0.05, table
    scores = result.trials.set_index("learning_rate")["best_val_tm_acc"]
    assert scores[0.05] > scores[1e-6], table
    assert result.best_metrics["val_tm_acc"] == pytest.approx(scores[0.05])
