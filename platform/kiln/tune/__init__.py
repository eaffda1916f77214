"""Ray Tune over kiln runs: search spaces, presets, schedulers, and the periodic optimizer.

- :func:`search` runs a hyperparameter search whose trials are kiln Trainer runs and
  returns a :class:`SearchResult` (best config, metrics, checkpoint, trials table).
- :mod:`kiln.tune.spaces`: YAML/dict search spaces and the checks made before any trial.
- :mod:`kiln.tune.schedulers`: ASHA / median / FIFO by name, plateau stopper.
- :mod:`kiln.tune.periodic`: seed 004's ``PeriodicOptimizer`` protocol, a simulated
  annealing solver over per-group learning-rate multipliers, and the loop callback.
- :class:`ModelTrainer`: seed 004's trainer facade over the same kiln Trainer.
"""

from kiln.tune.model_trainer import ModelTrainer, TrainingResult
from kiln.tune.periodic import (
    AnnealingLRProblem,
    LRMultiplierAnnealer,
    OptimizationResult,
    OptimizationStep,
    PeriodicOptimizationCallback,
    PeriodicOptimizer,
)
from kiln.tune.schedulers import SCHEDULERS, create_scheduler, create_stopper
from kiln.tune.search import SearchConfig, SearchResult, search
from kiln.tune.spaces import check_space, load_search_file, parse_space, trial_config

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
