"""One training step at a time: forward with loss, backward, periodic optimization.

:class:`TrainingStep` is the forward and backward half of a step for hand-written
loops; :class:`~kiln.compat.trainer.ModelTrainer` uses it for its step methods. It
takes the batch forms kiln's loop takes (an ``(inputs, labels)`` pair, a dict with
``x``/``y``) and Hugging Face style dicts, for which ``model(**batch).loss`` is the
loss. The loss of ``(inputs, labels)`` batches is kiln's loss strategy for the
labels' kind (or the one given). Autocast runs on the model's own device type.

:class:`OptimizationStep` runs one round of a periodic optimizer
(:func:`kiln.tune.periodic.optimize_once`); ``QuantumOptimizer`` is the older name of
its protocol, :class:`~kiln.tune.periodic.PeriodicOptimizer`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from kiln.engine.loops import unpack_batch
from kiln.engine.loss import LossStrategy, ModelOutput, get_loss_strategy
from kiln.engine.optim import Precision
from kiln.errors import ConfigError, ModelConfigError
from kiln.tune.periodic import OptimizationResult, PeriodicOptimizer, check_solver, optimize_once

__all__ = [
    "OptimizationStep",
    "QuantumOptimizer",
    "TrainingStep",
    "infer_loss_name",
    "model_device",
]

QuantumOptimizer = PeriodicOptimizer
"""The periodic hyper-parameter optimizer protocol under its older name."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def infer_loss_name(logits: torch.Tensor, labels: torch.Tensor) -> str:
    """kiln's loss for these shapes: float labels regress, integer labels classify."""
    if labels.is_floating_point():
        return "regression"
    if logits.dim() == 4:
        return "segmentation"
    if logits.dim() == 3:
        return "language_modeling"
    return "classification"


class TrainingStep:
    """Forward and backward passes for one batch.

    Args:
        model: the module to train.
        optimizer: its optimizer (kept for the caller's optimizer step).
        scheduler: an optional learning-rate scheduler (kept likewise).
        loss_strategy: how ``(inputs, labels)`` batches turn into a loss; default
            inferred from the first batch (:func:`infer_loss_name`).
        use_amp: autocast on the model's device type (bf16 on CPU, fp16 on CUDA).
        precision: an explicit :class:`~kiln.engine.optim.Precision` (overrides ``use_amp``).
        scaler: a GradScaler for fp16 (``backward_step`` scales the loss with it).
        input_column, label_column: the columns of dict batches in kiln's form.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        loss_strategy: LossStrategy | None = None,
        use_amp: bool = True,
        precision: Precision | None = None,
        scaler: torch.amp.GradScaler | None = None,
        input_column: str = "x",
        label_column: str = "y",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_strategy = loss_strategy
        device_type = model_device(model).type
        if precision is None:
            dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
            precision = Precision(use_amp, device_type, dtype)
        self.precision = precision
        self.scaler = scaler
        self.columns = (input_column, label_column)

    def forward_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass and loss; returns ``(loss, {"loss", "batch_size", "accuracy"?})``."""
        device = model_device(self.model)
        with self._autocast():
            if self.model_computes_loss(batch):
                outputs = self.model(**{k: _to(v, device) for k, v in batch.items()})
                loss = _loss_of(outputs)
                labels = batch.get("labels")
            else:
                inputs, labels = self._inputs_labels(batch)
                inputs, labels = _to(inputs, device), _to(labels, device)
                outputs = self.model(inputs)
                logits = ModelOutput.from_raw(outputs).logits
                if self.loss_strategy is None:
                    self.loss_strategy = get_loss_strategy(infer_loss_name(logits, labels))
                loss = self.loss_strategy.compute_loss(logits, labels)
        return loss, self.compute_metrics(outputs, labels, loss)

    def backward_step(self, loss: torch.Tensor, gradient_accumulation: int = 1) -> None:
        """Backward of ``loss / gradient_accumulation`` (scaled by the GradScaler, if any)."""
        if gradient_accumulation < 1:
            raise ConfigError(f"gradient_accumulation={gradient_accumulation!r} must be >= 1")
        scaled = loss / gradient_accumulation if gradient_accumulation > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def compute_metrics(
        self, outputs: Any, labels: torch.Tensor | None, loss: torch.Tensor
    ) -> dict[str, float]:
        """The batch's loss and size, and its accuracy when labels are class ids."""
        metrics = {"loss": float(loss.detach())}
        if labels is None:
            return metrics
        labels = torch.as_tensor(labels)
        metrics["batch_size"] = float(labels.shape[0]) if labels.dim() else 1.0
        try:
            logits = ModelOutput.from_raw(outputs).logits.detach()
        except TypeError:
            return metrics
        if not labels.is_floating_point() and logits.dim() == labels.dim() + 1:
            keep = labels != -100
            predicted = logits.argmax(dim=1 if logits.dim() == 4 else -1)  # 4-D: [B, C, H, W]
            hits = (predicted == labels.to(predicted.device)) & keep.to(predicted.device)
            metrics["accuracy"] = float(hits.sum()) / max(1, int(keep.sum()))
        return metrics

    def model_computes_loss(self, batch: Any) -> bool:
        """True for dict batches without the input column: ``model(**batch).loss``."""
        return isinstance(batch, dict) and self.columns[0] not in batch

    # -- helpers -----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast()

    def _inputs_labels(self, batch: Any) -> tuple[Any, Any]:
        return unpack_batch(batch, *self.columns)


class OptimizationStep:
    """Runs a periodic optimizer every ``optimization_frequency`` steps: formulate, solve, apply.

    Args:
        quantum_optimizer: any :class:`~kiln.tune.periodic.PeriodicOptimizer`, e.g.
            :class:`~kiln.tune.periodic.LRMultiplierAnnealer`.
        optimization_frequency: steps between optimizations.
    """

    def __init__(
        self, quantum_optimizer: PeriodicOptimizer, optimization_frequency: int = 100
    ) -> None:
        if optimization_frequency < 1:
            raise ConfigError(f"optimization_frequency={optimization_frequency!r} must be >= 1")
        check_solver(quantum_optimizer)
        self.quantum_optimizer = quantum_optimizer
        self.optimization_frequency = optimization_frequency

    def should_optimize(self, step: int) -> bool:
        """True every ``optimization_frequency``-th step (steps counted from 1)."""
        return step > 0 and step % self.optimization_frequency == 0

    def optimize_step(self, model: nn.Module, metrics: dict[str, Any]) -> OptimizationResult:
        """One round on ``model`` with the latest ``metrics`` (``metrics["step"]`` if known)."""
        result = optimize_once(self.quantum_optimizer, model, metrics)
        if "step" in metrics:
            result.step = int(metrics["step"])
        return result


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _loss_of(outputs: Any) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ModelConfigError(
            f"a dict batch without the input column goes to model(**batch), whose output must "
            f"carry a .loss tensor (Hugging Face style); got {type(outputs).__name__} without one. "
            "Pass (inputs, labels) batches or dicts with 'x'/'y' to use kiln's loss strategies"
        )
    return loss
