"""Seed 004's ``ModelTrainer``: train a module on plain DataLoaders, optionally with a
periodic optimizer, on the same kiln Trainer and worker loop as every other run.

    trainer = ModelTrainer(model, TrainingConfig(epochs=5, learning_rate=1e-2),
                           quantum_optimizer=LRMultiplierAnnealer(held_out=(x_val, y_val)),
                           optimization_frequency=20)
    result = trainer.train(train_loader, val_loader)
    result.metrics, result.history, result.optimization_results, result.model

It has no loop of its own: it builds hooks (the periodic-optimization callback and
adapters for seed-style callbacks) and calls ``kiln.engine.trainer.Trainer.train``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from kiln.config import TaskSpec, TrainingConfig
from kiln.engine.callbacks import CallbackBase
from kiln.errors import ConfigError
from kiln.tune.periodic import (
    LRMultiplierAnnealer,
    OptimizationResult,
    PeriodicOptimizationCallback,
    read_optimization_log,
)


@dataclass
class TrainingResult:
    """What ``ModelTrainer.train`` returns (seed 004)."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metrics: dict[str, Any]
    checkpoint_path: str | None
    model: nn.Module
    optimization_results: list[OptimizationResult] = field(default_factory=list)
    run_id: int | None = None
    total_time: float = 0.0
    stopped_early: bool = False

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


class ModelTrainer:
    """Train ``model`` with ``config``; call ``quantum_optimizer`` every N batches.

    Args:
        model: the module to train (updated in place with the final weights).
        config: a TrainingConfig, or a dict of its fields.
        quantum_optimizer: a :class:`~kiln.tune.periodic.PeriodicOptimizer`, or
            ``"anneal"`` for an :class:`LRMultiplierAnnealer` judged on one batch of
            the validation loader (the training loader when there is none).
        optimization_frequency: training batches between optimizer calls.
        task_spec: what is predicted; default inferred from the first batch (integer
            labels: classification with the model's output width as class count).
        storage_path, db_path: passed to the Trainer (defaults under KILN_HOME).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig | dict[str, Any] | None = None,
        quantum_optimizer: Any = None,
        *,
        optimization_frequency: int = 100,
        task_spec: TaskSpec | None = None,
        storage_path: str | os.PathLike[str] | None = None,
        db_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.quantum_optimizer = quantum_optimizer
        self.optimization_frequency = optimization_frequency
        self.task_spec = task_spec
        self.storage_path, self.db_path = storage_path, db_path
        self.setup_training()

    def setup_training(self) -> None:
        """Validate the inputs (seed name); nothing is built until ``train``."""
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        cfg = self.config
        if cfg is None:
            cfg = TrainingConfig()
        elif isinstance(cfg, dict):
            cfg = TrainingConfig.from_dict(cfg)
        self.config = cfg.validate()
        if self.optimization_frequency < 1:
            raise ConfigError(
                f"optimization_frequency={self.optimization_frequency!r} must be >= 1"
            )
        q = self.quantum_optimizer
        if q is not None and q != "anneal":
            missing = [
                m for m in ("formulate_problem", "solve", "apply_solution")
                if not callable(getattr(q, m, None))
            ]  # fmt: skip
            if missing:
                raise ConfigError(
                    f"quantum_optimizer={q!r} lacks {', '.join(missing)}; pass a "
                    "PeriodicOptimizer, 'anneal', or None"
                )

    def train(
        self,
        train_dataloader: torch.utils.data.DataLoader,
        val_dataloader: torch.utils.data.DataLoader | None = None,
        callbacks: list[Any] | None = None,
    ) -> TrainingResult:
        """Train on the loaders; return metrics, history and the optimizer's results."""
        from kiln.engine.trainer import Trainer

        hooks = [_adapt(cb, self.config) for cb in callbacks or []]
        log_dir = None
        if self.quantum_optimizer is not None:
            solver = self.quantum_optimizer
            if solver == "anneal":
                solver = LRMultiplierAnnealer(_first_batch(val_dataloader or train_dataloader))
            log_dir = Path(tempfile.mkdtemp(prefix="kiln-periodic-"))
            hooks.append(
                PeriodicOptimizationCallback(
                    solver, self.optimization_frequency, log_path=log_dir / "results.jsonl"
                )
            )
        task = self.task_spec or _infer_task(self.model, train_dataloader)
        trainer = Trainer(
            model=self.model,
            training_config=self.config,
            task_spec=task,
            hooks=hooks,
            storage_path=self.storage_path,
            db_path=self.db_path,
        )
        try:
            results = trainer.train(train_dataloader, val_dataloader)
            optimization = read_optimization_log(log_dir / "results.jsonl") if log_dir else []
        finally:
            if log_dir is not None:
                shutil.rmtree(log_dir, ignore_errors=True)
        history = results["history"]
        best = next((h for h in history if h["epoch"] == results["best_epoch"]), {})
        return TrainingResult(
            metrics=results["final_metrics"],
            history=history,
            best_epoch=results["best_epoch"],
            best_metrics={k: v for k, v in best.items() if k != "steps"},
            checkpoint_path=results["checkpoint_path"],
            model=trainer.trained_model or self.model,
            optimization_results=optimization,
            run_id=results.get("run_id"),
            total_time=results["total_time"],
            stopped_early=results["stopped_early"],
        )


