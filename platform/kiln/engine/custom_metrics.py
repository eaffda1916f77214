"""Your own metrics in the training loop: ``Trainer(metrics=...)``.

``metrics=`` takes a ``torchmetrics.Metric`` (or a ``MetricCollection``), a callable
``fn(outputs, targets) -> float``, a dict ``name -> either``, or a list of them. Each
one is computed on the training batches and on the validation batches of every epoch
and lands in the epoch's metrics as ``train_<name>`` and ``val_<name>``: in the run's
history, the tracking database, the plots, and as a ``monitor`` for checkpoint
ranking, early stopping and Tune.

Over ranks (Ray Train worker actors with DDP):

* a torchmetrics metric keeps its states per rank; ``compute()`` gathers them over
  the process group (torchmetrics does it when the group exists), so the value is the
  metric over every rank's samples;
* a callable's per-batch values are averaged, weighted by batch size, with one
  ``all_reduce`` of ``[sum_1, ..., sum_k, samples]`` per epoch: every rank gets the
  same mean.

Every rank calls :meth:`EpochMetrics.compute` (it is a collective), in the same order.
A callable's value is read with ``float()`` after each batch, which on a GPU waits for
the device; a torchmetrics metric keeps its states on the device until the epoch ends.
Hooks may also add numbers to an epoch's record (:func:`added_metrics`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.errors import ConfigError

__all__ = ["MetricSet", "EpochMetrics", "added_metrics", "BUILTIN_METRIC_NAMES"]

#: Names the loop already reports after ``train_`` / ``val_``: a custom metric may not take them.
BUILTIN_METRIC_NAMES = ("loss", "accuracy", "mae", "perplexity", "tokens_per_s")

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_ALLOWED = (
    "a torchmetrics.Metric, a torchmetrics.MetricCollection, a callable (outputs, targets) "
    "-> float, a dict of name -> one of those, or a list of them"
)


def _is_metric(value: Any) -> bool:
    # A torchmetrics object exists only once torchmetrics is imported: no import here.
    tm = sys.modules.get("torchmetrics")
    return tm is not None and isinstance(value, tm.Metric)


def _is_collection(value: Any) -> bool:
    tm = sys.modules.get("torchmetrics")
    return tm is not None and isinstance(value, tm.MetricCollection)


def _snake(name: str) -> str:
    """``MulticlassF1Score`` -> ``multiclass_f1_score``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


