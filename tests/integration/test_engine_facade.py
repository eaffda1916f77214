"""Seed 000's TrainingEngine: a layer list on a dataset id in, a TrainingSession out.

Runs in-process on bundled data (no Ray cluster); failures must come back as
``status="failed"`` with a message naming the problem, never as an exception.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from kiln import CallbackBase, TrainingConfig, TrainingEngine, TrainingSession

IRIS_LAYERS = [
    {"type": "input", "neurons": 4, "position": 0},
    {"type": "hidden", "neurons": 16, "activation": "relu", "position": 1},
    {"type": "output", "neurons": 3, "activation": None, "position": 2},
]


def _engine(tmp_path: Path, dataset_id: str = "iris", layers=None, **kw) -> TrainingEngine:
    return TrainingEngine(
        dataset_id=dataset_id,
        model_config={"layers": IRIS_LAYERS if layers is None else layers},
        device="cpu",
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
        **kw,
    )


def _quick(**kw) -> TrainingConfig:
    base = dict(epochs=3, batch_size=16, learning_rate=1e-2, warmup_ratio=0.0)
    return TrainingConfig(**{**base, "lr_scheduler": "constant", **kw})


def test_iris_session_completes_with_seed_fields(tmp_path):
    session = _engine(tmp_path, training_config=_quick()).train(model_id="iris_mlp_v1")
    assert isinstance(session, TrainingSession)
    assert session.status == "completed", session.error_message
    assert session.error_message is None
    assert session.model_id == "iris_mlp_v1"
    assert session.dataset_id == "iris"
    assert session.session_id
    assert isinstance(session.start_time, datetime) and isinstance(session.end_time, datetime)
    assert session.start_time <= session.end_time
    assert session.total_epochs == 3
    assert session.current_epoch == 3
    assert [m.epoch for m in session.metrics] == [1, 2, 3]
    for m in session.metrics:
        assert m.loss > 0
        assert 0.0 <= m.accuracy <= 1.0
        assert isinstance(m.timestamp, datetime)
        assert session.start_time <= m.timestamp <= session.end_time
    assert session.metrics[-1].loss < session.metrics[0].loss
    assert Path(session.checkpoint_path).is_dir()

    data = session.to_dict()
    for key in (
        "session_id",
        "model_id",
        "dataset_id",
        "status",
        "start_time",
        "end_time",
        "total_epochs",
        "current_epoch",
        "metrics",
        "error_message",
    ):
        assert key in data
    assert data["metrics"][0]["epoch"] == 1
    assert set(data["metrics"][0]) >= {"epoch", "loss", "accuracy", "timestamp"}


def test_default_config_trains_iris_well(tmp_path):
    session = _engine(tmp_path).train()
    assert session.status == "completed", session.error_message
    assert session.total_epochs == 10
    assert len(session.metrics) == 10
    assert session.metrics[-1].accuracy >= 0.8


@pytest.mark.parametrize(
    "dataset_id, layers, needles",
    [
        ("no_such_dataset", None, ["'no_such_dataset'", "iris", "digits"]),
        (
            "iris",
            [
                {"type": "input", "neurons": 6},
                {"type": "hidden", "neurons": 8, "activation": "relu"},
                {"type": "output", "neurons": 3},
            ],
            ["neurons=6", "4 features"],
        ),
        (
            "iris",
            [
                {"type": "input", "neurons": 4},
                {"type": "hidden", "neurons": 8, "activation": "relu"},
                {"type": "output", "neurons": 5},
            ],
            ["neurons=5", "3"],
        ),
        (
            "iris",
            [
                {"type": "input", "neurons": 4},
                {"type": "hidden", "neurons": 8, "activation": "sparkle"},
                {"type": "output", "neurons": 3},
            ],
            ["activation='sparkle'", "relu"],
        ),
        (
            "iris",
            [
                {"type": "input", "neurons": 4},
                {"type": "output", "neurons": 3, "activation": "softmax"},
            ],
            ["softmax", "raw logits"],
        ),
    ],
    ids=["bad_dataset", "input_neurons", "output_neurons", "activation", "softmax_output"],
)
def test_bad_input_fails_the_session_without_raising(tmp_path, dataset_id, layers, needles):
    session = _engine(tmp_path, dataset_id=dataset_id, layers=layers).train(model_id="m")
    assert session.status == "failed"
    assert session.metrics == []
    assert session.end_time is not None
    for needle in needles:
        assert needle in session.error_message, session.error_message
    assert session.to_dict()["status"] == "failed"


def test_non_dict_model_config_fails_the_session(tmp_path):
    engine = TrainingEngine(dataset_id="iris", model_config=["not", "a", "dict"])
    session = engine.train()
    assert session.status == "failed"
    assert "model_config must be a dict" in session.error_message


def test_invalid_training_config_fails_the_session(tmp_path):
    bad = TrainingConfig(epochs=2)
    bad.batch_size = 0  # mutated after construction: the engine's validation catches it
    session = _engine(tmp_path, training_config=bad).train()
    assert session.status == "failed"
    assert "batch_size=0" in session.error_message


class EpochLog(CallbackBase):
    """Seed 001 callback: records epochs and the metric keys it saw, to a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.epochs: list[int] = []
        self.keys: list[str] = []
        self.batches = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.keys = sorted(logs or {})

    def on_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_train_end(self, logs=None):
        Path(self.path).write_text(
            json.dumps({"epochs": self.epochs, "keys": self.keys, "batches": self.batches})
        )


class StopAtTwo(CallbackBase):
    def on_epoch_end(self, epoch, logs=None):
        if epoch >= 2:
            self.stop_training = True


def test_training_config_and_callbacks(tmp_path):
    log = tmp_path / "epochs.json"
    session = _engine(
        tmp_path,
        training_config=_quick(batch_size=50, validation_split=0.2),
        callbacks=[EpochLog(log), StopAtTwo()],
    ).train()
    assert session.status == "completed", session.error_message
    seen = json.loads(log.read_text())
    assert seen["epochs"] == [1, 2]  # StopAtTwo ended the run after epoch 2
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(seen["keys"])
    assert seen["batches"] == 2 * 3  # 120 training rows / batch 50
    assert [m.epoch for m in session.metrics] == [1, 2]
    assert session.current_epoch == 2
    assert session.total_epochs == 3


def test_a_failing_callback_fails_the_session(tmp_path):
    class Boom(CallbackBase):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("callback exploded")

    session = _engine(tmp_path, training_config=_quick(), callbacks=[Boom()]).train()
    assert session.status == "failed"
    assert "callback exploded" in session.error_message
