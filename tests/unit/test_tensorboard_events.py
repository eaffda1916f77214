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
