"""kiln: train, track, export and serve PyTorch models on Ray.

The public API is what ``__all__`` lists; everything else is internal.

    from kiln import Trainer, TrainingConfigBuilder, TaskSpec
    config = TrainingConfigBuilder.quick_prototype().with_training(epochs=5).build()
    results = Trainer(training_config=config).train("digits")
"""

__version__ = "0.1.0"

from kiln._lazy import lazy_exports  # noqa: E402

_EXPORTS = {
    "CallbackBase": "kiln.engine",
    "CheckpointError": "kiln.errors",
    "CheckpointManager": "kiln.engine",
    "ConfigError": "kiln.errors",
    "DatasetError": "kiln.errors",
    "DatasetNotFoundError": "kiln.errors",
    "EarlyStoppingCallback": "kiln.engine",
    "EvaluationResult": "kiln.predict",
    "IntegrityError": "kiln.errors",
    "KilnError": "kiln.errors",
    "LoggingCallback": "kiln.engine",
    "ModelCheckpointCallback": "kiln.engine",
    "ModelConfigError": "kiln.errors",
    "ModelNotFoundError": "kiln.errors",
    "NotFoundError": "kiln.errors",
    "PredictionSummary": "kiln.predict",
    "RunNotFoundError": "kiln.errors",
    "TaskSpec": "kiln.config",
    "Trainer": "kiln.engine",
    "TrainingConfig": "kiln.config",
    "TrainingConfigBuilder": "kiln.config",
    "TrainingEngine": "kiln.compat",
    "TrainingHooks": "kiln.engine",
    "TrainingSession": "kiln.compat",
    "evaluate": "kiln.predict",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
