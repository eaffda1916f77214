"""Hooks and callbacks: user code that runs at fixed points of the training loop.

Two interfaces, both with no-op defaults, both accepted by ``Trainer(hooks=...)``:

* :class:`TrainingHooks`: ``on_training_start()``, ``on_epoch_start(epoch)``,
  ``on_batch_end(batch_idx, loss)``, ``on_validation_end(metrics)``,
  ``on_epoch_end(epoch, metrics)``, ``on_training_end()``. Subclassing is optional:
  any object with some of these methods works (:class:`HookDispatcher` calls only
  the methods that exist).
* :class:`CallbackBase` (Keras style): ``on_train_begin(logs)``,
  ``on_epoch_begin(epoch, logs)``, ``on_batch_end(batch, logs)``,
  ``on_epoch_end(epoch, logs)``, ``on_train_end(logs)``, plus ``stop_training``.

Where they fire. Hooks and callbacks run inside each Ray Train worker process
(in the driver process when ``num_workers=0``), on every rank::

    set_context(model, optimizer, rank, world_size)           # every rank
    on_training_start / on_train_begin                        # every rank
    for epoch in 1..epochs:                                   # epochs count from 1
        on_epoch_start(epoch) / on_epoch_begin(epoch)         # every rank
        for batch_idx, batch in enumerate(shard):
            forward, backward, (optimizer step)
            on_batch_end(batch_idx, loss)                     # every rank, LOCAL loss
            every eval_every_n_steps optimizer steps:
                on_validation_end({..., "step": s})           # every rank, same values
        validate; metrics averaged over ranks
        on_validation_end(val_metrics)                        # every rank, same values
        on_epoch_end(epoch, metrics)                          # every rank, same values;
                                                              # new numeric keys join the record
        if any rank's stop_training: stop (ranks agree)       # early stopping
        rank 0: checkpoint; every rank: ray.train.report(metrics)
    on_training_end / on_train_end                            # every rank

Epoch-level hooks get metrics already averaged over ranks, so decisions made
from them (early stopping) agree on every rank; a number a hook adds is kept as
rank 0 has it, so derive it from those metrics. Batch-level hooks get the local
rank's loss. Callbacks that print or write files (:class:`LoggingCallback`,
:class:`ModelCheckpointCallback`) act on rank 0 only. Everything here pickles
(the objects are shipped to workers); the model and optimizer given by
``set_context`` are process-local and are dropped when a callback is pickled.

Callbacks whose methods take the trainer first (``on_epoch_end(trainer, epoch,
metrics)``) run here through :class:`kiln.compat.SeedCallbackAdapter`.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from kiln.errors import ConfigError

__all__ = [
    "TrainingHooks",
    "HookDispatcher",
    "CallbackBase",
    "CallbackList",
    "LoggingCallback",
    "ModelCheckpointCallback",
    "EarlyStoppingCallback",
    "StopDecision",
    "HOOK_NAMES",
]

logger = logging.getLogger(__name__)

HOOK_NAMES = (
    "on_training_start",
    "on_epoch_start",
    "on_batch_end",
    "on_validation_end",
    "on_epoch_end",
    "on_training_end",
)


class TrainingHooks:
    """Lifecycle hooks without arguments beyond the event's; every method is a no-op."""

    def on_training_start(self) -> None:
        """Once, before the first epoch."""

    def on_epoch_start(self, epoch: int) -> None:
        """At the start of each epoch (counted from 1)."""

    def on_batch_end(self, batch_idx: int, loss: float) -> None:
        """After each training batch, with this rank's loss."""

    def on_validation_end(self, metrics: dict[str, float]) -> None:
        """After validation, with validation metrics averaged over ranks."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """At the end of each epoch, with train and validation metrics. Numbers stored
        under new keys of ``metrics`` join the epoch's record (history, checkpoint
        ranking, ``monitor``); the loop's own values cannot be overwritten."""

    def on_training_end(self) -> None:
        """Once, after the last epoch (also after an early stop)."""


