"""One training epoch and one validation pass (seed 002's TrainingLoop / ValidationLoop).

These are the step loops the worker loop (:mod:`kiln.engine.worker`) calls once per
epoch; they are also usable on their own with any iterable of batches. The hot path
keeps running sums as Python floats on CPU and as device tensors on an accelerator
(no host sync per step), so a kiln epoch costs what a hand-written loop costs.

Batches come in two kinds. With a loss strategy, a batch is a dict of columns or an
``(inputs, labels)`` pair: ``loss = strategy(model(inputs), labels)``. With
``loss_strategy=None`` the model computes its own loss, as Hugging Face models do:
a dict batch is passed as keyword arguments (``input_ids``, ``attention_mask``,
``labels``, ...) and ``model(**batch).loss`` is used; losses are then averaged over
the label tokens that count (labels other than -100), and tokens/s is measured.

Metrics beside the loss follow the task: accuracy (classification), MAE (regression),
per-pixel accuracy and mean IoU (segmentation, from a confusion matrix summed over the
epoch and across ranks).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kiln.engine.gradients import GradientAccumulator, GradientMonitor
from kiln.engine.loss import LossStrategy, ModelOutput
from kiln.engine.optim import Precision


@dataclass
class EpochResult:
    """What one pass over the data produced (means over samples; sums for reduction)."""

    epoch: int
    loss: float
    metrics: dict[str, float]
    epoch_duration_seconds: float
    num_samples: int
    num_batches: int
    learning_rate: float
    step_log: list[dict[str, float]] = field(default_factory=list)
    # [loss_sum, correct, abs_err, samples]: all-reduced across ranks by the worker loop.
    sums: torch.Tensor | None = field(default=None, repr=False)


def unpack_batch(batch: Any, input_column: str = "x", label_column: str = "y") -> tuple[Any, Any]:
    """Split a batch (dict of columns, or an (inputs, labels) pair) into inputs and labels."""
    if isinstance(batch, dict):
        try:
            return batch[input_column], batch[label_column]
        except KeyError as exc:
            raise KeyError(
                f"batch has columns {sorted(batch)}, but the task expects input column "
                f"{input_column!r} and label column {label_column!r} (TaskSpec.input_column / "
                "label_column)"
            ) from exc
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be a dict with {input_column!r}/{label_column!r} or an (inputs, labels) "
        f"pair, got {type(batch).__name__}"
    )


class _Sums:
    """Running per-epoch sums.

    On CPU they are Python floats: ``.item()`` costs nothing there and is about half
    the dispatcher cost of in-place tensor adds. On an accelerator they stay 0-d
    tensors on the device, so the loop never waits for the device inside an epoch.
    """

    def __init__(
        self, classification: bool, regression: bool, confusion: _Confusion | None = None
    ) -> None:
        self.classification = classification
        self.regression = regression
        self.confusion = confusion  # segmentation: class-by-class pixel counts
        # Python floats on CPU, 0-d tensors on an accelerator (see the class docstring).
        self.loss_sum: Any = 0.0
        self.correct: Any = 0.0
        self.abs_err: Any = 0.0
        self.samples = 0
        self.batches = 0
        self._on_device: bool | None = None

    def add(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor | None,
        labels: torch.Tensor,
        weight: int | None = None,
    ) -> None:
        """Add one batch; ``weight`` (default: the batch size) is what ``loss`` averages over."""
        n = labels.shape[0] if weight is None else weight
        self.samples += n
        self.batches += 1
        if self._on_device is None:
            self._on_device = loss.device.type != "cpu"
            if self._on_device:  # from the values so far (a resumed epoch starts with some)
                self.loss_sum, self.correct, self.abs_err = (
                    torch.tensor(float(v), dtype=torch.float64, device=loss.device)
                    for v in (self.loss_sum, self.correct, self.abs_err)
                )
        loss = loss.detach()
        logits = logits.detach() if logits is not None else None
        if self.confusion is not None and logits is not None:
            self.confusion.add(logits, labels)
        if self.classification:
            assert logits is not None  # only models that compute their own loss give none
            correct = (logits.argmax(dim=-1) == labels).sum()
        elif self.regression:
            assert logits is not None
            err = (logits.float().reshape(n, -1) - labels.float().reshape(n, -1)).abs()
            abs_err = err.mean(dim=1).sum()
        if self._on_device:  # in-place adds on 0-d device tensors: no host sync
            self.loss_sum.add_(loss, alpha=n)
            if self.classification:
                self.correct.add_(correct)
            elif self.regression:
                self.abs_err.add_(abs_err)
            return
        self.loss_sum += loss.item() * n
        if self.classification:
            self.correct += correct.item()
        elif self.regression:
            self.abs_err += abs_err.item()

    def restore(self, sums: list[float]) -> None:
        """Continue from ``[loss_sum, correct, abs_err, samples, batches, *confusion]``
        (a resumed epoch; segmentation's flattened confusion matrix last)."""
        self.loss_sum, self.correct, self.abs_err = (float(v) for v in sums[:3])
        self.samples, self.batches = int(sums[3]), int(sums[4])
        if self.confusion is not None and len(sums) > 5:
            self.confusion.restore(sums[5:])

    def running(self) -> list[float]:
        """``[loss_sum, correct, abs_err, samples, batches, *confusion]`` so far (what
        :meth:`restore` takes)."""
        totals = [float(v) for v in self.as_tensor()]
        return [*totals[:4], float(self.batches), *totals[4:]]

    def as_tensor(self) -> torch.Tensor:
        """[loss_sum, correct, abs_err, samples] on the CPU, for an all-reduce across ranks;
        for segmentation the flattened confusion matrix follows."""
        if self._on_device:
            acc = torch.stack([self.loss_sum, self.correct, self.abs_err]).cpu()
            out = torch.cat([acc, torch.tensor([float(self.samples)], dtype=torch.float64)])
        else:
            values = [self.loss_sum, self.correct, self.abs_err, float(self.samples)]
            out = torch.tensor(values, dtype=torch.float64)
        if self.confusion is not None:
            out = torch.cat([out, self.confusion.flat()])
        return out


class _Confusion:
    """Pixel counts per (true class, predicted class), summed over an epoch's batches.

    Each batch's matrix comes from torchmetrics (``multiclass_confusion_matrix``, pixels
    labelled -100 left out). Summed matrices all-reduce across ranks like the other sums,
    and give per-pixel accuracy and mean IoU over the whole epoch (:func:`metrics_from_sums`),
    the values torchmetrics' ``MulticlassAccuracy(average="micro")`` and
    ``MulticlassJaccardIndex(average="macro")`` give over the same pixels.
    """

    def __init__(self, num_classes: int | None) -> None:
        self.num_classes = num_classes  # None: read off the first batch's logits
        self.matrix: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        from torchmetrics.functional.classification import multiclass_confusion_matrix

        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
        batch = multiclass_confusion_matrix(
            logits.argmax(dim=1),
            labels,
            self.num_classes,
            ignore_index=IGNORE_INDEX,
            validate_args=False,
        )
        self.matrix = batch if self.matrix is None else self.matrix.to(batch.device) + batch

    def restore(self, flat: list[float]) -> None:
        """Continue from a flattened matrix (what :meth:`flat` gave)."""
        n = math.isqrt(len(flat))
        self.num_classes = self.num_classes or n
        self.matrix = torch.tensor(flat, dtype=torch.float64).reshape(n, n).long()

    def flat(self) -> torch.Tensor:
        if self.matrix is None:  # no batch on this rank: zeros keep the all-reduce aligned
            n = self.num_classes or 0
            return torch.zeros(n * n, dtype=torch.float64)
        return self.matrix.flatten().to("cpu", torch.float64)


def _segmentation_metrics(matrix: torch.Tensor, prefix: str) -> dict[str, float]:
    """Per-pixel accuracy and mean IoU (over classes present in labels or predictions)."""
    true_pos = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - true_pos
    present = union > 0
    total = float(matrix.sum())
    accuracy = float(true_pos.sum()) / total if total else 0.0
    iou = (true_pos[present] / union[present]).mean() if bool(present.any()) else 0.0
    return {f"{prefix}_pixel_accuracy": accuracy, f"{prefix}_mean_iou": float(iou)}


def metrics_from_sums(
    sums: torch.Tensor, classification: bool, regression: bool, prefix: str
) -> dict[str, float]:
    """Turn (possibly all-reduced) sums into mean metrics named ``<prefix>_loss`` etc."""
    loss_sum, correct, abs_err, samples = (float(v) for v in sums[:4])
    samples = max(samples, 1.0)
    out = {f"{prefix}_loss": loss_sum / samples}
    if classification:
        out[f"{prefix}_accuracy"] = correct / samples
    elif regression:
        out[f"{prefix}_mae"] = abs_err / samples
    if len(sums) > 4:  # segmentation: a confusion matrix follows
        n = math.isqrt(len(sums) - 4)
        out.update(_segmentation_metrics(sums[4:].reshape(n, n), prefix))
    return out


class TrainingLoop:
    """Runs one training epoch: forward, loss, backward, accumulate, clip, step."""

    def __init__(
        self,
        gradient_accumulator: GradientAccumulator,
        gradient_monitor: GradientMonitor | None,
        loss_strategy: LossStrategy | None,
        gradient_clip_norm: float | None = 1.0,
        *,
        precision: Precision | None = None,
        task_type: str = "classification",
        input_column: str = "x",
        label_column: str = "y",
        log_every_n_steps: int = 0,
        max_steps: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.accumulator = gradient_accumulator
        self.monitor = gradient_monitor
        self.loss_strategy = loss_strategy
        self.gradient_clip_norm = gradient_clip_norm
        self.precision = precision
        self.classification = task_type in ("classification", "image_classification")
        self.regression = task_type == "regression"
        self.segmentation = task_type == "segmentation"
        self.num_classes = num_classes  # segmentation's confusion matrix; None: from logits
        self.columns = (input_column, label_column)
        self.log_every_n_steps = log_every_n_steps
        self.global_step = 0  # batches seen over the whole run (restored on resume)
        self.optimizer_steps = 0  # optimizer updates over the whole run (restored on resume)
        self.max_steps = max_steps  # stop the run once global_step reaches it
        self.last_grad_norm: float | None = None

    @property
    def reached_max_steps(self) -> bool:
        """True once ``global_step`` has reached ``max_steps``."""
        return self.max_steps is not None and self.global_step >= self.max_steps

    def run_epoch(
        self,
        epoch: int,
        model: nn.Module,
        train_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        device: torch.device | str = "cpu",
        metrics_callback: Callable[[float, int], None] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        on_outputs: Callable[[torch.Tensor | None, torch.Tensor], None] | None = None,
        start_batch: int = 0,
        start_sums: list[float] | None = None,
        step_end: Callable[[int, Callable[[], list[float]]], None] | None = None,
    ) -> EpochResult:
        """Train for one epoch; ``metrics_callback(loss, batch_idx)`` fires per batch, and
        ``on_outputs(outputs, labels)`` (custom metrics) gets each batch's model outputs.

        A resumed epoch passes the batches already trained (``start_batch``; the
        loader yields the rest) and their running sums. ``step_end(batches_done,
        running_sums)`` fires after each optimizer step, once its batch is counted;
        ``running_sums()`` gives the epoch's sums so far (what ``start_sums`` takes).
        """
        device = torch.device(device)
        precision = self.precision or Precision(False, device.type)
        model.train()
        sums = _new_sums(self)
        if start_sums:
            sums.restore(start_sums)
        step_log: list[dict[str, Any]] = []
        start = time.perf_counter()
        n_accum = self.accumulator.accumulation_steps
        no_sync = getattr(model, "no_sync", None)
        batches = _mark_last(train_loader) if n_accum > 1 else _never_last(train_loader)
        tokens = 0
        for batch_idx, (batch, is_last) in enumerate(batches, start=start_batch):
            if self.reached_max_steps:
                break
            batch, labels = _to_device(batch, self.columns, device, self.loss_strategy is None)
            # A last partial accumulation window still updates the weights; its backward
            # must run outside no_sync so DDP all-reduces those gradients too.
            at_limit = self.max_steps is not None and self.global_step + 1 >= self.max_steps
            update = self.accumulator.should_update_optimizer(batch_idx) or is_last or at_limit
            sync_ctx = no_sync() if (no_sync is not None and not update and n_accum > 1) else _NULL
            with sync_ctx:
                with precision.autocast():
                    loss, logits, weight = _forward(model, batch, labels, self.loss_strategy)
                scaled = loss / n_accum if n_accum > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if update:
                self._optimizer_step(model, optimizer, scheduler, scaler)
                self.optimizer_steps += 1
            sums.add(loss, logits, labels, weight)
            if on_outputs is not None:
                on_outputs(logits, labels)
            if weight is not None:
                tokens += _token_count(batch)
            self.global_step += 1
            if self.log_every_n_steps and self.global_step % self.log_every_n_steps == 0:
                row: dict[str, Any] = {
                    "step": self.global_step,
                    "loss": loss.detach(),
                    "lr": _lr(optimizer),
                }
                if tokens:  # models computing their own loss: tokens/s since the epoch began
                    row["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
                step_log.append(row)
            if metrics_callback is not None:
                metrics_callback(float(loss.detach()), batch_idx)
            if update and step_end is not None:
                step_end(batch_idx + 1, sums.running)  # called only when saving: no sync
        totals = sums.as_tensor()
        metrics = metrics_from_sums(totals, self.classification, self.regression, "train")
        for row in step_log:
            row["loss"] = float(row["loss"])
        if tokens:
            metrics["train_tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
        return EpochResult(
            epoch=epoch,
            loss=metrics["train_loss"],
            metrics=metrics,
            epoch_duration_seconds=time.perf_counter() - start,
            num_samples=sums.samples,
            num_batches=sums.batches,
            learning_rate=_lr(optimizer),
            step_log=step_log,
            sums=totals,
        )

    def _optimizer_step(self, model, optimizer, scheduler, scaler) -> None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.gradient_clip_norm is not None:
            self.last_grad_norm = self.accumulator.clip_gradients(model)
        if self.monitor is not None:
            self.monitor.check_step(model)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


class ValidationLoop:
    """Evaluates the model over a loader without gradients."""

    def __init__(
        self,
        loss_strategy: LossStrategy | None,
        *,
        precision: Precision | None = None,
        task_type: str = "classification",
        input_column: str = "x",
        label_column: str = "y",
        num_classes: int | None = None,
    ) -> None:
        self.loss_strategy = loss_strategy
        self.precision = precision
        self.classification = task_type in ("classification", "image_classification")
        self.regression = task_type == "regression"
        self.segmentation = task_type == "segmentation"
        self.num_classes = num_classes
        self.columns = (input_column, label_column)

    @torch.no_grad()
    def run_epoch(
        self,
        epoch: int,
        model: nn.Module,
        val_loader: Iterable[Any],
        device: torch.device | str = "cpu",
        metrics_callback: Callable[[float, int], None] | None = None,
        *,
        on_outputs: Callable[[torch.Tensor | None, torch.Tensor], None] | None = None,
    ) -> EpochResult:
        """Evaluate once over ``val_loader``; ``on_outputs(outputs, labels)`` per batch."""
        device = torch.device(device)
        precision = self.precision or Precision(False, device.type)
        model.eval()
        sums = _new_sums(self)
        start = time.perf_counter()
        for batch_idx, batch in enumerate(val_loader):
            batch, labels = _to_device(batch, self.columns, device, self.loss_strategy is None)
            with precision.autocast():
                loss, logits, weight = _forward(model, batch, labels, self.loss_strategy)
            sums.add(loss, logits, labels, weight)
            if on_outputs is not None:
                on_outputs(logits, labels)
            if metrics_callback is not None:
                metrics_callback(float(loss), batch_idx)
        totals = sums.as_tensor()
        metrics = metrics_from_sums(totals, self.classification, self.regression, "val")
        return EpochResult(
            epoch=epoch,
            loss=metrics["val_loss"],
            metrics=metrics,
            epoch_duration_seconds=time.perf_counter() - start,
            num_samples=sums.samples,
            num_batches=sums.batches,
            learning_rate=0.0,
            sums=totals,
        )


def _new_sums(loop: TrainingLoop | ValidationLoop) -> _Sums:
    confusion = _Confusion(loop.num_classes) if loop.segmentation else None
    return _Sums(loop.classification, loop.regression, confusion)


def _to_device(
    batch: Any, columns: tuple[str, str], device: torch.device, model_loss: bool
) -> tuple[Any, torch.Tensor]:
    """(what the model gets, labels) on ``device``: a dict of tensors when the model
    computes its own loss, else the inputs tensor."""
    if not model_loss:
        inputs, labels = unpack_batch(batch, *columns)
        return inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if not isinstance(batch, dict) or columns[1] not in batch:
        raise TypeError(
            f"a model that computes its own loss takes dict batches with a {columns[1]!r} "
            f"column (passed as keyword arguments); got {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
        )
    batch = {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
    return batch, batch[columns[1]]


def _forward(
    model: nn.Module, batch: Any, labels: torch.Tensor, strategy: LossStrategy | None
) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """(loss, logits or None, what the loss averages over or None for the batch size)."""
    if strategy is not None:
        logits = ModelOutput.from_raw(model(batch)).logits
        return strategy.compute_loss(logits, labels), logits, None
    out = model(**batch)
    loss = out["loss"] if isinstance(out, dict) else out.loss
    if loss is None:
        raise TypeError(
            "the model returned no loss: with loss='model' it must compute one from the "
            "batch's labels (model(**batch).loss)"
        )
    # Causal LMs predict token t+1 from t: the label tokens that count are the shifted ones.
    counted = labels[..., 1:] if labels.ndim > 1 else labels
    return loss, None, max(1, int((counted != IGNORE_INDEX).sum()))


def _token_count(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return int(ids.numel()) if ids is not None else 0


IGNORE_INDEX = -100


def _mark_last(batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield ``(batch, is_last)``, looking one batch ahead."""
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for upcoming in it:
        yield current, False
        current = upcoming
    yield current, True


def _never_last(batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """``(batch, False)`` without look-ahead: with no accumulation every batch steps anyway."""
    for batch in batches:
        yield batch, False


_NULL = contextlib.nullcontext()  # reusable: it holds no state


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
