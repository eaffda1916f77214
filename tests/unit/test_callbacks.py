"""Hooks dispatch, early stopping, logging and checkpoint callbacks; everything pickles."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import cloudpickle
import pytest
import torch

from kiln.engine.callbacks import (
    CallbackBase,
    CallbackList,
    EarlyStoppingCallback,
    HookDispatcher,
    LoggingCallback,
    ModelCheckpointCallback,
    StopDecision,
    TrainingHooks,
)
from kiln.engine.checkpoint import load_checkpoint_state


def _run_es(cb: EarlyStoppingCallback, values: list[float]) -> int | None:
    for epoch, v in enumerate(values, start=1):
        cb.on_epoch_end(epoch, {cb.monitor: v})
        if cb.stop_training:
            return epoch
    return None


def test_training_hooks_defaults_are_noops():
    hooks = TrainingHooks()
    hooks.on_training_start()
    hooks.on_epoch_start(1)
    hooks.on_batch_end(0, 0.5)
    hooks.on_validation_end({"val_loss": 1.0})
    hooks.on_epoch_end(1, {})
    hooks.on_training_end()


def test_dispatcher_calls_only_existing_methods():
    calls = []

    class Partial:  # duck-typed, two of the six methods
        def on_epoch_end(self, epoch, metrics):
            calls.append(("end", epoch, metrics["val_loss"]))

        def on_batch_end(self, batch_idx, loss):
            calls.append(("batch", batch_idx, loss))

    class Sub(TrainingHooks):
        def on_training_start(self):
            calls.append(("start",))

    d = HookDispatcher(Partial(), None, [Sub()])
    d.on_training_start()
    d.on_epoch_start(1)
    d.on_batch_end(3, 0.25)
    d.on_validation_end({"val_loss": 0.5})
    d.on_epoch_end(1, {"val_loss": 0.5})
    d.on_training_end()
    assert calls == [("start",), ("batch", 3, 0.25), ("end", 1, 0.5)]
    assert not d.stop_training
    pickle.loads(cloudpickle.dumps(d))


@pytest.mark.parametrize(
    ("kwargs", "values", "stop_at", "best"),
    [
        ({"patience": 2}, [1.0, 0.9, 0.95, 0.96, 0.5], 4, 0.9),
        ({"patience": 2}, [1.0, 0.9, 0.95, 0.8, 0.85, 0.9], 6, 0.8),
        ({"patience": 2, "min_delta": 0.1}, [1.0, 0.95, 0.92, 0.5], 3, 1.0),
        ({"patience": 1, "mode": "max", "monitor": "acc"}, [0.5, 0.6, 0.6], 3, 0.6),
        ({"patience": 3}, [1.0, 0.9, 0.8, 0.7], None, 0.7),
    ],
)
def test_early_stopping(kwargs, values, stop_at, best):
    cb = EarlyStoppingCallback(**kwargs)
    assert _run_es(cb, values) == stop_at
    assert cb.stopped_epoch == stop_at
    assert cb.best == pytest.approx(best)


def test_early_stopping_update_decisions_and_reset():
    cb = EarlyStoppingCallback(patience=2)
    assert cb.update(1.0) is StopDecision.IMPROVED
    assert cb.update(1.0) is StopDecision.WAIT  # equal is not an improvement
    assert cb.update(None) is StopDecision.SKIPPED
    assert cb.wait == 1
    assert cb.update(float("nan")) is StopDecision.SKIPPED
    assert cb.update(2.0).stops
    cb.reset()
    assert cb.best is None and cb.wait == 0 and not cb.stop_training


def test_early_stopping_missing_metric_warns_once_and_never_stops(caplog):
    cb = EarlyStoppingCallback(patience=1)
    with caplog.at_level(logging.WARNING, logger="kiln.engine.callbacks"):
        for epoch in range(1, 6):
            cb.on_epoch_end(epoch, {"train_loss": 1.0})
    assert not cb.stop_training and cb.stopped_epoch is None
    assert caplog.text.count("'val_loss' missing") == 1


def test_early_stopping_validation():
    with pytest.raises(ValueError) as info:
        EarlyStoppingCallback(patience=-1, min_delta=-0.5, mode="avg")
    message = str(info.value)
    assert "patience must be an int >= 0; got -1" in message
    assert "min_delta must be a number >= 0; got -0.5" in message
    assert "mode must be 'min' or 'max'; got 'avg'" in message


def test_early_stopping_resume_state_survives_json():
    import json

    cb = EarlyStoppingCallback(patience=3)
    _run_es(cb, [1.0, 1.1])
    saved = json.loads(json.dumps({"best": cb.best, "wait": cb.wait}))
    resumed = EarlyStoppingCallback(patience=3)
    resumed.best, resumed.wait = saved["best"], saved["wait"]
    resumed.on_train_begin({})  # must not reset the restored state
    resumed.on_epoch_end(3, {"val_loss": 1.2})
    assert not resumed.stop_training
    resumed.on_epoch_end(4, {"val_loss": 1.3})
    assert resumed.stop_training and resumed.stopped_epoch == 4


def test_callback_list_dispatch_and_stop():
    events = []

    class Recorder(CallbackBase):
        def on_train_begin(self, logs=None):
            events.append("begin")

        def on_epoch_begin(self, epoch, logs=None):
            events.append(f"epoch_begin {epoch}")

        def on_batch_end(self, batch, logs=None):
            events.append(f"batch {batch} {logs['loss']}")

        def on_epoch_end(self, epoch, logs=None):
            events.append(f"epoch_end {epoch}")

        def on_train_end(self, logs=None):
            events.append("end")

    stopper = EarlyStoppingCallback(patience=0)
    cbs = CallbackList([Recorder(), stopper])
    model = torch.nn.Linear(2, 2)
    cbs.set_context(model=model, rank=1, world_size=2)
    assert stopper.model is model and stopper.rank == 1 and stopper.world_size == 2
    cbs.on_train_begin({})
    cbs.on_epoch_begin(1, {})
    cbs.on_batch_end(0, {"loss": 0.5})
    cbs.on_epoch_end(1, {"val_loss": 1.0})
    assert not cbs.stop_training
    cbs.on_epoch_end(2, {"val_loss": 1.0})
    assert cbs.stop_training
    cbs.on_train_end({})
    assert events == ["begin", "epoch_begin 1", "batch 0 0.5", "epoch_end 1", "epoch_end 2", "end"]
    cbs.stop_training = False
    assert not stopper.stop_training


def test_logging_callback_prints_epoch_summary_on_rank0(capsys):
    cb = LoggingCallback(log_every_n_batches=2)
    cb.on_train_begin({"epochs": 3})
    cb.on_epoch_begin(1)
    for b in range(4):
        cb.on_batch_end(b, {"loss": 0.5 + b})
    cb.on_epoch_end(
        1,
        {
            "epoch": 1,
            "train_loss": 0.123456,
            "val_loss": torch.tensor(0.5),
            "steps": [1, 2],
            "epoch_duration_seconds": 2.25,
        },
    )
    cb.on_train_end()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "  batch 2: loss=1.5"
    assert out[1] == "  batch 4: loss=3.5"
    assert out[2] == "epoch 1/3 - train_loss=0.1235 val_loss=0.5 - 2.2s"
    assert out[3].startswith("training finished in ")

    other = LoggingCallback()
    other.set_context(rank=1, world_size=2)
    other.on_epoch_end(1, {"val_loss": 1.0})
    assert capsys.readouterr().out == ""
    everywhere = LoggingCallback(rank_zero_only=False)
    everywhere.set_context(rank=1, world_size=2)
    everywhere.on_epoch_end(2, {"val_loss": 1.0})
    assert capsys.readouterr().out.startswith("epoch 2 - val_loss=1")


def test_logging_callback_file(tmp_path):
    path = tmp_path / "log.txt"
    cb = pickle.loads(cloudpickle.dumps(LoggingCallback(file=path, total_epochs=2)))
    cb.on_epoch_begin(1)
    cb.on_epoch_end(1, {"train_loss": 2.0})
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/2 - train_loss=2 - ")


def test_model_checkpoint_saves_on_improvement_rank0(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cb = ModelCheckpointCallback(tmp_path / "ckpt", monitor="val_loss")
    cb.set_context(model=model)
    saved_weights = {}
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.7], start=1):
        with torch.no_grad():
            model.weight.add_(1.0)
        cb.on_epoch_end(epoch, {"val_loss": loss, "steps": [1]})
        saved_weights[epoch] = model.weight.detach().clone()
    cb.on_train_end()
    dirs = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    assert dirs == ["epoch_0004"]
    assert cb.best == 0.7 and Path(cb.best_path).name == "epoch_0004"
    state, _, meta = load_checkpoint_state(cb.best_path)
    assert torch.equal(state["weight"], saved_weights[4])
    assert meta["metrics"] == {"val_loss": 0.7}

    other_rank = ModelCheckpointCallback(tmp_path / "rank1")
    other_rank.set_context(model=model, rank=1, world_size=2)
    other_rank.on_epoch_end(1, {"val_loss": 0.1})
    assert not (tmp_path / "rank1").exists()


def test_model_checkpoint_every_epoch_and_missing_metric(tmp_path, caplog):
    model = torch.nn.Linear(2, 1)
    best_only = ModelCheckpointCallback(tmp_path / "a", monitor="val_acc", mode="max")
    best_only.set_context(model=model)
    with caplog.at_level(logging.WARNING, logger="kiln.engine.callbacks"):
        best_only.on_epoch_end(1, {"val_loss": 1.0})
        best_only.on_epoch_end(2, {"val_loss": 1.0})
    assert caplog.text.count("'val_acc' not in epoch logs") == 1
    assert best_only.last_path is None

    every = ModelCheckpointCallback(tmp_path / "b", save_best_only=False)
    every.set_context(model=model)
    every.on_epoch_end(1, {"val_loss": 1.0})
    every.on_epoch_end(2, {"val_loss": 2.0})
    every.on_train_end()
    assert Path(every.last_path).name == "epoch_0002"
    assert Path(every.best_path).name == "epoch_0001"


def test_callbacks_pickle_with_cloudpickle(tmp_path):
    model = torch.nn.Linear(2, 2)
    callbacks = [
        LoggingCallback(log_every_n_batches=5),
        ModelCheckpointCallback(tmp_path / "c"),
        EarlyStoppingCallback(patience=2),
        CallbackList([EarlyStoppingCallback(), LoggingCallback()]),
    ]
    for cb in callbacks:
        cb.set_context(model=model, rank=0, world_size=1)
    callbacks[1].on_epoch_end(1, {"val_loss": 1.0})  # creates its CheckpointManager
    for cb in callbacks:
        clone = pickle.loads(cloudpickle.dumps(cb))
        assert type(clone) is type(cb)
        assert clone.model is None  # the context is process-local
    callbacks[1].on_train_end()

    class UserHooks(TrainingHooks):  # defined locally: needs cloudpickle
        def __init__(self):
            self.seen = []

        def on_epoch_end(self, epoch, metrics):
            self.seen.append(epoch)

    clone = pickle.loads(cloudpickle.dumps(UserHooks()))
    clone.on_epoch_end(3, {})
    assert clone.seen == [3]