class SeedCallbackAdapter(CallbackBase):
    """Runs a seed-004 ``TrainingCallback`` (methods take the trainer first) in the loop.

    The "trainer" it receives inside the loop is a namespace with ``model``,
    ``optimizer`` and ``config``.
    """

    def __init__(self, callback: Any, config: TrainingConfig) -> None:
        self.callback, self.config = callback, config
        self.steps = 0

    def _trainer(self) -> SimpleNamespace:
        return SimpleNamespace(model=self.model, optimizer=self.optimizer, config=self.config)

    def _call(self, name: str, *args: Any) -> None:
        fn = getattr(self.callback, name, None)
        if callable(fn):
            fn(self._trainer(), *args)

    def on_train_begin(self, logs=None) -> None:
        self._call("on_training_start")

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._call("on_epoch_start", epoch)

    def on_batch_end(self, batch, logs=None) -> None:
        self.steps += 1
        self._call("on_step_end", self.steps, dict(logs or {}))

    def on_epoch_end(self, epoch, logs=None) -> None:
        self._call("on_epoch_end", epoch, dict(logs or {}))

    @property  # type: ignore[override]
    def stop_training(self) -> bool:
        return bool(getattr(self.callback, "stop_training", False))


def _adapt(callback: Any, config: TrainingConfig) -> Any:
    """kiln hooks/callbacks pass through; seed-style callbacks get an adapter."""
    from kiln.engine.callbacks import TrainingHooks

    if isinstance(callback, (CallbackBase, TrainingHooks)):
        return callback
    if _is_seed_style(callback):
        return SeedCallbackAdapter(callback, config)
    return callback


def _is_seed_style(callback: Any) -> bool:
    """Seed-004 callbacks take the trainer first: ``on_epoch_end(trainer, epoch, metrics)``."""
    import inspect

    if callable(getattr(callback, "on_step_end", None)):
        return True
    for name, kiln_arity in (("on_training_start", 0), ("on_epoch_start", 1), ("on_epoch_end", 2)):
        fn = getattr(callback, name, None)
        if callable(fn):
            try:
                arity = len(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                continue
            if arity > kiln_arity:
                return True
    return False


def _first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    batch = next(iter(loader))
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    return batch[0], batch[1]


def _infer_task(model: nn.Module, loader: torch.utils.data.DataLoader) -> TaskSpec | None:
    """Classification with the model's output width as class count, for integer labels."""
    x, y = _first_batch(loader)
    y = torch.as_tensor(y)
    if torch.is_floating_point(y):
        return None  # regression: the data plan infers it
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(x)[:1])
    model.train(was_training)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return TaskSpec.classification(name="model_trainer", num_classes=int(out.shape[-1]))