class HookDispatcher(TrainingHooks):
    """Calls each hook method on every given object that defines it.

    Accepts :class:`TrainingHooks` subclasses and duck-typed objects with any
    subset of the hook methods; ``None`` entries are skipped.
    """

    def __init__(self, *hooks: Any) -> None:
        flat: list[Any] = []
        for h in hooks:
            if isinstance(h, (list, tuple)):
                flat.extend(x for x in h if x is not None)
            elif h is not None:
                flat.append(h)
        self.hooks = flat

    def _call(self, name: str, *args: Any) -> None:
        for h in self.hooks:
            fn = getattr(h, name, None)
            if callable(fn):
                fn(*args)

    @property
    def stop_training(self) -> bool:
        """True when any wrapped object has ``stop_training`` set."""
        return any(bool(getattr(h, "stop_training", False)) for h in self.hooks)

    def on_training_start(self) -> None:
        self._call("on_training_start")

    def on_epoch_start(self, epoch: int) -> None:
        self._call("on_epoch_start", epoch)

    def on_batch_end(self, batch_idx: int, loss: float) -> None:
        self._call("on_batch_end", batch_idx, loss)

    def on_validation_end(self, metrics: dict[str, float]) -> None:
        self._call("on_validation_end", metrics)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self._call("on_epoch_end", epoch, metrics)

    def on_training_end(self) -> None:
        self._call("on_training_end")


