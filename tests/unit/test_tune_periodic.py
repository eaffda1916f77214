"""PeriodicOptimizer protocol, the LR-multiplier annealer, the loop callback, and
ModelTrainer on plain DataLoaders (in-process, epochs in kiln's TrainingLoop)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln.config import TrainingConfig
from kiln.errors import ConfigError
from kiln.tune import (
    LRMultiplierAnnealer,
    ModelTrainer,
    OptimizationResult,
    OptimizationStep,
    PeriodicOptimizationCallback,
    PeriodicOptimizer,
)


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


class CountingOptimizer:
    """A fake periodic optimizer that records each call."""

    def __init__(self):
        self.calls = []

    def formulate_problem(self, model, metrics):
        return {"step": metrics["step"]}

    def solve(self, problem):
        return problem["step"]

    def apply_solution(self, model, solution):
        self.calls.append(solution)
        return OptimizationResult(
            step=solution, applied=False, objective_before=0, objective_after=0
        )


def test_protocol_is_runtime_checkable():
    x, y = _data()
    assert isinstance(CountingOptimizer(), PeriodicOptimizer)
    assert isinstance(LRMultiplierAnnealer((x, y)), PeriodicOptimizer)
    with pytest.raises(ConfigError, match="lacks formulate_problem, solve, apply_solution"):
        OptimizationStep(object(), 10)
    with pytest.raises(ConfigError, match="lacks formulate_problem, solve, apply_solution"):
        PeriodicOptimizationCallback(object(), 10)
    with pytest.raises(ValueError, match="optimization_frequency=0"):
        OptimizationStep(CountingOptimizer(), 0)


def test_callback_calls_every_n_batches():
    fake = CountingOptimizer()
    cb = PeriodicOptimizationCallback(fake, optimization_frequency=4)
    cb.set_context(model=_model(), optimizer=None)
    for batch in range(10):
        cb.on_batch_end(batch, {"loss": 1.0})
    assert fake.calls == [4, 8]
    assert [r.step for r in cb.results] == [4, 8]


def test_callback_log_is_the_drivers_view_of_the_results(tmp_path):
    from kiln.tune.periodic import read_optimization_log

    log = tmp_path / "periodic" / "results.jsonl"
    for rank in (0, 1):  # rank 1 computes the same results but does not write them
        cb = PeriodicOptimizationCallback(CountingOptimizer(), 3, log_path=log)
        cb.set_context(model=_model(), optimizer=None, rank=rank, world_size=2)
        for batch in range(7):
            cb.on_batch_end(batch, {"loss": 0.5})
    results = read_optimization_log(log)
    assert [(r.step, r.applied) for r in results] == [(3, False), (6, False)]
    assert all("seconds" in r.details for r in results)
    assert read_optimization_log(tmp_path / "missing.jsonl") == []


def test_annealer_finds_a_better_learning_rate_and_applies_it():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(
        [
            {"params": [p for p in model.parameters() if p.ndim > 1]},
            {"params": [p for p in model.parameters() if p.ndim == 1]},
        ],
        lr=1e-4,  # far too small: a larger multiplier must look better one step ahead
    )
    annealer = LRMultiplierAnnealer((x[:64], y[:64]), choices=(0.5, 1.0, 4.0, 16.0), iterations=30)
    annealer.bind(opt)
    result = OptimizationStep(annealer, 1).optimize_step(model, {"step": 1})
    assert result.applied
    assert result.objective_after < result.objective_before
    assert max(result.solution) > 1.0
    assert result.details["lr_after"] != result.details["lr_before"]
    assert [g["lr"] for g in opt.param_groups] == result.details["lr_after"]
    # the weights are back where they were (the look-ahead is undone)
    before = [p.detach().clone() for p in model.parameters()]
    annealer.solve(annealer.formulate_problem(model, {"step": 2}))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_multipliers_survive_the_lr_scheduler():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    annealer = LRMultiplierAnnealer((x, y))
    annealer.bind(opt)
    annealer.multipliers = [2.0]
    for _ in range(3):
        opt.step()
        sched.step()  # resets lr to 0.1
        annealer.reapply()
        annealer.reapply()  # idempotent between scheduler steps
        assert math.isclose(opt.param_groups[0]["lr"], 0.2)


def _loaders(batch_size=16):
    x, y = _data(160)
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=32)
    return train, val


def _config(**kw):
    base = dict(
        epochs=3, learning_rate=1e-3, batch_size=16, lr_scheduler="constant", warmup_ratio=0.0,
        tracking=False,
    )  # fmt: skip
    return TrainingConfig(**{**base, **kw})


def test_model_trainer_on_plain_dataloaders(tmp_path):
    train, val = _loaders()
    model = _model()
    first = [p.detach().clone() for p in model.parameters()]
    cfg = _config(learning_rate=0.05, checkpoint_dir=str(tmp_path / "ckpt"))
    result = ModelTrainer(model, cfg).train(train, val)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.metrics["val_accuracy"] > 0.8
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.optimization_results == []
    assert result.checkpoint_path.startswith(str(tmp_path / "ckpt"))
    # the user's module holds the trained weights
    assert any(not torch.equal(a, b) for a, b in zip(first, model.parameters(), strict=True))
    assert result.model is model


def test_model_trainer_periodic_optimizer_called_and_applied(tmp_path):
    train, val = _loaders()  # 128 rows / 16 = 8 batches per epoch, 3 epochs = 24 batches
    plain = ModelTrainer(_model(), _config()).train(train, val)
    result = ModelTrainer(
        _model(), _config(), quantum_optimizer="anneal", optimization_frequency=5
    ).train(train, val)
    assert [r.step for r in result.optimization_results] == [5, 10, 15, 20]
    assert any(r.applied for r in result.optimization_results)
    last = result.optimization_results[-1].details["cumulative_multipliers"]
    assert last != [1.0, 1.0]
    # the reported learning rate is the configured one times the chosen multiplier
    assert result.history[-1]["learning_rate"] != plain.history[-1]["learning_rate"]
    assert math.isclose(result.history[-1]["learning_rate"], 1e-3 * last[0], rel_tol=1e-6)


def test_model_trainer_seed_style_callbacks(tmp_path):
    train, val = _loaders()

    class Seed004Callback:
        def __init__(self, path):
            self.path = path

        def on_epoch_end(self, trainer, epoch, metrics):
            with open(self.path, "a") as f:
                f.write(f"{epoch} {type(trainer.model).__name__} {metrics['val_loss']:.3f}\n")

    log = tmp_path / "log.txt"
    ModelTrainer(_model(), _config(epochs=2)).train(
        train, val, callbacks=[Seed004Callback(str(log))]
    )
    lines = log.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["1", "Sequential"], ["2", "Sequential"]]


def test_model_trainer_rejects_bad_optimizer():
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="lacks formulate_problem"):
        ModelTrainer(_model(), _config(), quantum_optimizer=object())
