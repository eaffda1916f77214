"""Your own optimizer and learning-rate schedule: ``Trainer(optimizer=..., lr_scheduler=...)``.

Each takes a name (``"adamw"``, ``"cosine"``: the same as ``TrainingConfig.optimizer`` /
``lr_scheduler``) or a factory:

* ``optimizer=lambda params, cfg: torch.optim.SGD(params, lr=cfg.learning_rate)``:
  ``params`` is the list of the model's trainable parameters, ``cfg`` the run's
  :class:`~kiln.config.TrainingConfig`; it returns a ``torch.optim.Optimizer``.
* ``lr_scheduler=lambda optimizer, cfg, total_steps: torch.optim.lr_scheduler.StepLR(...)``:
  it returns a ``torch.optim.lr_scheduler.LRScheduler`` on that optimizer, stepped once
  per optimizer step (``total_steps`` of them in the run).

Factories run inside every Ray Train worker (they travel, pickled, in the
:class:`~kiln.engine.worker.WorkerPlan`), so they must pickle: a lambda or a function
of your module does (cloudpickle). The driver first calls them once on a one-element
parameter, so a factory that returns the wrong thing fails before any worker starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kiln.config import TrainingConfig
from kiln.config.training import LR_SCHEDULERS, OPTIMIZERS
from kiln.engine.optim import build_optimizer, build_scheduler
from kiln.errors import ConfigError

__all__ = ["resolve_choice", "check_factories", "make_optimizer", "make_scheduler"]

OptimizerFactory = Callable[[list[nn.Parameter], TrainingConfig], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, TrainingConfig, int], Any]

_SIGNATURES = {
    "optimizer": "lambda params, cfg: torch.optim.SGD(params, lr=cfg.learning_rate)",
    "lr_scheduler": (
        "lambda optimizer, cfg, total_steps: torch.optim.lr_scheduler.StepLR(optimizer, 10)"
    ),
}
_NAMES = {"optimizer": OPTIMIZERS, "lr_scheduler": LR_SCHEDULERS}


def resolve_choice(parameter: str, value: Any) -> tuple[str | None, Callable | None]:
    """``(name, None)`` for a name, ``(None, factory)`` for a callable, ``(None, None)``
    for None; anything else is a ConfigError naming ``parameter``, the value and what
    is allowed."""
    if value is None:
        return None, None
    if isinstance(value, str):
        if value not in _NAMES[parameter]:
            raise ConfigError(
                f"{parameter}={value!r} is not one of {', '.join(_NAMES[parameter])}, "
                f"nor a factory such as {_SIGNATURES[parameter]}"
            )
        return value, None
    if callable(value) and not isinstance(value, type):
        return None, value
    raise ConfigError(
        f"{parameter}={value!r} ({type(value).__name__}) must be one of "
        f"{', '.join(_NAMES[parameter])} or a factory such as {_SIGNATURES[parameter]}"
        + (" (a class is not a factory: wrap it in a lambda)" if isinstance(value, type) else "")
    )


def check_factories(
    optimizer_factory: OptimizerFactory | None,
    scheduler_factory: SchedulerFactory | None,
    cfg: TrainingConfig,
) -> None:
    """Call the factories once on a one-element parameter and check what they return.

    A factory that raises on this stand-in (it may expect the real model's parameters)
    is left to the workers, which check its result on the real model.
    """
    probe = [nn.Parameter(torch.zeros(1))]
    if optimizer_factory is not None:
        try:
            optimizer = optimizer_factory(probe, cfg)
        except Exception:  # noqa: BLE001 - the workers call it on the real parameters
            optimizer = None
        else:
            _check_optimizer(optimizer_factory, optimizer)
    else:
        optimizer = torch.optim.SGD(probe, lr=cfg.learning_rate)
    if scheduler_factory is not None and optimizer is not None:
        try:
            scheduler = scheduler_factory(optimizer, cfg, 10)
        except Exception:  # noqa: BLE001
            return
        _check_scheduler(scheduler_factory, scheduler, optimizer)


def make_optimizer(
    model: nn.Module, cfg: TrainingConfig, factory: OptimizerFactory | None
) -> torch.optim.Optimizer:
    """The factory's optimizer over the model's trainable parameters, or the named one."""
    if factory is None:
        return build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = factory(params, cfg)
    _check_optimizer(factory, optimizer)
    return optimizer


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainingConfig,
    total_steps: int,
    factory: SchedulerFactory | None,
) -> Any:
    """The factory's schedule on ``optimizer``, or the named warmup-then-decay one."""
    if factory is None:
        return build_scheduler(optimizer, cfg, total_steps)
    scheduler = factory(optimizer, cfg, max(1, total_steps))
    _check_scheduler(factory, scheduler, optimizer)
    return scheduler


def _check_optimizer(factory: Callable, result: Any) -> None:
    if not isinstance(result, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer={_describe(factory)} returned {_shown(result)}; the factory must "
            f"return a torch.optim.Optimizer built on the params it is given, e.g. "
            f"{_SIGNATURES['optimizer']}"
        )


def _check_scheduler(factory: Callable, result: Any, optimizer: torch.optim.Optimizer) -> None:
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    if isinstance(result, ReduceLROnPlateau):
        raise ConfigError(
            f"lr_scheduler={_describe(factory)} returned a ReduceLROnPlateau; kiln steps the "
            "schedule once per optimizer step without a metric, so it must return a "
            f"torch.optim.lr_scheduler.LRScheduler, e.g. {_SIGNATURES['lr_scheduler']}"
        )
    if not isinstance(result, LRScheduler):
        raise ConfigError(
            f"lr_scheduler={_describe(factory)} returned {_shown(result)}; the factory must "
            "return a torch.optim.lr_scheduler.LRScheduler on the optimizer it is given, "
            f"e.g. {_SIGNATURES['lr_scheduler']}"
        )
    if result.optimizer is not optimizer:
        raise ConfigError(
            f"lr_scheduler={_describe(factory)} returned a schedule on another optimizer; "
            "build it on the optimizer the factory is given (its first argument)"
        )


def _describe(factory: Callable) -> str:
    name = getattr(factory, "__qualname__", None) or type(factory).__name__
    module = getattr(factory, "__module__", None)
    return f"<factory {module}.{name}>" if module else f"<factory {name}>"


def _shown(value: Any) -> str:
    text = " ".join(repr(value).split())  # one line, also for tensors
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def factory_name(factory: Callable | None) -> str | None:
    """A readable name of a factory for the run's parameters (None for none)."""
    return None if factory is None else _describe(factory)