class CallbackBase:
    """Keras-style callback; every method is a no-op. Set ``stop_training`` to end training."""

    stop_training: bool = False
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    rank: int = 0
    world_size: int = 1

    def set_context(
        self,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Called by the loop before training, in the process where the callback runs."""
        self.model = model
        self.optimizer = optimizer
        self.rank = rank
        self.world_size = world_size

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Once, before the first epoch."""

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Once, after the last epoch."""

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """At the start of each epoch."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """At the end of each epoch; ``logs`` holds the epoch's metrics. Numbers stored
        under new keys of ``logs`` join the epoch's record (as for TrainingHooks)."""

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """After each training batch; ``logs["loss"]`` is this rank's loss."""

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        """After each validation pass: the epoch's, and each ``eval_every_n_steps`` one
        (whose ``metrics`` carry ``"step"``); values averaged over ranks."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("model", None)  # process-local; set again by set_context
        state.pop("optimizer", None)
        return state


class CallbackList(CallbackBase):
    """Forwards every event to each callback in order; stops when any asks to."""

    def __init__(self, callbacks: Iterable[CallbackBase] | None = None) -> None:
        self.callbacks: list[CallbackBase] = list(callbacks or [])

    def append(self, callback: CallbackBase) -> None:
        self.callbacks.append(callback)

    @property  # type: ignore[override]
    def stop_training(self) -> bool:
        return any(cb.stop_training for cb in self.callbacks)

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        for cb in self.callbacks:
            cb.stop_training = value

    def set_context(self, model=None, optimizer=None, rank: int = 0, world_size: int = 1) -> None:
        super().set_context(model, optimizer, rank, world_size)
        for cb in self.callbacks:
            cb.set_context(model=model, optimizer=optimizer, rank=rank, world_size=world_size)

    def on_train_begin(self, logs=None) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(logs)

    def on_train_end(self, logs=None) -> None:
        for cb in self.callbacks:
            cb.on_train_end(logs)

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, logs)

    def on_batch_end(self, batch: int, logs=None) -> None:
        for cb in self.callbacks:
            cb.on_batch_end(batch, logs)

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_validation_end(metrics)

    def __len__(self) -> int:
        return len(self.callbacks)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # numpy scalars
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


def _format(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"


_NOT_SHOWN = {"epoch", "timestamp", "global_step", "epoch_duration_seconds"}


class LoggingCallback(CallbackBase):
    """Prints one line per epoch (``epoch 3/10 - train_loss=0.41 val_loss=0.52 - 1.2s``).

    Args:
        log_every_n_batches: also print the loss every N batches (0: never).
        file: append lines to this path instead of printing to stdout.
        rank_zero_only: print on rank 0 only (the default).
        total_epochs: N in ``epoch i/N``; also read from ``logs["epochs"]`` at train begin.
    """

    def __init__(
        self,
        log_every_n_batches: int = 0,
        file: str | os.PathLike[str] | None = None,
        rank_zero_only: bool = True,
        total_epochs: int | None = None,
    ) -> None:
        if not isinstance(log_every_n_batches, int) or log_every_n_batches < 0:
            raise ConfigError(
                f"log_every_n_batches must be an int >= 0; got {log_every_n_batches!r}"
            )
        if file is not None and not isinstance(file, (str, os.PathLike)):
            raise ConfigError(f"file must be a path or None; got {type(file).__name__}")
        self.log_every_n_batches = log_every_n_batches
        self.file = os.fspath(file) if file is not None else None
        self.rank_zero_only = rank_zero_only
        self.total_epochs = total_epochs
        self._epoch_start: float | None = None
        self._train_start: float | None = None

    def _emit(self, line: str) -> None:
        if self.rank_zero_only and self.rank != 0:
            return
        if self.file is None:
            print(line, file=sys.stdout, flush=True)
        else:
            with open(self.file, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def on_train_begin(self, logs=None) -> None:
        self._train_start = time.perf_counter()
        epochs = (logs or {}).get("epochs")
        if epochs is not None:
            self.total_epochs = int(epochs)

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch_start = time.perf_counter()

    def on_batch_end(self, batch: int, logs=None) -> None:
        n = self.log_every_n_batches
        if n and (batch + 1) % n == 0:
            loss = _number((logs or {}).get("loss"))
            shown = "n/a" if loss is None else f"{loss:.4g}"
            self._emit(f"  batch {batch + 1}: loss={shown}")

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        logs = logs or {}
        of = f"/{self.total_epochs}" if self.total_epochs else ""
        parts = []
        for key, value in logs.items():
            number = _number(value)
            if key not in _NOT_SHOWN and number is not None:
                parts.append(f"{key}={_format(number)}")
        duration = _number(logs.get("epoch_duration_seconds"))
        if duration is None and self._epoch_start is not None:
            duration = time.perf_counter() - self._epoch_start
        tail = f" - {duration:.1f}s" if duration is not None else ""
        self._emit(f"epoch {epoch}{of} - {' '.join(parts) or 'no metrics'}{tail}")

    def on_train_end(self, logs=None) -> None:
        if self._train_start is not None:
            self._emit(f"training finished in {time.perf_counter() - self._train_start:.1f}s")


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max'; got {mode!r}")


REGISTER_WHEN = ("best", "every")


class ModelCheckpointCallback(CallbackBase):
    """Saves the model's state dict on rank 0 when ``monitor`` improves (or every epoch).

    Writes through :class:`~kiln.engine.checkpoint.CheckpointManager` (crash-ordered,
    ``epoch_NNNN/model.pt`` + ``metadata.json``), keeping the best and the latest.

    With a ``registry``, saved checkpoints also become versions of ``register_as`` in
    that :class:`~kiln.tracking.ModelRegistry`: the best one when training ends
    (``register="best"``), or each one as it is saved (``"every"``). Only the driver
    writes to the database, so the registry link works where the callback runs in the
    driver (in-process runs, ``num_workers=0``); a copy shipped to a Ray worker has no
    registry and logs that it skipped registering (use ``TrainingConfig.register_as``
    there). :attr:`registered` lists the new model ids.

    Args:
        dirpath: directory for the checkpoints.
        monitor: metric in the epoch logs; missing -> a warning once and no save
            (with ``save_best_only``).
        mode: ``"min"`` or ``"max"``.
        save_best_only: save only on improvement; False saves every epoch.
        registry: a ModelRegistry to register checkpoints in.
        register_as: the model name for the registered versions (needed with ``registry``).
        register: ``"best"`` or ``"every"``.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        monitor: str = "val_loss",
        mode: str = "min",
        save_best_only: bool = True,
        registry: Any = None,
        register_as: str | None = None,
        register: str = "best",
    ) -> None:
        _check_mode(mode)
        errors = []
        if register not in REGISTER_WHEN:
            errors.append(f"register must be one of {', '.join(REGISTER_WHEN)}; got {register!r}")
        if registry is not None and not register_as:
            errors.append(
                f"register_as must name the model when registry is given; got {register_as!r}"
            )
        if errors:
            raise ConfigError(errors)
        self.registry = registry
        self.register_as = register_as
        self.register = register
        self.registered: list[int] = []
        self._wants_registry = registry is not None
        self.dirpath = os.fspath(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.save_best_only = save_best_only
        self.best: float | None = None
        self.best_path: str | None = None
        self.last_path: str | None = None
        self.best_metrics: dict[str, float] = {}
        self._warned = False
        self._warned_registry = False
        self._manager: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_manager"] = None  # holds a thread pool; rebuilt where it runs
        state["registry"] = None  # a database connection: only the driver writes
        return state

    def _register(self, path: str, metrics: dict[str, float]) -> None:
        if self.registry is None:
            if self._wants_registry and not self._warned_registry:
                self._warned_registry = True
                logger.warning(
                    "ModelCheckpointCallback runs in a Ray worker and has no registry there; "
                    "not registering %s (set TrainingConfig.register_as to register the best "
                    "checkpoint from the driver)",
                    self.register_as,
                )
            return
        model_id = self.registry.register_model(self.register_as, path, metrics=metrics)
        self.registered.append(model_id)

    def _get_manager(self) -> Any:
        if self._manager is None:
            from kiln.engine.checkpoint import CheckpointManager

            self._manager = CheckpointManager(
                self.dirpath, keep_best_k=1, keep_last_n=1, monitor=self.monitor, mode=self.mode
            )
        return self._manager

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self.rank != 0:
            return
        if self.model is None:
            if not self._warned:
                self._warned = True
                logger.warning("ModelCheckpointCallback has no model (set_context was not called)")
            return
        logs = logs or {}
        value = _number(logs.get(self.monitor))
        if value is not None and not math.isfinite(value):
            value = None
        if value is None and not self._warned:
            self._warned = True
            logger.warning(
                "ModelCheckpointCallback: metric %r not in epoch logs (keys: %s)%s",
                self.monitor,
                sorted(logs),
                "; not saving" if self.save_best_only else "",
            )
        improved = value is not None and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        )
        if self.save_best_only and not improved:
            return
        metrics = {k: n for k, v in logs.items() if (n := _number(v)) is not None}
        meta = self._get_manager().save_checkpoint(epoch, metrics, self.model)
        self.last_path = meta.path
        if improved:
            self.best = value
            self.best_path = meta.path
            self.best_metrics = metrics
        if self.register == "every":
            self._register(meta.path, metrics)

    def on_train_end(self, logs=None) -> None:
        if self._manager is not None:
            self._manager.wait()
        if self.register == "best" and self.rank == 0 and self.best_path is not None:
            self._register(self.best_path, self.best_metrics)
        if self._manager is not None:
            self._manager.close()


