"""The training engine: Trainer (driver), the worker loop, and the loop's pieces.

``TrainingEngine``/``TrainingSession``/``TrainingMetrics`` and the ``PEFTAwareLoss`` /
``QuantizationSafeLoss`` strategies are re-exported from :mod:`kiln.compat`.
"""

from kiln._lazy import lazy_exports

_EXPORTS = {
    "AccumulationStats": "kiln.engine.gradients",
    "CallbackBase": "kiln.engine.callbacks",
    "CallbackList": "kiln.engine.callbacks",
    "CheckpointManager": "kiln.engine.checkpoint",
    "CheckpointMetadata": "kiln.engine.checkpoint",
    "ClassificationLoss": "kiln.engine.loss",
    "EarlyStoppingCallback": "kiln.engine.callbacks",
    "EpochResult": "kiln.engine.loops",
    "GradientAccumulator": "kiln.engine.gradients",
    "GradientHealth": "kiln.engine.gradients",
    "GradientMonitor": "kiln.engine.gradients",
    "LanguageModelingLoss": "kiln.engine.loss",
    "LoggingCallback": "kiln.engine.callbacks",
    "LossInputs": "kiln.engine.loss",
    "LossStrategy": "kiln.engine.loss",
    "LossStrategyRegistry": "kiln.engine.loss",
    "MetricSet": "kiln.engine.custom_metrics",
    "ModelCheckpointCallback": "kiln.engine.callbacks",
    "ModelOutput": "kiln.engine.loss",
    "PEFTAwareLoss": "kiln.compat.losses",
    "QuantizationSafeLoss": "kiln.compat.losses",
    "RegressionLoss": "kiln.engine.loss",
    "SeedManager": "kiln.engine.seed",
    "SequenceToSequenceLoss": "kiln.engine.loss",
    "Trainer": "kiln.engine.trainer",
    "TrainingEngine": "kiln.compat.engine",
    "TrainingHooks": "kiln.engine.callbacks",
    "TrainingLoop": "kiln.engine.loops",
    "TrainingMetrics": "kiln.compat.engine",
    "TrainingSession": "kiln.compat.engine",
    "ValidationLoop": "kiln.engine.loops",
    "VisionLoss": "kiln.engine.loss",
    "check_gradient_health": "kiln.engine.gradients",
    "get_loss_strategy": "kiln.engine.loss",
    "load_checkpoint_state": "kiln.engine.checkpoint",
    "resolve_checkpoint": "kiln.engine.checkpoint",
    "set_random_seed": "kiln.engine.seed",
}

__all__ = [*sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
