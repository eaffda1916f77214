"""The task's evaluation metrics as ``torchmetrics`` objects, synchronised across ranks.

``TaskMetrics.for_task(task)`` picks the metrics of a task; ``update(logits, labels,
loss)`` feeds one batch; ``compute()`` returns plain Python values. When
``torch.distributed`` is initialised (Ray Train workers), every torchmetrics metric
gathers its state from all ranks inside ``compute()``, so every rank gets the metrics
of the whole set. Nothing here computes a metric by hand.

=====================  =================================================================
task                   metrics
=====================  =================================================================
classification         loss, accuracy, macro precision / recall / F1, per-class
                       precision / recall / F1 / support, confusion matrix, ROC AUC
                       (two classes)
regression             loss, MAE, RMSE, R²
language_modeling      loss, perplexity (next token; pad and -100 targets left out)
=====================  =================================================================
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric, Metric, MetricCollection, SumMetric
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score
from torchmetrics.text import Perplexity

from kiln.config import TaskSpec
from kiln.engine.loss import IGNORE_INDEX
from kiln.errors import ConfigError

__all__ = ["TaskMetrics"]


class TaskMetrics:
    """Loss plus the task's metrics, fed batch by batch.

    Args:
        kind: ``"classification"``, ``"regression"`` or ``"language_modeling"``.
        metrics: the torchmetrics collection (without the loss).
        num_classes: classes (classification only).
        roc_auc: a ``BinaryAUROC`` fed the probability of class 1 (two classes only).
        pad_token_id: language modeling: targets equal to it are left out.
    """

    def __init__(
        self,
        kind: str,
        metrics: MetricCollection,
        *,
        num_classes: int | None = None,
        pad_token_id: int | None = None,
        roc_auc: Metric | None = None,
    ) -> None:
        self.kind = kind
        self.metrics = metrics
        self.roc_auc = roc_auc
        self.loss = MeanMetric()
        self.rows = SumMetric()
        self.num_classes = num_classes
        self.pad_token_id = pad_token_id

    @classmethod
    def for_task(cls, task: TaskSpec) -> TaskMetrics:
        """The metrics of ``task`` (its type, and its class count or output width)."""
        if task.is_classification:
            n = task.num_classes
            if not n or n < 2:
                raise ConfigError(
                    f"task_spec.num_classes={n!r}: evaluating a classifier needs >= 2 classes"
                )
            metrics: dict[str, Metric | MetricCollection] = {
                "accuracy": MulticlassAccuracy(num_classes=n, average="micro"),
                "precision_macro": MulticlassPrecision(num_classes=n, average="macro"),
                "recall_macro": MulticlassRecall(num_classes=n, average="macro"),
                "f1_macro": MulticlassF1Score(num_classes=n, average="macro"),
                "precision_per_class": MulticlassPrecision(num_classes=n, average=None),
                "recall_per_class": MulticlassRecall(num_classes=n, average=None),
                "f1_per_class": MulticlassF1Score(num_classes=n, average=None),
                "confusion_matrix": MulticlassConfusionMatrix(num_classes=n),
            }
            roc_auc = BinaryAUROC() if n == 2 else None
            return cls("classification", MetricCollection(metrics), num_classes=n, roc_auc=roc_auc)
        if task.task_type == "regression":
            metrics = {
                "mae": MeanAbsoluteError(),
                "rmse": MeanSquaredError(squared=False),
                "r2": R2Score(multioutput="uniform_average"),
            }
            return cls("regression", MetricCollection(metrics))
        if task.task_type == "language_modeling":
            metrics = {"perplexity": Perplexity(ignore_index=IGNORE_INDEX)}
            return cls(
                "language_modeling", MetricCollection(metrics), pad_token_id=task.pad_token_id
            )
        raise ConfigError(
            f"task_type={task.task_type!r} cannot be evaluated; allowed: classification, "
            "regression, language_modeling"
        )

    def to(self, device: torch.device | str) -> TaskMetrics:
        for metric in self._all():
            metric.to(device)
        return self

    def _all(self) -> list[Any]:
        extra = [self.roc_auc] if self.roc_auc is not None else []
        return [self.metrics, self.loss, self.rows, *extra]

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """Add one batch: the model's logits, the labels and the batch's mean loss."""
        n = labels.shape[0]
        self.loss.update(loss.detach().float(), weight=n)
        self.rows.update(float(n))
        if self.kind == "classification":
            logits = logits.detach().float()
            labels = labels.long()
            self.metrics.update(logits, labels)
            if self.roc_auc is not None:
                self.roc_auc.update(logits.softmax(dim=-1)[:, 1], labels)
        elif self.kind == "regression":
            preds = logits.detach().float().reshape(n, -1)
            target = labels.float().reshape(n, -1)
            if preds.shape[1] == 1:
                preds, target = preds[:, 0], target[:, 0]
            self.metrics.update(preds, target)
        else:
            targets = labels[:, 1:].long().clone()
            if self.pad_token_id is not None:
                targets[targets == self.pad_token_id] = IGNORE_INDEX
            self.metrics.update(logits.detach().float()[:, :-1, :], targets)

    def compute(self) -> dict[str, Any]:
        """Every metric over all rows seen (all ranks when distributed), as Python values.

        Scalars are floats; ``confusion_matrix`` is a list of rows (true class) of counts
        per predicted class; ``per_class`` is a list of dicts (one per class).
        """
        out: dict[str, Any] = {"loss": float(self.loss.compute())}
        values = self.metrics.compute()
        if self.roc_auc is not None:
            values["roc_auc"] = self.roc_auc.compute()
        if self.kind == "classification":
            matrix = values.pop("confusion_matrix").long()
            per_class = {
                k: values.pop(f"{k}_per_class").tolist() for k in ("precision", "recall", "f1")
            }
            support = matrix.sum(dim=1).tolist()
            out.update({k: float(v) for k, v in values.items()})
            out["confusion_matrix"] = matrix.tolist()
            out["per_class"] = [
                {
                    "class": i,
                    "precision": per_class["precision"][i],
                    "recall": per_class["recall"][i],
                    "f1": per_class["f1"][i],
                    "support": int(support[i]),
                }
                for i in range(len(support))
            ]
        else:
            out.update({k: float(v) for k, v in values.items()})
        out["num_rows"] = int(self.rows.compute())
        return out

    def reset(self) -> None:
        for metric in self._all():
            metric.reset()
