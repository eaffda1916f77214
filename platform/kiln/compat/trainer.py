"""ModelTrainer: train a module on plain DataLoaders in this process, step by step.

Each piece of the loop is a method, so a hand-written loop can use kiln's steps::

    trainer = ModelTrainer(model, TrainingConfig(epochs=5, learning_rate=1e-2))
    for epoch in range(5):
        trainer.train_epoch(train_loader)       # kiln's TrainingLoop, one epoch
        trainer.validate(val_loader)            # kiln's ValidationLoop
        if trainer.should_optimize():
            trainer.quantum_optimize()          # one periodic-optimizer round
    result = trainer.get_training_result()

``train(train_loader, val_loader, callbacks)`` is that loop plus callbacks. The
epoch runs in kiln's :class:`~kiln.engine.loops.TrainingLoop`, the step loop the
Trainer's workers run, with kiln's optimizer, schedule, precision, clipping and
loss strategies. Batches that loop cannot read (Hugging Face style dicts whose
model computes the loss), or a subclass that overrides ``train_step``,
``backward_step`` or ``optimization_step``, make ``train_epoch`` drive those three
methods per batch instead. Runs needing workers, Ray Data or run records go
through :class:`kiln.Trainer`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kiln.compat.callbacks import (
    CheckpointCallback,
    KilnCallbackAdapter,
    as_trainer_callback,
)
from kiln.compat.steps import TrainingStep, infer_loss_name, model_device
from kiln.config import TaskSpec, TrainingConfig
from kiln.engine.callbacks import EarlyStoppingCallback as _EarlyStopping
from kiln.engine.gradients import GradientAccumulator
from kiln.engine.loops import TrainingLoop, ValidationLoop, unpack_batch
from kiln.engine.loss import ModelOutput, get_loss_strategy, loss_for_task
from kiln.engine.optim import Precision, build_optimizer, build_scheduler
from kiln.errors import ConfigError
from kiln.tracking.tracker import MetricsTracker, metric_mode
from kiln.tune.periodic import LRMultiplierAnnealer, OptimizationResult, check_solver, optimize_once

__all__ = ["ModelTrainer", "TrainingResult"]


@dataclass
class TrainingResult:
    """What ``ModelTrainer.train`` returns: metrics, history and the trained model."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metrics: dict[str, Any]
    checkpoint_path: str | None
    model: nn.Module
    optimization_results: list[OptimizationResult] = field(default_factory=list)
    total_time: float = 0.0
    stopped_early: bool = False
    global_step: int = 0

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        """The trained model's state dict."""
        return self.model.state_dict()


