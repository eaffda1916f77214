"""kiln's TensorBoard event files: written from a run's history, read back record by record."""

from __future__ import annotations

import pytest

from kiln.tracking.tensorboard import read_scalars, write_history

HISTORY = [
    {
        "epoch": 1,
        "train_loss": 1.25,
        "val_loss": 1.5,
        "val_f1": 0.5,
        "global_step": 4,
        "timestamp": 1_700_000_000.0,
        "steps": [{"step": 2, "loss": 1.375, "lr": 0.01}, {"step": 4, "loss": 1.125, "lr": 0.02}],
        "alerts": [{"type": "loss_spike"}],
    },
    {
        "epoch": 2,
        "train_loss": 0.75,
        "val_loss": 1.0,
        "val_f1": 0.875,
        "gap": 0.25,  # added by a hook
        "global_step": 8,
        "timestamp": 1_700_000_010.0,
        "steps": [{"step": 6, "loss": 0.8125, "lr": 0.03}],
    },
]


def test_epoch_and_step_scalars_read_back_from_the_event_file(tmp_path):
    logdir = write_history(tmp_path / "run" / "tensorboard", HISTORY)
    assert logdir == tmp_path / "run" / "tensorboard"
    (event_file,) = logdir.glob("events.out.tfevents.*")
    scalars = read_scalars(tmp_path)  # found below the runs folder, as tensorboard --logdir does
    assert scalars["train_loss"] == [(1, 1.25), (2, 0.75)]
    assert scalars["val_f1"] == [(1, 0.5), (2, 0.875)]
    assert scalars["gap"] == [(2, 0.25)]
    assert scalars["step/loss"] == [(2, 1.375), (4, 1.125), (6, 0.8125)]
    assert scalars["step/lr"] == [(2, pytest.approx(0.01)), (4, pytest.approx(0.02)),
                                  (6, pytest.approx(0.03))]  # fmt: skip
    # bookkeeping is not plotted
    assert not {"epoch", "global_step", "timestamp", "steps", "alerts"} & set(scalars)
    assert event_file.stat().st_size > 0


def test_the_wall_time_of_each_scalar_is_its_epochs(tmp_path):
    from tensorboardX.proto.event_pb2 import Event

    from kiln.tracking.tensorboard import _records

    write_history(tmp_path, HISTORY)
    (path,) = tmp_path.glob("events.out.tfevents.*")
    times = {
        (v.tag, e.step): e.wall_time
        for e in map(Event.FromString, _records(path.read_bytes(), path))
        for v in e.summary.value
    }
    assert times[("val_loss", 1)] == pytest.approx(1_700_000_000.0)
    assert times[("step/loss", 6)] == pytest.approx(1_700_000_010.0)


def test_no_history_writes_no_file_and_a_damaged_file_is_an_error(tmp_path):
    assert write_history(tmp_path / "empty", []) is None
    assert not (tmp_path / "empty").exists()
    write_history(tmp_path / "run", HISTORY)
    (path,) = (tmp_path / "run").glob("events.out.tfevents.*")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a byte of the last record's payload CRC
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt record payload"):
        read_scalars(tmp_path / "run")
    path.write_bytes(bytes(data[:-6]))
    with pytest.raises(ValueError, match="corrupt record"):
        read_scalars(tmp_path / "run")


def _epoch_event(epoch: int, **metrics) -> dict:
    return {"kind": "epoch", "epoch": epoch, "epochs": 2, "metrics": metrics, "line": "x"}


