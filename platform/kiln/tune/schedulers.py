"""Trial schedulers and stoppers for kiln searches, chosen by name.

Every kiln trial reports once per epoch with an ``epoch`` metric, so schedulers
count time in epochs: ASHA's rungs sit at ``grace_period * reduction_factor**k``
epochs and ``max_t`` is the most epochs any trial of the search can run.

    create_scheduler("asha", max_t=8)           # stops losing trials at epochs 1, 2, 4
    create_stopper({"std": 0.005}, "val_loss", "min")   # a TrialPlateauStopper
"""

from __future__ import annotations

from typing import Any

from kiln.errors import ConfigError

#: Scheduler names accepted by ``kiln.tune.search(scheduler=...)`` and ``kiln tune``.
SCHEDULERS = ("asha", "median", "fifo", "pbt")

TIME_ATTR = "epoch"

_PBT_WHY = (
    "scheduler='pbt' is not supported yet: PBT clones a winner's checkpoint into a loser "
    "and changes its hyperparameters, but a resumed kiln run restores the optimizer state "
    "(learning rate included) from the checkpoint, so the new values would not take "
    "effect; use 'asha', 'median' or 'fifo'"
)

_PLATEAU_DEFAULTS = {"std": 0.01, "num_results": 4, "grace_period": 4}


def check_scheduler(name: Any) -> list[str]:
    """Problems with a scheduler name (instances of Tune's TrialScheduler are accepted)."""
    if not isinstance(name, str):
        from ray.tune.schedulers import TrialScheduler

        if isinstance(name, TrialScheduler):
            return []
        return [f"scheduler={name!r} must be one of {', '.join(SCHEDULERS)} or a TrialScheduler"]
    if name == "pbt":
        return [_PBT_WHY]
    if name not in SCHEDULERS:
        return [f"scheduler={name!r} is not one of {', '.join(SCHEDULERS)}"]
    return []


def create_scheduler(
    name: Any, *, max_t: int, grace_period: int = 1, reduction_factor: float = 2
) -> Any:
    """A Tune TrialScheduler for ``name`` (metric and mode come from the TuneConfig).

    Args:
        name: "asha", "median" or "fifo" (a TrialScheduler instance is returned as is).
        max_t: the most epochs a trial can run.
        grace_period: epochs every trial runs before it can be stopped.
        reduction_factor: ASHA keeps the top ``1/reduction_factor`` at each rung.
    """
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        MedianStoppingRule,
        TrialScheduler,
    )

    if isinstance(name, TrialScheduler):
        return name
    problems = check_scheduler(name)
    if problems:
        raise ConfigError(problems)
    grace = max(1, min(grace_period, max_t))
    if name == "asha":
        return ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=max_t,
            grace_period=grace,
            reduction_factor=reduction_factor,
        )
    if name == "median":
        return MedianStoppingRule(time_attr=TIME_ATTR, grace_period=grace, min_samples_required=3)
    return FIFOScheduler()


def create_stopper(plateau: Any, metric: str, mode: str) -> Any:
    """A TrialPlateauStopper when ``plateau`` is true or a dict of its options, else None.

    Options: ``std`` (stop when the last ``num_results`` values have a smaller standard
    deviation), ``num_results``, ``grace_period`` (results before it may stop) and
    ``metric_threshold`` (only stop once the metric is better than this).
    """
    if plateau in (None, False):
        return None
    from ray.tune.stopper import TrialPlateauStopper

    options = dict(_PLATEAU_DEFAULTS)
    if isinstance(plateau, dict):
        allowed = (*_PLATEAU_DEFAULTS, "metric_threshold")
        unknown = [k for k in plateau if k not in allowed]
        if unknown:
            raise ConfigError(
                f"plateau={plateau!r} has unknown options {unknown!r}; allowed: {', '.join(allowed)}"
            )
        options.update(plateau)
    elif plateau is not True:
        raise ConfigError(f"plateau={plateau!r} must be true, false or a mapping of options")
    return TrialPlateauStopper(metric=metric, mode=mode, **options)
