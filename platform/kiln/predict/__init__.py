"""Evaluation on labelled sets and batch prediction on Ray Data.

    from kiln.predict import evaluate, predict
    result = evaluate("digits@production", "digits", split="val")   # torchmetrics
    summary = predict("digits@production", "rows.parquet", "scored/", keep=["id"])

``evaluate`` is what ``Trainer.evaluate`` and ``kiln eval`` call; ``predict`` is what
``kiln predict`` calls.
"""

from kiln.predict.batch import PredictionSummary, predict
from kiln.predict.evaluate import SPLITS, EvaluationResult, evaluate, evaluate_checkpoint
from kiln.predict.metrics import TaskMetrics

__all__ = [
    "SPLITS",
    "EvaluationResult",
    "PredictionSummary",
    "TaskMetrics",
    "evaluate",
    "evaluate_checkpoint",
    "predict",
]
