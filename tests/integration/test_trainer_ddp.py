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
EPOCHS, BATCH = 2, 16


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


def _ship_by_value() -> None:
    """Workers cannot import this test module by name: ship its classes by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _fit(tmp_path: Path, train, val, **overrides) -> tuple[dict, list[dict], list[list[dict]]]:
    out = tmp_path / "out"
    out.mkdir()
    settings = dict(
        epochs=EPOCHS,
        batch_size=BATCH,
        learning_rate=2e-2,
        warmup_ratio=0.0,
        lr_scheduler="cosine",
        num_workers=2,
        random_seed=11,
        tracking=False,
    )
    torch.manual_seed(0)  # the module is built here, before kiln seeds anything
    results = Trainer(
        model=IdRecordingNet(),
        training_config=TrainingConfig(**{**settings, **overrides}),
        task_spec=TaskSpec.classification(name="ids", num_classes=CLASSES),
        hooks=[RankRecorder(out), MetricHooks(out)],
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
    ).train(train, val)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    hooks = [json.loads((out / f"hooks{r}.json").read_text()) for r in (0, 1)]
    return results, ranks, hooks


def _check_disjoint_shards(ranks: list[dict], n_train: int) -> None:
    per_rank_batches = n_train // 2 // BATCH
    for r in ranks:
        assert len(r["seen"]) == EPOCHS * per_rank_batches
        assert all(len(b) == BATCH for b in r["seen"])
        assert all(i < VAL_ID_OFFSET for b in r["seen"] for i in b)  # never trained on val
    for e in range(EPOCHS):
        window = slice(e * per_rank_batches, (e + 1) * per_rank_batches)
        ids = [{i for b in r["seen"][window] for i in b} for r in ranks]
        assert ids[0].isdisjoint(ids[1])
        assert ids[0] | ids[1] == set(range(n_train))
        assert sum(len(b) for r in ranks for b in r["seen"][window]) == n_train


def _check_identical_parameters(ranks: list[dict]) -> None:
    sums0, sums1 = ranks[0]["checksums"], ranks[1]["checksums"]
    assert len(sums0) == len(sums1) == len(ranks[0]["seen"])
    assert sums0 == sums1
    assert len(set(sums0)) > 1  # and they did change


def _check_mean_metrics(results: dict, ranks: list[dict], hooks: list[list[dict]], val) -> None:
    assert len(hooks[0]) == len(hooks[1]) == EPOCHS
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
    # The last epoch's validation ran on the final weights: evaluate them on ALL val rows.
    final = IdRecordingNet()
    final.load_state_dict(load_checkpoint_state(results["latest_checkpoint_path"]).model_state)
    final.eval()
    with torch.no_grad():
        logits = final(torch.as_tensor(val[0]))
        labels = torch.as_tensor(val[1])
        val_loss = F.cross_entropy(logits, labels).item()
        val_acc = (logits.argmax(-1) == labels).double().mean().item()
    assert results["history"][-1]["val_loss"] == pytest.approx(val_loss, abs=1e-6)
    assert results["history"][-1]["val_accuracy"] == pytest.approx(val_acc, abs=1e-9)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["memory", "ray"])
def test_two_workers_disjoint_shards_synced_params_mean_metrics(tmp_path, ray_local, backend):
    """Arrays shipped with the run ("memory"), or read by each rank through Ray Data's
    get_dataset_shard ("ray"), with gradient accumulation over a partial window."""
    _ship_by_value()
    train, val = _data(N_TRAIN, 0, seed=0), _data(N_VAL + 1, VAL_ID_OFFSET, seed=1)
    # 4 batches per rank and epoch with 3-batch accumulation: one full window and one
    # partial window per epoch, whose step must be synced across ranks too.
    results, ranks, hooks = _fit(
        tmp_path, train, val, gradient_accumulation_steps=3, data_backend=backend
    )
    assert results["world_size"] == 2
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["wrapped"] for r in ranks)  # DDP-wrapped model
    _check_disjoint_shards(ranks, N_TRAIN)  # (a)
    _check_identical_parameters(ranks)  # (b)
    _check_mean_metrics(results, ranks, hooks, val)  # (c)
    assert results["final_metrics"]["val_accuracy"] > 0.5


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_workers_on_a_torch_dataset(tmp_path, ray_local):
    """A torch Dataset goes through prepare_data_loader (a DistributedSampler per rank).

    An odd number of validation rows: a DistributedSampler would repeat one on rank 1,
    and the all-reduced validation loss would then differ from the loss over the rows.
    """
    _ship_by_value()
    (x, y), val = _data(N_TRAIN, 0, seed=2), _data(N_VAL + 1, VAL_ID_OFFSET, seed=3)
    train_ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    val_ds = torch.utils.data.TensorDataset(*(torch.from_numpy(a) for a in val))
    results, ranks, hooks = _fit(tmp_path, train_ds, val_ds)
    assert results["world_size"] == 2
    _check_disjoint_shards(ranks, N_TRAIN)
    _check_identical_parameters(ranks)
    _check_mean_metrics(results, ranks, hooks, val)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_batchnorm_model_with_fewer_validation_rows_than_ranks(tmp_path, ray_local):
    """One validation row for 2 ranks: rank 1 validates nothing. Through DDP, the first
    validation forward would broadcast BatchNorm buffers, a collective rank 1 never
    joins (a hang); kiln validates the inner module after one buffer broadcast."""
    _ship_by_value()
    (x, y), (xv, yv) = _data(N_TRAIN, 0, seed=4), _data(1, VAL_ID_OFFSET, seed=5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    results = Trainer(
        model=model,
        training_config=TrainingConfig(
            epochs=2, batch_size=BATCH, num_workers=2, random_seed=3, tracking=False
        ),
        task_spec=TaskSpec.classification(name="bn", num_classes=CLASSES),
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
    ).train((x, y), (xv, yv))
    final = results["history"][-1]
    # The checkpoint is rank 0's model, buffers included: it scores the row the same way.
    model.load_state_dict(load_checkpoint_state(results["latest_checkpoint_path"]).model_state)
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(torch.as_tensor(xv)), torch.as_tensor(yv)).item()
    assert final["val_loss"] == pytest.approx(loss, abs=1e-6)
