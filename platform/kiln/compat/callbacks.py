"""Trainer-first callbacks for :class:`~kiln.compat.trainer.ModelTrainer`, and adapters.

:class:`TrainingCallback` methods take the trainer first::

    on_training_start(trainer)
    for epoch in 1..epochs:
        on_epoch_start(trainer, epoch)
        for each batch: train step, backward, optimizer step
            on_step_end(trainer, step, {"loss": ...})      # step counts batches over the run
        validate
        on_epoch_end(trainer, epoch, metrics)                # train_* and val_* metrics
        stop when any callback has ``stop_training`` set
    on_training_end(trainer)

Inside ``ModelTrainer`` the trainer is the ``ModelTrainer`` itself. Run through kiln's
``Trainer`` (``TrainingEngine(callbacks=...)``, ``Trainer(hooks=...)``), such a callback
needs :class:`SeedCallbackAdapter`, which calls it from kiln's one callback interface
(:class:`~kiln.engine.callbacks.CallbackBase`) with a namespace holding ``model``,
``optimizer`` and ``config`` as the trainer. :func:`adapt_callback` picks the adapter
when one is needed. :class:`KilnCallbackAdapter` goes the other way: it runs kiln
callbacks and hooks inside ``ModelTrainer``.
"""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace
from typing import Any

from kiln.engine.callbacks import (
    CallbackBase,
    TrainingHooks,
)
from kiln.engine.callbacks import (
    EarlyStoppingCallback as _EarlyStopping,
)
from kiln.errors import ConfigError
from kiln.tracking.tracker import MetricsTracker

__all__ = [
    "CheckpointCallback",
    "EarlyStoppingCallback",
    "KilnCallbackAdapter",
    "MetricsCallback",
    "SeedCallbackAdapter",
    "TrainingCallback",
    "adapt_callback",
]


class TrainingCallback:
    """Base class with no-op hooks that take the trainer first (see the module docstring)."""

    stop_training: bool = False

    def on_training_start(self, trainer: Any) -> None:
        """Once, before the first epoch."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """At the start of each epoch (counted from 1)."""

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        """After each training batch; ``metrics["loss"]`` is that batch's loss."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        """At the end of each epoch, with train and validation metrics."""

    def on_training_end(self, trainer: Any) -> None:
        """Once, after the last epoch (also after an early stop)."""


class MetricsCallback(TrainingCallback):
    """Records step losses and epoch metrics in a :class:`MetricsTracker`.

    Args:
        tracker: where to record; a new in-memory tracker when None.
        log_every_n_steps: record the step loss every N steps (0: epochs only).
    """

    def __init__(self, tracker: MetricsTracker | None = None, log_every_n_steps: int = 1) -> None:
        n = log_every_n_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"log_every_n_steps must be an int >= 0; got {n!r}")
        self.tracker = tracker if tracker is not None else MetricsTracker()
        self.log_every_n_steps = log_every_n_steps
        self.history: list[dict[str, float]] = []

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        n = self.log_every_n_steps
        if n and step % n == 0:
            self.tracker.update({"step_loss": float(metrics["loss"])}, step=step)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        row = {k: float(v) for k, v in metrics.items() if _is_number(v) and k not in _NOT_METRICS}
        self.tracker.update(row, epoch=epoch)
        self.history.append({"epoch": epoch, **row})

    def get_summary(self) -> dict[str, Any]:
        """The tracker's per-metric summary."""
        return self.tracker.get_summary()


class CheckpointCallback(TrainingCallback):
    """Saves model, optimizer and scheduler state through kiln's ``CheckpointManager``.

    Checkpoints are ``<dirpath>/epoch_NNNN/`` folders, crash-ordered, with the best
    ``keep_best_k`` by ``monitor`` and the last ``keep_last_n`` kept.

    Args:
        dirpath: the checkpoint folder; default the trainer's ``config.checkpoint_dir``,
            else ``./checkpoints``.
        monitor, mode: the metric that ranks checkpoints and whether lower is better.
        save_every_n_epochs: checkpoint interval (the last epoch is always saved).
        keep_best_k, keep_last_n: retention.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        save_every_n_epochs: int = 1,
        keep_best_k: int = 1,
        keep_last_n: int = 1,
    ) -> None:
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.monitor, self.mode = monitor, mode
        self.save_every_n_epochs = save_every_n_epochs
        self.keep_best_k, self.keep_last_n = keep_best_k, keep_last_n
        self.best_path: str | None = None
        self.last_path: str | None = None
        self._manager: Any = None

    def on_training_start(self, trainer: Any) -> None:
        from kiln.engine.checkpoint import CheckpointManager

        config = getattr(trainer, "config", None)
        self.dirpath = self.dirpath or getattr(config, "checkpoint_dir", None) or "checkpoints"
        self._manager = CheckpointManager(
            self.dirpath,
            keep_best_k=self.keep_best_k,
            keep_last_n=self.keep_last_n,
            monitor=self.monitor,
            mode=self.mode,
            save_interval_epochs=self.save_every_n_epochs,
        )

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        if self._manager is None:
            self.on_training_start(trainer)
        last = epoch >= getattr(getattr(trainer, "config", None), "epochs", epoch)
        if not self._manager.should_save(epoch, is_last=last):
            return
        numbers = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        meta = self._manager.save_checkpoint(
            epoch,
            numbers,
            trainer.model,
            getattr(trainer, "optimizer", None),
            getattr(trainer, "scheduler", None),
            blocking=True,
        )
        self.last_path = meta.path
        self.best_path = self._manager.get_best_checkpoint() or meta.path

    def on_training_end(self, trainer: Any) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


class EarlyStoppingCallback(TrainingCallback):
    """Stops ``ModelTrainer.train`` when ``monitor`` stops improving.

    The decision is kiln's :class:`~kiln.engine.callbacks.EarlyStoppingCallback`
    (``patience`` epochs without an improvement of more than ``min_delta``).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 5,
        min_delta: float = 0.0,
        mode: str = "min",
    ) -> None:
        self.policy = _EarlyStopping(monitor, patience, min_delta, mode)
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        self.policy.on_epoch_end(epoch, metrics)
        if self.policy.stop_training:
            self.stop_training = True
            self.stopped_epoch = epoch


