"""kill -9 one DDP worker mid-run: Ray Train restarts the worker group, the run resumes
from its last committed checkpoint and ends where an uninterrupted run ends.

Rank 1 SIGKILLs its own process at the start of epoch 3 (of 6), only on the first
attempt (a marker file says it already did). With ``max_failures=1`` the run completes
with final weights equal to an uninterrupted run of the same seed and a history without
duplicated or missing epochs; with ``max_failures=0`` it fails with a message that says
a worker died and how to resume.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from drill_record import record

from kiln import TaskSpec, Trainer, TrainingConfig, TrainingHooks
from kiln.engine.checkpoint import load_checkpoint_state
from kiln.errors import WorkerDiedError

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

EPOCHS = 6


class KillRankAtEpoch(TrainingHooks):
    """On ``rank`` at the start of ``epoch``: write our pid, then SIGKILL ourselves, once."""

    def __init__(self, marker: str, rank: int = 1, epoch: int = 3) -> None:
        self.marker, self.rank, self.epoch = marker, rank, epoch

    def on_epoch_start(self, epoch: int) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() != self.rank or epoch != self.epoch:
            return
        if os.path.exists(self.marker):
            return  # the restarted attempt trains on
        with open(self.marker, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(autouse=True)
def _ship_by_value():
    """Workers cannot import this test module by name: ship its classes by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _data(n: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return (x[:64], y[:64]), (x[64:], y[64:])


def _run(tmp_path: Path, name: str, hooks=(), **overrides) -> dict:
    cfg = dict(
        epochs=EPOCHS,
        batch_size=8,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_scheduler="cosine",
        num_workers=2,
        random_seed=5,
        tracking=False,
        run_name=name,
        model={"name": "mlp", "hidden": [16]},
    )
    train, val = _data()
    return Trainer(
        training_config=TrainingConfig(**{**cfg, **overrides}),
        task_spec=TaskSpec.classification(name="two", num_classes=2),
        hooks=list(hooks),
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
    ).train(train, val)


def _weights(results: dict) -> dict[str, torch.Tensor]:
    return load_checkpoint_state(results["latest_checkpoint_path"]).model_state


def test_killed_worker_restarts_and_matches_an_uninterrupted_run(tmp_path, ray_local):
    marker = tmp_path / "killed"
    started = time.monotonic()
    killed = _run(tmp_path, "killed", [KillRankAtEpoch(str(marker))], max_failures=1)
    killed_s = time.monotonic() - started
    assert marker.exists(), "the worker was never killed"
    started = time.monotonic()
    clean = _run(tmp_path, "clean")
    clean_s = time.monotonic() - started
    assert [row["epoch"] for row in killed["history"]] == list(range(1, EPOCHS + 1))
    a, b = _weights(killed), _weights(clean)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"final weights differ by {worst}"
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in killed["history"]] == pytest.approx(
            [r[key] for r in clean["history"]], abs=1e-6
        )
    record(
        "faults_ddp_worker_kill",
        {
            "max_abs_weight_diff": worst,
            "killed_run_s": round(killed_s, 1),
            "clean_run_s": round(clean_s, 1),
        },  # fmt: skip
    )


def test_killed_worker_without_retries_says_how_to_resume(tmp_path, ray_local):
    marker = tmp_path / "killed"
    with pytest.raises(WorkerDiedError) as info:
        _run(tmp_path, "noretry", [KillRankAtEpoch(str(marker), epoch=2)], max_failures=0)
    message = str(info.value)
    assert marker.exists()
    assert "worker rank 1 died" in message and "max_failures=0 allows no restart" in message
    assert "--resume latest" in message and "resume_from='latest'" in message, message
    assert "(latest: epoch_0001)" in message, message
