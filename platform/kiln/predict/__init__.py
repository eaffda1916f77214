"""Evaluation on labelled sets and batch prediction on Ray Data.

    from kiln.predict import evaluate, predict
    result = evaluate("digits@production", "digits", split="val")   # torchmetrics
    summary = predict("digits@production", "rows.parquet", "scored/", keep=["id"])

``evaluate`` is what ``Trainer.evaluate`` and ``kiln eval`` call; ``predict`` is what
``kiln predict`` calls. Names are imported on first use: the prediction actors load
onnxruntime, never torch.
"""

from kiln._lazy import lazy_exports

_EXPORTS = {
    "BundleScorer": "kiln.predict.scorer",
    "EvaluationResult": "kiln.predict.evaluation",
    "PredictionSummary": "kiln.predict.batch",
    "SPLITS": "kiln.predict.evaluation",
    "TaskMetrics": "kiln.predict.metrics",
    "evaluate": "kiln.predict.evaluation",
    "evaluate_checkpoint": "kiln.predict.evaluation",
    "predict": "kiln.predict.batch",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