def test_live_epochs_are_on_disk_as_they_end_and_finish_adds_the_rest_once(tmp_path):
    from kiln.tracking.tensorboard import LiveTensorBoard

    live = LiveTensorBoard(tmp_path / "tensorboard")
    live({"kind": "step", "epoch": 1, "step": 2, "loss": 9.0})  # steps come from the history
    live({**_epoch_event(1, train_loss=9.0), "trial": "t1"})  # a Tune trial's: not this run
    assert not (tmp_path / "tensorboard").exists()
    live(_epoch_event(1, train_loss=1.25, val_loss=1.5, epoch_duration_seconds=0.5))
    mid = read_scalars(tmp_path)  # flushed: readable while the run goes on
    assert mid["train_loss"] == [(1, 1.25)] and mid["val_loss"] == [(1, 1.5)]
    live(_epoch_event(1, train_loss=1.25))  # the same epoch again (a relay retry): once
    assert live.finish(HISTORY) == tmp_path / "tensorboard"
    scalars = read_scalars(tmp_path)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert scalars["train_loss"] == [(1, 1.25), (2, 0.75)]  # epoch 2: from the history
    assert scalars["val_f1"] == [(1, 0.5), (2, 0.875)]  # not in epoch 1's event: added
    assert scalars["gap"] == [(2, 0.25)]
    assert scalars["epoch_duration_seconds"] == [(1, 0.5)]
    assert [s for s, _ in scalars["step/loss"]] == [2, 4, 6]


def test_a_live_file_that_cannot_be_written_stops_live_writing_not_the_run(tmp_path):
    from kiln.tracking.tensorboard import LiveTensorBoard

    (tmp_path / "tensorboard").write_text("a file where the folder should be")
    live = LiveTensorBoard(tmp_path / "tensorboard")
    live(_epoch_event(1, train_loss=1.0))  # no exception: logged, and remembered
    assert live.error and "FileExistsError" in live.error
    live.close()
    with pytest.raises(OSError):
        live.finish(HISTORY)  # the trainer turns this into a warning and report_errors


def test_sinks_get_events_beside_the_console_and_quiet_events_only_go_to_sinks():
    import logging

    from kiln.engine import progress

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    console, got, shown = Lines(), [], []
    logger = progress.progress_logger()  # the plain console lines go through it
    logger.addHandler(console)
    progress.add_sink(got.append)
    try:
        progress.publish(_epoch_event(1, train_loss=1.0) | {"line": "epoch 1/2 loud"})
        progress.publish(_epoch_event(2, train_loss=0.5) | {"line": "epoch 2/2", "quiet": True})
        assert [e["epoch"] for e in got] == [1, 2]
        assert console.lines == ["epoch 1/2 loud"]  # a sink is no display; quiet: no line
        progress.add_listener(shown.append)  # a display: the console lines stop
        progress.publish(_epoch_event(3, train_loss=0.25) | {"quiet": True})
        assert [e["epoch"] for e in got] == [1, 2, 3] and shown == []
        assert console.lines == ["epoch 1/2 loud"]
    finally:
        logger.removeHandler(console)
        progress.remove_listener(shown.append)
        progress.remove_sink(got.append)


def test_a_quiet_run_shows_its_epochs_in_tensorboard_while_it_trains(tmp_path):
    """In-process (no Ray), verbose=False: a hook at each epoch's start reads the event
    file and finds every earlier epoch there already."""
    import numpy as np

    from kiln import TaskSpec, Trainer, TrainingConfig, TrainingHooks

    runs = tmp_path / "runs"
    seen: dict[int, list[int]] = {}

    class LookAtTensorBoard(TrainingHooks):
        def on_epoch_start(self, epoch: int) -> None:
            found = read_scalars(runs) if runs.exists() else {}
            seen[epoch] = [step for step, _ in found.get("val_loss", [])]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    results = Trainer(
        training_config=TrainingConfig(
            epochs=3,
            batch_size=16,
            model={"name": "mlp", "hidden": [8]},
            tracking=False,
            log_every_n_steps=2,
        ),  # fmt: skip
        task_spec=TaskSpec.classification(name="live", num_classes=2),
        hooks=[LookAtTensorBoard()],
        storage_path=runs,
        verbose=False,
    ).train((x[:48], y[:48]), (x[48:], y[48:]))
    assert seen == {1: [], 2: [1], 3: [1, 2]}
    scalars = read_scalars(runs)
    history = results["history"]
    assert scalars["val_loss"] == [(h["epoch"], pytest.approx(h["val_loss"])) for h in history]
    assert scalars["step/loss"]  # the per-step rows, added at the end