@dataclass
class MetricSet:
    """The custom metrics of a run, by name (picklable: it travels in the WorkerPlan).

    Build it with :meth:`from_user`; ``torchmetrics`` holds metric templates (each epoch
    and split works on a fresh clone), ``callables`` the plain functions.
    """

    torchmetrics: dict[str, Any] = field(default_factory=dict)
    callables: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)

    @classmethod
    def from_user(cls, metrics: Any) -> MetricSet | None:
        """Validate ``Trainer(metrics=...)``; None when there are none. Every problem is
        collected into one :class:`~kiln.errors.ConfigError`."""
        if metrics is None or isinstance(metrics, MetricSet):
            return metrics
        out = cls()
        errors: list[str] = []
        for name, value in _named_items(metrics, errors):
            out._add(name, value, errors)
        if errors:
            raise ConfigError(errors)
        return out if out.names else None

    def _add(self, name: str | None, value: Any, errors: list[str]) -> None:
        if _is_collection(value):
            for key, metric in value.items():
                self._add(key if name is None else f"{name}_{key}", metric, errors)
            return
        if name is None:  # an unnamed entry of a list, or the single value given
            if not _is_metric(value) and not callable(value):
                errors.append(
                    f"metrics={value!r} ({type(value).__name__}) is not a metric; "
                    f"allowed: {_ALLOWED}"
                )
                return
            if _is_metric(value):
                name = _snake(type(value).__name__)
            else:
                name = getattr(value, "__name__", None)
                if name is None or not _NAME.fullmatch(name):
                    shown = "a lambda" if name == "<lambda>" else f"{value!r}"
                    errors.append(
                        f"metrics={shown} has no usable name; pass a dict such as "
                        "{'f1': metric}; each value must be " + _ALLOWED
                    )
                    return
        problem = _name_problem(name, set(self.names))
        if problem:
            errors.append(problem)
        elif _is_metric(value):
            self.torchmetrics[name] = value
        elif callable(value):
            self.callables[name] = value
        else:
            errors.append(
                f"metrics[{name!r}]={value!r} ({type(value).__name__}) is not a metric; "
                f"allowed: {_ALLOWED}"
            )

    @property
    def names(self) -> list[str]:
        """The metric names, without the ``train_``/``val_`` prefix."""
        return [*self.torchmetrics, *self.callables]

    def reported_names(self, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
        """The names each epoch reports, e.g. ``['train_f1', 'val_f1']``."""
        return [f"{split}_{name}" for split in splits for name in self.names]

    def for_epoch(self, split: str, device: torch.device | str) -> EpochMetrics:
        """Fresh accumulators for one pass over ``split`` ("train" or "val")."""
        return EpochMetrics(self, split, torch.device(device))

    def describe(self) -> dict[str, str]:
        """``name -> what it is`` (recorded with the run's parameters)."""
        kinds = {n: type(m).__name__ for n, m in self.torchmetrics.items()}
        for n, fn in self.callables.items():
            kinds[n] = getattr(fn, "__qualname__", type(fn).__name__)
        return kinds


def _named_items(metrics: Any, errors: list[str]) -> list[tuple[str | None, Any]]:
    if isinstance(metrics, Mapping):
        items: list[tuple[str | None, Any]] = []
        for name, value in metrics.items():
            if not isinstance(name, str):
                errors.append(f"metrics has key {name!r}; metric names must be strings")
            else:
                items.append((name, value))
        return items
    if isinstance(metrics, (list, tuple)):
        return [item for value in metrics for item in _named_items(value, errors)]
    return [(None, metrics)]


def _name_problem(name: str, taken: set[str]) -> str | None:
    if not _NAME.fullmatch(name):
        return (
            f"metric name {name!r} must start with a letter and hold only letters, digits "
            "and underscores (it becomes train_<name> / val_<name>)"
        )
    if name.startswith(("train_", "val_", "test_")):
        return (
            f"metric name {name!r} must not carry a split prefix: kiln reports it as "
            f"train_{name} and val_{name}; name it {name.split('_', 1)[1]!r}"
        )
    if name in BUILTIN_METRIC_NAMES:
        return (
            f"metric name {name!r} is one kiln already reports (train_{name} / val_{name}); "
            f"pick another name (taken: {', '.join(BUILTIN_METRIC_NAMES)})"
        )
    if name in taken:
        return f"metric name {name!r} is given twice"
    return None


class EpochMetrics:
    """One split's custom metrics over one epoch, on one rank.

    ``update(outputs, targets)`` per batch; ``compute(distributed)`` once, on every
    rank, gives the values over all ranks.
    """

    def __init__(self, metric_set: MetricSet, split: str, device: torch.device) -> None:
        self.split = split
        self.modules = {
            name: metric.clone().to(device) for name, metric in metric_set.torchmetrics.items()
        }
        for module in self.modules.values():
            module.reset()
        self.callables = metric_set.callables
        self.sums = dict.fromkeys(self.callables, 0.0)
        self.samples = 0

    def update(self, outputs: torch.Tensor | None, targets: torch.Tensor) -> None:
        """Add one batch (``outputs``: the model's logits or predictions; a single output
        per row, shape ``(n, 1)``, is given as ``(n,)`` like its targets)."""
        if outputs is None:  # a model that computes its own loss gives no outputs here
            return
        outputs = outputs.detach()
        if outputs.is_floating_point():
            outputs = outputs.float()  # autocast outputs (bf16/fp16) as the metric expects
        if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
            outputs = outputs.squeeze(-1)  # one output per row (regression): targets' shape
        for module in self.modules.values():
            module.update(outputs, targets)
        if self.callables:
            n = int(targets.shape[0])
            for name, fn in self.callables.items():
                self.sums[name] += _as_float(f"{self.split}_{name}", fn(outputs, targets)) * n
            self.samples += n

    def compute(self, distributed: bool) -> dict[str, float]:
        """``{"<split>_<name>": value}`` over every rank's samples (a collective)."""
        out = {}
        for name, module in self.modules.items():
            out[f"{self.split}_{name}"] = _as_float(f"{self.split}_{name}", module.compute())
        if self.callables:
            totals = torch.tensor([*self.sums.values(), float(self.samples)], dtype=torch.float64)
            if distributed:
                import torch.distributed as dist

                dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            samples = max(float(totals[-1]), 1.0)
            for i, name in enumerate(self.callables):
                out[f"{self.split}_{name}"] = float(totals[i]) / samples
        return out


def _as_float(name: str, value: Any) -> float:
    """A metric's value as a float, or an error that names the metric and the value."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"metric {name!r} gave a tensor of shape {tuple(value.shape)}, not one number; "
                "metrics must reduce to a scalar (for torchmetrics, e.g. average='macro')"
            )
        return float(value.detach().float().cpu())
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"metric {name!r} gave {value!r} ({type(value).__name__}); a metric must return "
            "a number or a one-element tensor"
        ) from None
    return number


def added_metrics(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a hook added to an epoch's record: new keys with a numeric value
    (numbers, numpy scalars, one-element tensors). Keys the loop wrote keep the loop's
    values; anything that is not a number is left out."""
    added = {}
    for key, value in after.items():
        if key in before or not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, str)):
            continue
        if not isinstance(value, (int, float)):
            try:  # numpy scalars
                value = float(value)
            except (TypeError, ValueError):
                continue
        added[key] = float(value)
    return added
