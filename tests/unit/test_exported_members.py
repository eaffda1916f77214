"""The public API is exactly what each package's ``__all__`` lists, and it all resolves."""

from __future__ import annotations

import importlib

import pytest

import kiln

PUBLIC = {
    "kiln": {
        "CallbackBase",
        "CheckpointError",
        "CheckpointManager",
        "ConfigError",
        "DatasetError",
        "DatasetNotFoundError",
        "EarlyStoppingCallback",
        "EvaluationResult",
        "IntegrityError",
        "KilnError",
        "LoggingCallback",
        "ModelCheckpointCallback",
        "ModelConfigError",
        "ModelNotFoundError",
        "NotFoundError",
        "PredictionSummary",
        "RunNotFoundError",
        "TaskSpec",
        "Trainer",
        "TrainingConfig",
        "TrainingConfigBuilder",
        "TrainingEngine",
        "TrainingHooks",
        "TrainingSession",
        "__version__",
        "evaluate",
    },
}


def test_top_level_exports_are_pinned():
    assert set(kiln.__all__) == PUBLIC["kiln"]


@pytest.mark.parametrize(
    "package",
    [
        "kiln",
        "kiln.config",
        "kiln.data",
        "kiln.models",
        "kiln.engine",
        "kiln.tracking",
        "kiln.export",
        "kiln.serve",
        "kiln.tune",
        "kiln.queue",
        "kiln.predict",
    ],
)
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ lists names it does not provide: {missing}"
    assert len(module.__all__) == len(set(module.__all__)), f"{package}.__all__ has duplicates"


def test_private_helpers_are_not_exported():
    for package in ("kiln", "kiln.engine", "kiln.tracking"):
        module = importlib.import_module(package)
        assert not [n for n in module.__all__ if n.startswith("_") and n != "__version__"]
