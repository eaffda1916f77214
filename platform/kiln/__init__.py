"""kiln: train, track, export and serve PyTorch models on Ray.

The public API is what ``__all__`` lists; everything else is internal.

    from kiln import Trainer, TrainingConfigBuilder, TaskSpec
    config = TrainingConfigBuilder.quick_prototype().with_training(epochs=5).build()
    results = Trainer(training_config=config).train("digits")
"""

__version__ = "0.1.0"

import importlib  # noqa: E402
from typing import Any  # noqa: E402

_EXPORTS = {
    "CallbackBase": "kiln.engine",
    "CheckpointError": "kiln.errors",
    "CheckpointManager": "kiln.engine",
    "ConfigError": "kiln.errors",
    "DatasetError": "kiln.errors",
    "DatasetNotFoundError": "kiln.errors",
    "EarlyStoppingCallback": "kiln.engine",
    "IntegrityError": "kiln.errors",
    "KilnError": "kiln.errors",
    "LoggingCallback": "kiln.engine",
    "ModelCheckpointCallback": "kiln.engine",
    "ModelConfigError": "kiln.errors",
    "ModelNotFoundError": "kiln.errors",
    "NotFoundError": "kiln.errors",
    "RunNotFoundError": "kiln.errors",
    "TaskSpec": "kiln.config",
    "Trainer": "kiln.engine",
    "TrainingConfig": "kiln.config",
    "TrainingConfigBuilder": "kiln.config",
    "TrainingEngine": "kiln.engine",
    "TrainingHooks": "kiln.engine",
    "TrainingSession": "kiln.engine",
}

__all__ = [
    "CallbackBase",
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "DatasetError",
    "DatasetNotFoundError",
    "EarlyStoppingCallback",
    "IntegrityError",
    "KilnError",
    "LoggingCallback",
    "ModelCheckpointCallback",
    "ModelConfigError",
    "ModelNotFoundError",
    "NotFoundError",
    "RunNotFoundError",
    "TaskSpec",
    "Trainer",
    "TrainingConfig",
    "TrainingConfigBuilder",
    "TrainingEngine",
    "TrainingHooks",
    "TrainingSession",
    "__version__",
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