class ModelTrainer:
    """Train ``model`` with ``config``, optionally calling a periodic optimizer.

    Args:
        model: the module to train, in place, on its own device.
        config: a TrainingConfig, or a dict of its fields (``num_epochs`` means ``epochs``).
        quantum_optimizer: a :class:`~kiln.tune.periodic.PeriodicOptimizer`, or
            ``"anneal"`` for an :class:`~kiln.tune.periodic.LRMultiplierAnnealer` judged on
            one batch of the validation loader (the training loader when there is none).
        optimization_frequency: training batches between periodic-optimizer rounds.
        task_spec: what is predicted (its task type picks the loss and metrics, its
            columns read dict batches); default inferred from the first batch: integer
            labels classify (per token for ``[B, T, V]`` outputs), float labels regress.
            ``config.loss`` overrides the loss either way.
        metrics_tracker: where epoch metrics are recorded, e.g. a
            :class:`~kiln.tracking.MetricsTracker` over an ExperimentDB run; in memory
            by default.

    A callback (or the caller) may set ``trainer.stop_training = True`` to end ``train``
    after the current epoch.
    """

    stop_training: bool = False

    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig | dict[str, Any] | None = None,
        quantum_optimizer: Any = None,
        *,
        optimization_frequency: int = 100,
        task_spec: TaskSpec | None = None,
        metrics_tracker: MetricsTracker | None = None,
    ) -> None:
        self.model = model
        self.config = _as_config(config)
        self.quantum_optimizer = quantum_optimizer
        self.optimization_frequency = optimization_frequency
        self.task_spec = task_spec
        self.metrics_tracker = metrics_tracker if metrics_tracker is not None else MetricsTracker()
        self.setup_training()

    # ------------------------------------------------------------------ setup
    def setup_training(self) -> None:
        """Check the inputs and build the optimizer, precision and step handlers."""
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        self.config.validate()
        if isinstance(self.optimization_frequency, bool) or self.optimization_frequency < 1:
            raise ConfigError(
                f"optimization_frequency={self.optimization_frequency!r} must be an int >= 1"
            )
        q = self.quantum_optimizer
        if q is not None and q != "anneal":
            check_solver(q)
        cfg = self.config
        self.device = model_device(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.precision = Precision.from_config(cfg, self.device)
        self.scaler = self.precision.make_scaler()
        self.accumulator = GradientAccumulator(cfg.gradient_accumulation_steps, cfg.max_grad_norm)
        task = self.task_spec
        self._task: str | None = task.task_type if task is not None else None
        self.step_handler = TrainingStep(
            self.model,
            self.optimizer,
            precision=self.precision,
            scaler=self.scaler,
            loss_strategy=_loss_for(cfg, task),
            input_column=task.input_column if task is not None else "x",
            label_column=task.label_column if task is not None else "y",
        )
        self.callbacks: list[Any] = []
        self.history: list[dict[str, Any]] = []
        self.optimization_results: list[OptimizationResult] = []
        self.global_step = 0
        self.epoch = 0
        self.stopped_early = False
        self._last_optimized = 0
        self._micro_steps = 0
        self._running = _Running()
        self._epoch_metrics: dict[str, Any] = {}
        self._val_metrics: dict[str, Any] = {}
        self._last_loss = math.nan
        self._solver: Any = None if q == "anneal" else q
        self._bind_solver()
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ the whole run
    def train(
        self,
        train_dataloader: Iterable[Any],
        val_dataloader: Iterable[Any] | None = None,
        callbacks: list[Any] | None = None,
    ) -> TrainingResult:
        """Train for ``config.epochs`` epochs; return metrics, history and the model."""
        self._prepare_run(train_dataloader, val_dataloader, callbacks)
        self._fire("on_training_start")
        for _ in range(self.config.epochs):
            self.train_epoch(train_dataloader)
            if val_dataloader is not None:
                self.validate(val_dataloader)
            if self.should_optimize():
                self.quantum_optimize()
            metrics = self.end_epoch()
            self._fire("on_epoch_end", self.epoch, metrics)
            if self.stop_training or any(
                getattr(c, "stop_training", False) for c in self.callbacks
            ):
                self.stopped_early = self.epoch < self.config.epochs
                break
        self._fire("on_training_end")
        return self.get_training_result()

    def train_epoch(self, dataloader: Iterable[Any]) -> dict[str, Any]:
        """Train one epoch over ``dataloader``; return its metrics (``train_loss``...)."""
        self.epoch += 1
        self._val_metrics = {}
        self._fire("on_epoch_start", self.epoch)
        first, batches = _peek(dataloader)
        if first is None:
            raise ConfigError("the training dataloader yielded no batches")
        self._ensure_ready(first, dataloader, training=True)
        if self._uses_kiln_loop(first):
            self._run_kiln_epoch(batches)
        else:
            self.model.train()
            self._running = _Running()
            start = time.perf_counter()
            for batch in batches:
                loss = self.train_step(batch)
                self.backward_step(loss)
                self.optimization_step()
            self._flush_accumulation()
            self._epoch_metrics = {
                **self._running.metrics("train"),
                "epoch_duration_seconds": time.perf_counter() - start,
            }
        self._epoch_metrics["learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        return self.get_epoch_metrics()

    def validate(self, dataloader: Iterable[Any]) -> dict[str, Any]:
        """Evaluate without gradients; return ``val_loss`` (and ``val_accuracy``...)."""
        first, batches = _peek(dataloader)
        if first is None:
            raise ConfigError("the validation dataloader yielded no batches")
        self._ensure_ready(first, dataloader, training=False)
        if self.step_handler.model_computes_loss(first):
            running = _Running()
            self.model.eval()
            with torch.no_grad():
                for batch in batches:
                    running.add(self.step_handler.forward_step(batch)[1])
            self._val_metrics = running.metrics("val")
        else:
            input_column, label_column = self.step_handler.columns
            assert self.step_handler.loss_strategy is not None  # set by _ensure_ready
            loop = ValidationLoop(
                self.step_handler.loss_strategy,
                precision=self.precision,
                task_type=self._task or "classification",
                input_column=input_column,
                label_column=label_column,
            )
            self._val_metrics = dict(
                loop.run_epoch(self.epoch, self.model, batches, self.device).metrics
            )
        return dict(self._val_metrics)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Any) -> torch.Tensor:
        """Forward pass and loss of one batch (the model in training mode)."""
        self.model.train()
        loss, metrics = self.step_handler.forward_step(batch)
        self._running.add(metrics)
        return loss

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward of the loss, divided over ``gradient_accumulation_steps``."""
        self.step_handler.backward_step(loss, self.config.gradient_accumulation_steps)
        self._micro_steps += 1
        self._last_loss = float(loss.detach())

    def optimization_step(self) -> None:
        """Finish the batch: an optimizer step when the accumulation window is full."""
        if self._micro_steps % self.config.gradient_accumulation_steps == 0:
            self._optimizer_step()
        self._after_batch(self._last_loss, self._micro_steps - 1)

    def should_optimize(self) -> bool:
        """True when a periodic optimizer is set and ``optimization_frequency`` steps passed."""
        return (
            self._solver is not None
            and self.global_step - self._last_optimized >= self.optimization_frequency
        )

    def quantum_optimize(self) -> OptimizationResult:
        """One periodic-optimizer round (formulate, solve, apply) on the model now."""
        if self._solver is None:
            hint = (
                "'anneal' builds its solver from the loaders in train(); to step by hand pass "
                "LRMultiplierAnnealer(held_out=(x, y))"
                if self.quantum_optimizer == "anneal"
                else "pass quantum_optimizer= a PeriodicOptimizer or 'anneal'"
            )
            raise ConfigError(f"quantum_optimize() has no solver: {hint}")
        metrics = {"step": self.global_step, "epoch": self.epoch, **self._epoch_metrics}
        result = optimize_once(self._solver, self.model, metrics)
        result.step = self.global_step
        self._last_optimized = self.global_step
        self.optimization_results.append(result)
        return result

    # ------------------------------------------------------------------ results
    def get_epoch_metrics(self) -> dict[str, Any]:
        """The current epoch's train (and, after ``validate``, validation) metrics.

        Before any ``train_epoch``, the train metrics are those of the steps taken by hand.
        """
        train = self._epoch_metrics or self._running.metrics("train")
        return {"epoch": self.epoch, **train, **self._val_metrics}

    def end_epoch(self) -> dict[str, Any]:
        """Record the epoch's metrics in the history and the tracker; return them."""
        metrics = {**self.get_epoch_metrics(), "global_step": self.global_step}
        metrics["timestamp"] = time.time()
        self.history.append(metrics)
        numbers = {k: v for k, v in metrics.items() if k not in ("epoch", "timestamp")}
        self.metrics_tracker.update(numbers, epoch=self.epoch)
        return metrics

    def get_training_result(self) -> TrainingResult:
        """Metrics of the last epoch, the history, the best epoch by ``config.monitor``."""
        history = self.history or [self.get_epoch_metrics()]
        best = _best(history, self.config.monitor, self.config.mode)
        checkpoint = None
        for cb in self.callbacks:
            inner = getattr(cb, "callback", None)  # a kiln callback inside its adapter
            checkpoint = (
                getattr(cb, "best_path", None) or getattr(inner, "best_path", None) or checkpoint
            )
        return TrainingResult(
            metrics=dict(history[-1]),
            history=[dict(h) for h in history],
            best_epoch=best.get("epoch"),
            best_metrics=dict(best),
            checkpoint_path=checkpoint,
            model=self.model,
            optimization_results=list(self.optimization_results),
            total_time=time.perf_counter() - self._started,
            stopped_early=self.stopped_early,
            global_step=self.global_step,
        )

    # ------------------------------------------------------------------ internals
    def _prepare_run(self, train_loader, val_loader, callbacks) -> None:
        cfg = self.config
        self._started = time.perf_counter()
        self.callbacks = [as_trainer_callback(cb) for cb in callbacks or []]
        if cfg.early_stopping_patience:
            policy = _EarlyStopping(
                cfg.monitor, cfg.early_stopping_patience, cfg.early_stopping_min_delta, cfg.mode
            )
            self.callbacks.append(KilnCallbackAdapter(policy))
        if cfg.checkpoint_dir and not any(
            isinstance(c, CheckpointCallback) for c in self.callbacks
        ):
            self.callbacks.append(
                CheckpointCallback(
                    cfg.checkpoint_dir,
                    cfg.monitor,
                    cfg.mode,
                    cfg.save_every_n_epochs,
                    cfg.keep_best_k,
                    cfg.keep_last_n,
                )
            )
        if self.quantum_optimizer == "anneal" and self._solver is None:
            first, _ = _peek(val_loader if val_loader is not None else train_loader)
            self._solver = LRMultiplierAnnealer(unpack_batch(first, *self.step_handler.columns))
            self._bind_solver()

    def _bind_solver(self) -> None:
        """Give the solver this trainer's optimizer, if it takes one."""
        bind = getattr(self._solver, "bind", None)
        if callable(bind):
            bind(self.optimizer)

    def _fire(self, name: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if callable(fn):
                fn(self, *args)

    def _ensure_ready(self, first: Any, loader: Any, training: bool) -> None:
        """Pick the loss and task from the first batch; the schedule from the training
        loader's length (once)."""
        if self.step_handler.loss_strategy is None or self._task is None:
            self._infer_task(first)
        if training and self.scheduler is None:
            try:
                batches = len(loader)
            except TypeError:
                batches = 0
            steps = (
                math.ceil(batches / self.config.gradient_accumulation_steps) * self.config.epochs
            )
            cfg = self.config if steps else self.config.replace(lr_scheduler="constant")
            self.scheduler = build_scheduler(self.optimizer, cfg, steps or 1)
            self.step_handler.scheduler = self.scheduler

    def _infer_task(self, first: Any) -> None:
        if self.step_handler.model_computes_loss(first):
            self._task = "model_loss"
            return
        inputs, labels = unpack_batch(first, *self.step_handler.columns)
        labels = torch.as_tensor(labels)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            logits = ModelOutput.from_raw(
                self.model(torch.as_tensor(inputs)[:2].to(self.device))
            ).logits
        self.model.train(was_training)
        name = infer_loss_name(logits, labels[:2])
        if self.step_handler.loss_strategy is None:
            self.step_handler.loss_strategy = get_loss_strategy(name)
        if self._task is None:  # the loops count accuracy for classification, MAE for regression
            self._task = name

    def _uses_kiln_loop(self, first: Any) -> bool:
        overridden = any(
            getattr(type(self), m) is not getattr(ModelTrainer, m)
            for m in ("train_step", "backward_step", "optimization_step")
        )
        return not overridden and not self.step_handler.model_computes_loss(first)

    def _run_kiln_epoch(self, batches: Iterator[Any]) -> None:
        assert self.step_handler.loss_strategy is not None  # set by _ensure_ready
        loop = TrainingLoop(
            self.accumulator,
            None,
            self.step_handler.loss_strategy,
            self.config.max_grad_norm,
            precision=self.precision,
            task_type=self._task or "classification",
            input_column=self.step_handler.columns[0],
            label_column=self.step_handler.columns[1],
        )
        loop.global_step = self.global_step
        result = loop.run_epoch(
            self.epoch,
            self.model,
            batches,
            self.optimizer,
            self.scheduler,
            self.device,
            metrics_callback=self._after_batch,
            scaler=self.scaler,
        )
        self._epoch_metrics = {
            **result.metrics,
            "epoch_duration_seconds": result.epoch_duration_seconds,
        }

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            self.accumulator.clip_gradients(self.model)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def _flush_accumulation(self) -> None:
        """A last partial accumulation window still updates the weights."""
        if self._micro_steps % self.config.gradient_accumulation_steps:
            self._optimizer_step()
        self._micro_steps = 0

    def _after_batch(self, loss: float, batch_idx: int) -> None:
        self.global_step += 1
        reapply = getattr(self._solver, "reapply", None)
        if callable(reapply):
            reapply()
        self._fire("on_step_end", self.global_step, {"loss": loss, "batch": batch_idx})
        if self.should_optimize():
            self.quantum_optimize()


class _Running:
    """Sample-weighted means of per-batch metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.samples = 0.0

    def add(self, metrics: dict[str, float]) -> None:
        n = metrics.get("batch_size", 1.0)
        self.samples += n
        for key, value in metrics.items():
            if key != "batch_size":
                self.sums[key] = self.sums.get(key, 0.0) + value * n

    def metrics(self, prefix: str) -> dict[str, float]:
        n = max(self.samples, 1.0)
        return {f"{prefix}_{k}": v / n for k, v in self.sums.items()}


def _loss_for(config: TrainingConfig, task: TaskSpec | None) -> Any:
    """``config.loss``, else the task's default loss (None: infer from the first batch)."""
    if config.loss:
        return get_loss_strategy(config.loss)
    if task is None:
        return None
    if (
        task.task_type in ("language_modeling", "sequence_to_sequence")
        and task.pad_token_id is not None
    ):
        return get_loss_strategy(loss_for_task(task.task_type), pad_token_id=task.pad_token_id)
    return get_loss_strategy(loss_for_task(task.task_type))


def _as_config(config: Any) -> TrainingConfig:
    if config is None:
        return TrainingConfig().validate()
    if isinstance(config, dict):
        data = dict(config)
        if "num_epochs" in data:
            data.setdefault("epochs", data.pop("num_epochs"))
        return TrainingConfig.from_dict(data)
    if isinstance(config, TrainingConfig):
        return config.validate()
    raise ConfigError(f"config must be a TrainingConfig or a dict, got {type(config).__name__}")


def _peek(loader: Iterable[Any]) -> tuple[Any, Iterator[Any]]:
    """The first batch and an iterator that still yields it (one pass over ``loader``)."""
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        return None, iter(())
    return first, itertools.chain([first], it)


def _best(history: list[dict[str, Any]], monitor: str, mode: str) -> dict[str, Any]:
    scored = [h for h in history if isinstance(h.get(monitor), (int, float))]
    if not scored:
        monitor = "train_loss"
        mode = metric_mode(monitor)
        scored = [h for h in history if isinstance(h.get(monitor), (int, float))]
    if not scored:
        return dict(history[-1])
    pick = min if mode == "min" else max
    return dict(pick(scored, key=lambda h: h[monitor]))
