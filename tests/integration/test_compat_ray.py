"""The older APIs on Ray Train worker actors: trainer-first callbacks run in every rank
through ``SeedCallbackAdapter``, and a checkpoint callback's registry link stays with
the driver (a copy shipped to a worker registers nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kiln import ModelCheckpointCallback, TrainingConfig, TrainingEngine
from kiln.compat import TrainingCallback
from kiln.tracking import ModelRegistry

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

LAYERS = [
    {"type": "input", "neurons": 4},
    {"type": "hidden", "neurons": 16, "activation": "relu"},
    {"type": "output", "neurons": 3},
]


class EpochFile(TrainingCallback):
    """Appends one JSON line per epoch end, from whichever process runs it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def on_epoch_end(self, trainer, epoch, metrics):
        line = {"epoch": epoch, "val_loss": metrics["val_loss"], "lr": trainer.config.learning_rate}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def test_trainer_first_callbacks_and_registry_link_on_two_workers(tmp_path, ray_local):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import it
    log = tmp_path / "epochs.jsonl"
    registry = ModelRegistry(tmp_path / "kiln.db")
    checkpoints = ModelCheckpointCallback(
        tmp_path / "ckpt", registry=registry, register_as="iris-ddp", register="every"
    )
    config = TrainingConfig(
        epochs=1, batch_size=32, learning_rate=1e-2, warmup_ratio=0.0, num_workers=2
    )
    session = TrainingEngine(
        "iris",
        {"layers": LAYERS},
        training_config=config,
        callbacks=[EpochFile(log), checkpoints],
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
    ).train(model_id="iris_ddp")

    assert session.status == "completed", session.error_message
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 1]  # the epoch end, on each of the 2 ranks
    assert {row["lr"] for row in lines} == {1e-2}
    assert [row["val_loss"] for row in lines] == pytest.approx([session.metrics[0].val_loss] * 2)
    # rank 0 saved checkpoints in its worker, where the registry does not travel
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("epoch_")]
    assert registry.list_models(name="iris-ddp").empty
    assert checkpoints.registered == []
    # what registers from the driver is the run's own register_as (the engine's model_id)
    assert registry.get_model(name="iris_ddp").version == "1.0.0"