class SeedCallbackAdapter(CallbackBase):
    """Runs a trainer-first callback inside kiln's loop (``Trainer``, ``TrainingEngine``).

    The "trainer" it passes is one namespace per process with ``model``, ``optimizer``,
    ``config``, ``rank``, ``world_size`` and ``stop_training`` (set it to stop the run,
    as setting the callback's own ``stop_training`` does).
    """

    def __init__(self, callback: Any, config: Any = None) -> None:
        self.callback, self.config = callback, config
        self.steps = 0
        self.trainer: SimpleNamespace | None = None

    def set_context(self, model=None, optimizer=None, rank: int = 0, world_size: int = 1) -> None:
        super().set_context(model, optimizer, rank, world_size)
        self.trainer = None  # rebuilt around this process's model and optimizer

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["trainer"] = None  # holds the process-local model
        return state

    def _trainer(self) -> SimpleNamespace:
        if self.trainer is None:
            self.trainer = SimpleNamespace(
                model=self.model,
                optimizer=self.optimizer,
                config=self.config,
                rank=self.rank,
                world_size=self.world_size,
                stop_training=False,
            )
        return self.trainer

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

    def on_train_end(self, logs=None) -> None:
        self._call("on_training_end")

    @property
    def stop_training(self) -> bool:  # type: ignore[override]  # read from the wrapped object
        asked = self.trainer is not None and bool(self.trainer.stop_training)
        return asked or bool(getattr(self.callback, "stop_training", False))


class KilnCallbackAdapter(TrainingCallback):
    """Runs a kiln ``CallbackBase`` or ``TrainingHooks`` object inside ``ModelTrainer``."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.is_callback = isinstance(callback, CallbackBase)

    @property
    def stop_training(self) -> bool:  # type: ignore[override]  # read from the wrapped object
        return bool(getattr(self.callback, "stop_training", False))

    def _hook(self, name: str, *args: Any) -> None:
        fn = getattr(self.callback, name, None)
        if callable(fn):
            fn(*args)

    def on_training_start(self, trainer: Any) -> None:
        if self.is_callback:
            self.callback.set_context(model=trainer.model, optimizer=trainer.optimizer)
            self.callback.on_train_begin({"epochs": trainer.config.epochs})
        else:
            self._hook("on_training_start")

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if self.is_callback:
            self.callback.on_epoch_begin(epoch, {})
        else:
            self._hook("on_epoch_start", epoch)

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        batch = int(metrics.get("batch", step - 1))  # kiln counts batches within the epoch
        if self.is_callback:
            self.callback.on_batch_end(batch, dict(metrics))
        else:
            self._hook("on_batch_end", batch, float(metrics["loss"]))

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        if self.is_callback:
            self.callback.on_epoch_end(epoch, dict(metrics))
            return
        val = {k: v for k, v in metrics.items() if k.startswith("val_")}
        if val:
            self._hook("on_validation_end", val)
        self._hook("on_epoch_end", epoch, dict(metrics))

    def on_training_end(self, trainer: Any) -> None:
        if self.is_callback:
            self.callback.on_train_end({})
        else:
            self._hook("on_training_end")


def adapt_callback(callback: Any, config: Any = None) -> Any:
    """For kiln's loop: kiln callbacks and hooks pass through; trainer-first ones are wrapped."""
    if isinstance(callback, (CallbackBase, TrainingHooks)):
        return callback
    if isinstance(callback, TrainingCallback) or _takes_trainer_first(callback):
        return SeedCallbackAdapter(callback, config)
    return callback


def as_trainer_callback(callback: Any) -> Any:
    """For ``ModelTrainer``: trainer-first callbacks pass through; kiln ones are wrapped."""
    if isinstance(callback, TrainingCallback) or _takes_trainer_first(callback):
        return callback
    return KilnCallbackAdapter(callback)


def _takes_trainer_first(callback: Any) -> bool:
    """True for duck-typed callbacks shaped like :class:`TrainingCallback`."""
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


_NOT_METRICS = {"epoch", "timestamp", "global_step"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
