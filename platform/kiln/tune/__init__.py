"""Ray Tune over kiln runs: search spaces, presets, schedulers, and the periodic optimizer.

- :func:`search` runs a hyperparameter search whose trials are kiln Trainer runs and
  returns a :class:`SearchResult` (best config, metrics, checkpoint, trials table).
- :mod:`kiln.tune.spaces`: YAML/dict search spaces and the checks made before any trial.
- :mod:`kiln.tune.schedulers`: ASHA / median / FIFO by name, plateau stopper.
- :mod:`kiln.tune.periodic`: the :class:`PeriodicOptimizer` protocol (a solver called
  every N training steps), :class:`LRMultiplierAnnealer` (simulated annealing over
  per-group learning-rate multipliers) and the loop callback that calls it.

``ModelTrainer``, ``TrainingResult`` and ``OptimizationStep`` are re-exported from
:mod:`kiln.compat`.
"""

from kiln._lazy import lazy_exports
from kiln.tune.periodic import (
    AnnealingLRProblem,
    LRMultiplierAnnealer,
    OptimizationResult,
    PeriodicOptimizationCallback,
    PeriodicOptimizer,
)
from kiln.tune.schedulers import SCHEDULERS, create_scheduler, create_stopper
from kiln.tune.search import SearchConfig, SearchResult, search
from kiln.tune.spaces import check_space, load_search_file, parse_space, trial_config

_COMPAT = {
    "ModelTrainer": "kiln.compat.trainer",
    "OptimizationStep": "kiln.compat.steps",
    "TrainingResult": "kiln.compat.trainer",
}

__all__ = [
    "SCHEDULERS",
    "AnnealingLRProblem",
    "LRMultiplierAnnealer",
    "ModelTrainer",
    "OptimizationResult",
    "OptimizationStep",
    "PeriodicOptimizationCallback",
    "PeriodicOptimizer",
    "SearchConfig",
    "SearchResult",
    "TrainingResult",
    "check_space",
    "create_scheduler",
    "create_stopper",
    "load_search_file",
    "parse_space",
    "search",
    "trial_config",
]

__getattr__, __dir__ = lazy_exports(__name__, _COMPAT, globals())
