"""The older training APIs kiln keeps working, as thin layers over kiln's core.

Each name here exists so code written against those APIs runs unchanged; the core
(``kiln.engine``, ``kiln.tune``, ``kiln.tracking``) does not use them. Where each
class lives and what it maps to: ``docs/seeds.md``.

- :class:`TrainingEngine` -> :class:`TrainingSession`: a dataset id and a layer list
  trained by :class:`kiln.Trainer` (also ``kiln.TrainingEngine``).
- :class:`ModelTrainer`, :class:`TrainingResult`, :class:`TrainingStep`,
  :class:`OptimizationStep`, :class:`DataManager`: a hand-driven, in-process training
  API whose epochs run kiln's ``TrainingLoop``.
- :class:`TrainingCallback` and its :class:`MetricsCallback`, :class:`CheckpointCallback`,
  :class:`EarlyStoppingCallback` (trainer-first hooks), and :class:`SeedCallbackAdapter`,
  which runs such callbacks in kiln's loop.
- :class:`PEFTAwareLoss`, :class:`QuantizationSafeLoss`: loss strategies also
  registered by name (``"peft"``, ``"quantization_safe"``).
- :class:`DataModuleProtocol`: the data-module interface kiln datasets satisfy;
  :class:`DataLoaderFactory`, :class:`DataLoaderConfig`, :class:`UniversalDataModule`:
  loaders with the task's collator.
- ``QuantumOptimizer``: the older name of :class:`kiln.tune.PeriodicOptimizer`.
"""

from kiln._lazy import lazy_exports

_EXPORTS = {
    "CheckpointCallback": "kiln.compat.callbacks",
    "DataLoaderConfig": "kiln.compat.data",
    "DataLoaderFactory": "kiln.compat.data",
    "DataManager": "kiln.compat.data",
    "DataModuleProtocol": "kiln.compat.data",
    "EarlyStoppingCallback": "kiln.compat.callbacks",
    "KilnCallbackAdapter": "kiln.compat.callbacks",
    "LRMultiplierAnnealer": "kiln.tune.periodic",
    "MetricsCallback": "kiln.compat.callbacks",
    "MetricsTracker": "kiln.tracking.tracker",
    "ModelTrainer": "kiln.compat.trainer",
    "OptimizationResult": "kiln.tune.periodic",
    "OptimizationStep": "kiln.compat.steps",
    "PEFTAwareLoss": "kiln.compat.losses",
    "QuantizationSafeLoss": "kiln.compat.losses",
    "QuantumOptimizer": "kiln.compat.steps",
    "SeedCallbackAdapter": "kiln.compat.callbacks",
    "TrainingCallback": "kiln.compat.callbacks",
    "TrainingEngine": "kiln.compat.engine",
    "TrainingMetrics": "kiln.compat.engine",
    "TrainingResult": "kiln.compat.trainer",
    "TrainingSession": "kiln.compat.engine",
    "TrainingStep": "kiln.compat.steps",
    "UniversalDataModule": "kiln.data.module",
    "adapt_callback": "kiln.compat.callbacks",
}

__all__ = [*sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
