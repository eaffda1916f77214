"""The training engine: Trainer (driver), the worker loop, and the loop's pieces."""

import importlib
from typing import Any

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
    "ModelCheckpointCallback": "kiln.engine.callbacks",
    "ModelOutput": "kiln.engine.loss",
    "PEFTAwareLoss": "kiln.engine.loss",
    "QuantizationSafeLoss": "kiln.engine.loss",
    "RegressionLoss": "kiln.engine.loss",
    "SeedManager": "kiln.engine.seed",
    "Trainer": "kiln.engine.trainer",
    "TrainingEngine": "kiln.engine.facade",
    "TrainingHooks": "kiln.engine.callbacks",
    "TrainingLoop": "kiln.engine.loops",
    "TrainingMetrics": "kiln.engine.facade",
    "TrainingSession": "kiln.engine.facade",
    "ValidationLoop": "kiln.engine.loops",
    "VisionLoss": "kiln.engine.loss",
    "check_gradient_health": "kiln.engine.gradients",
    "get_loss_strategy": "kiln.engine.loss",
    "load_checkpoint_state": "kiln.engine.checkpoint",
    "resolve_checkpoint": "kiln.engine.checkpoint",
    "set_random_seed": "kiln.engine.seed",
}

__all__ = [
    "AccumulationStats",
    "CallbackBase",
    "CallbackList",
    "CheckpointManager",
    "CheckpointMetadata",
    "ClassificationLoss",
    "EarlyStoppingCallback",
    "EpochResult",
    "GradientAccumulator",
    "GradientHealth",
    "GradientMonitor",
    "LanguageModelingLoss",
    "LoggingCallback",
    "LossInputs",
    "LossStrategy",
    "LossStrategyRegistry",
    "ModelCheckpointCallback",
    "ModelOutput",
    "PEFTAwareLoss",
    "QuantizationSafeLoss",
    "RegressionLoss",
    "SeedManager",
    "Trainer",
    "TrainingEngine",
    "TrainingHooks",
    "TrainingLoop",
    "TrainingMetrics",
    "TrainingSession",
    "ValidationLoop",
    "VisionLoss",
    "check_gradient_health",
    "get_loss_strategy",
    "load_checkpoint_state",
    "resolve_checkpoint",
    "set_random_seed",
]


def __getattr__(name: str) -> Any:
    """Import public names on first use (keeps ``import kiln`` and the CLI fast)."""
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