class StopDecision(enum.Enum):
    """What one early-stopping update concluded."""

    IMPROVED = "improved"
    WAIT = "wait"
    STOP = "stop"
    SKIPPED = "skipped"  # the monitored metric was missing or not finite

    @property
    def stops(self) -> bool:
        return self is StopDecision.STOP


class EarlyStoppingCallback(CallbackBase):
    """Stops training when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    An improvement is ``value < best - min_delta`` (``mode="min"``) or
    ``value > best + min_delta`` (``"max"``). Epoch logs are averaged over ranks,
    so every rank reaches the same decision. ``best`` and ``wait`` are plain
    values, saved in checkpoints so a resumed run keeps counting.

    Attributes:
        best: best value so far (None before the first).
        wait: epochs since the last improvement.
        stopped_epoch: the epoch at which training was stopped, or None.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 5,
        min_delta: float = 0.0,
        mode: str = "min",
    ) -> None:
        errors = []
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            errors.append(f"patience must be an int >= 0; got {patience!r}")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            errors.append(f"min_delta must be a number >= 0; got {min_delta!r}")
        if mode not in ("min", "max"):
            errors.append(f"mode must be 'min' or 'max'; got {mode!r}")
        if errors:
            raise ConfigError(errors)
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._warned = False

    def reset(self) -> None:
        """Forget the best value and the waiting count."""
        self.best, self.wait, self.stopped_epoch, self.stop_training = None, 0, None, False

    def update(self, value: float | None) -> StopDecision:
        """Feed one epoch's value; returns the decision and updates ``best``/``wait``."""
        if value is None or not math.isfinite(value):
            return StopDecision.SKIPPED
        if self.best is None or (
            value < self.best - self.min_delta
            if self.mode == "min"
            else value > self.best + self.min_delta
        ):
            self.best, self.wait = value, 0
            return StopDecision.IMPROVED
        self.wait += 1
        return StopDecision.STOP if self.wait >= self.patience else StopDecision.WAIT

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        logs = logs or {}
        value = _number(logs.get(self.monitor))
        decision = self.update(value)
        if decision is StopDecision.SKIPPED and not self._warned:
            self._warned = True
            logger.warning(
                "EarlyStoppingCallback: metric %r missing or not finite in epoch logs (keys: %s); "
                "not stopping on it",
                self.monitor,
                sorted(logs),
            )
        if decision.stops:
            self.stop_training = True
            self.stopped_epoch = epoch
            if self.rank == 0:
                logger.info(
                    "early stopping at epoch %s: %r did not improve for %d epochs (best %.4g)",
                    epoch,
                    self.monitor,
                    self.wait,
                    self.best,
                )
