"""Trainer with 2 Ray Train worker actors (DDP over gloo on a local Ray).

One fit checks the three promises of the issue at once: each rank sees a disjoint shard
of the training rows, ranks hold identical parameters after every step, and epoch
metrics are means over every rank's samples (identical on every rank, and equal to the
final model evaluated on the whole validation set, not on rank 0's half).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln import CallbackBase, TaskSpec, Trainer, TrainingConfig, TrainingHooks
from kiln.engine.checkpoint import load_checkpoint_state

N_TRAIN, N_VAL, FEATURES, CLASSES = 128, 40, 6, 3
VAL_ID_OFFSET = 10_000
REDUCED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _data(n: int, id_offset: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose first feature is a unique row id; the rest is an easy 3-class problem."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    x[:, 1:4] += np.eye(CLASSES, dtype=np.float32)[y] * 2.0
    x[:, 0] = np.arange(n, dtype=np.float32) + id_offset
    return x, y.astype(np.int64)


class IdRecordingNet(nn.Module):
    """An MLP that ignores feature 0 (the row id) and records the ids it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES - 1, 16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.seen: list[list[int]] = []  # one list of ids per training batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append([int(v) for v in x[:, 0].tolist()])
        return self.net(x[:, 1:])


class RankRecorder(CallbackBase):
    """Per rank: ids seen, a parameter checksum after every batch, batch losses, metrics."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = str(out_dir)
        self.checksums: list[float] = []
        self.batch_losses: list[list[float]] = []
        self.metrics: list[dict] = []
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.batch_losses.append([])

    def on_batch_end(self, batch, logs=None):
        with torch.no_grad():
            total = sum(p.detach().double().sum() for p in self.model.parameters())
        self.checksums.append(float(total))
        self.batch_losses[-1].append(float(logs["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        self.metrics.append(dict(logs))

    def on_train_end(self, logs=None):
        inner = getattr(self.model, "module", self.model)
        record = {
            "rank": self.rank,
            "world_size": self.world_size,
            "wrapped": inner is not self.model,
            "seen": inner.seen,
            "checksums": self.checksums,
            "batch_losses": self.batch_losses,
            "metrics": self.metrics,
        }
        (Path(self.out_dir) / f"rank{self.rank}.json").write_text(json.dumps(record))


class MetricHooks(TrainingHooks):
    """Seed 002 hooks in the workers: the metrics each rank's on_epoch_end receives."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = str(out_dir)
        self.rank = -1
        self.received: list[dict] = []

    def on_training_start(self):
        import ray.train

        self.rank = ray.train.get_context().get_world_rank()

    def on_epoch_end(self, epoch, metrics):
        self.received.append({"epoch": epoch, **metrics})

    def on_training_end(self):
        path = Path(self.out_dir) / f"hooks{self.rank}.json"
        path.write_text(json.dumps(self.received))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_workers_disjoint_shards_synced_params_mean_metrics(tmp_path, ray_local):
    # Workers cannot import this test module by name: ship its classes by value.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    train, val = _data(N_TRAIN, 0, seed=0), _data(N_VAL, VAL_ID_OFFSET, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    epochs, batch = 2, 16
    config = TrainingConfig(
        epochs=epochs,
        batch_size=batch,
        learning_rate=2e-2,
        warmup_ratio=0.0,
        lr_scheduler="cosine",
        # 4 batches per rank and epoch with 3-batch accumulation: one full window and one
        # partial window per epoch, whose step must be synced across ranks too.
        gradient_accumulation_steps=3,
        num_workers=2,
        random_seed=11,
        tracking=False,
    )
    results = Trainer(
        model=IdRecordingNet(),
        training_config=config,
        task_spec=TaskSpec.classification(name="ids", num_classes=CLASSES),
        hooks=[RankRecorder(out), MetricHooks(out)],
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
    ).train(train, val)

    assert results["world_size"] == 2
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["wrapped"] for r in ranks)  # DDP-wrapped model

    # (a) disjoint shards that cover the training rows, every epoch
    per_rank_batches = N_TRAIN // 2 // batch
    for r in ranks:
        assert len(r["seen"]) == epochs * per_rank_batches
        assert all(len(b) == batch for b in r["seen"])
        assert all(i < VAL_ID_OFFSET for b in r["seen"] for i in b)  # never trained on val
    for e in range(epochs):
        window = slice(e * per_rank_batches, (e + 1) * per_rank_batches)
        ids = [{i for b in r["seen"][window] for i in b} for r in ranks]
        assert ids[0].isdisjoint(ids[1])
        assert ids[0] | ids[1] == set(range(N_TRAIN))
        assert sum(len(b) for r in ranks for b in r["seen"][window]) == N_TRAIN

    # (b) identical parameters on both ranks after every step
    sums0, sums1 = ranks[0]["checksums"], ranks[1]["checksums"]
    assert len(sums0) == len(sums1) == epochs * per_rank_batches
    assert sums0 == sums1
    assert len(set(sums0)) > 1  # and they did change

    # (c) metrics: identical on every rank, and means over both ranks' samples
    hooks = [json.loads((out / f"hooks{r}.json").read_text()) for r in (0, 1)]
    assert len(hooks[0]) == len(hooks[1]) == epochs
    # Timings and timestamps are each rank's own; everything else must agree exactly.
    shared = [*REDUCED, "epoch", "learning_rate", "global_step", "grad_norm"]
    for row0, row1, cb0, cb1 in zip(*hooks, ranks[0]["metrics"], ranks[1]["metrics"], strict=True):
        assert {k: row0[k] for k in shared} == {k: row1[k] for k in shared}
        assert {k: cb0[k] for k in shared} == {k: cb1[k] for k in shared}
    for row, seen, hist in zip(hooks[0], ranks[0]["metrics"], results["history"], strict=True):
        for key in REDUCED:
            assert row[key] == seen[key] == hist[key], key
    for e, hist in enumerate(results["history"]):
        losses = ranks[0]["batch_losses"][e] + ranks[1]["batch_losses"][e]  # equal batch sizes
        assert hist["train_loss"] == pytest.approx(np.mean(losses), rel=1e-6)

    final = IdRecordingNet()
    final.load_state_dict(load_checkpoint_state(results["latest_checkpoint_path"]).model_state)
    final.eval()
    with torch.no_grad():
        logits = final(torch.from_numpy(val[0]))
        labels = torch.from_numpy(val[1])
        val_loss = F.cross_entropy(logits, labels).item()
        val_acc = (logits.argmax(-1) == labels).double().mean().item()
    assert results["history"][-1]["val_loss"] == pytest.approx(val_loss, abs=1e-6)
    assert results["history"][-1]["val_accuracy"] == pytest.approx(val_acc, abs=1e-9)
    assert results["final_metrics"]["val_accuracy"] > 0.5
