"""EpochProgress: one line per epoch, on rank 0, through the ``kiln.progress`` logger.

``Trainer(verbose=True)`` (the default) adds it to a run's hooks, so a Python script
or notebook shows its progress the way ``kiln train`` does::

    epoch   3/30  train_loss 0.1370  train_accuracy 96.52%  val_loss 0.1046  ...  (0.05 s)

The logger gets its own plain handler (stdout, the message alone) unless it already
has one, so a user's logging setup is left alone: silence it with ``verbose=False``
or ``logging.getLogger("kiln.progress").setLevel(logging.WARNING)``. In Ray worker
actors the line goes to the worker's stdout, which Ray forwards to the driver.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["EpochProgress", "format_metric"]

LOGGER_NAME = "kiln.progress"


def format_metric(key: str, value: Any) -> str:
    """Accuracy-like values as percentages, other floats to 4 decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2%}" if "accuracy" in key else f"{value:.4f}"
    return str(value)


def progress_logger() -> logging.Logger:
    """The ``kiln.progress`` logger, with a plain stdout handler when it has none."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


class EpochProgress:
    """A hook that logs each epoch's train/val metrics and duration on rank 0."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.rank = 0

    def on_training_start(self) -> None:
        from kiln.engine.worker import world

        self.rank = world()[0]

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        shown = "  ".join(
            f"{k} {format_metric(k, v)}"
            for k, v in metrics.items()
            if k.startswith(("train_", "val_")) and isinstance(v, float)
        )
        seconds = metrics.get("epoch_duration_seconds", 0.0)
        progress_logger().info(f"epoch {epoch:>3}/{self.epochs}  {shown}  ({seconds:.2f} s)")
