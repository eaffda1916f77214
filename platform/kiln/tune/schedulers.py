"""Trial schedulers and stoppers for kiln searches, chosen by name.

Every kiln trial reports once per epoch with an ``epoch`` metric, so schedulers
count time in epochs: ASHA's rungs sit at ``grace_period * reduction_factor**k``
epochs and ``max_t`` is the most epochs any trial of the search can run.

    create_scheduler("asha", max_t=8)           # stops losing trials at epochs 1, 2, 4
    create_scheduler("pbt", max_t=8, space=space, perturbation_interval=2)
    create_stopper({"std": 0.005}, "val_loss", "min")   # a TrialPlateauStopper

PBT (population based training) restarts a losing trial from a winner's latest
checkpoint with the winner's config, its searched hyperparameters perturbed (times
0.8 or 1.2, or resampled, clamped to the space's range). That needs in-process trials
(``num_workers=0``) that hand Tune a checkpoint every epoch; a resumed kiln run takes
its learning rate, weight decay and momentum from its (new) config. Architecture
(``model.*``), presets and the fields in :data:`PBT_FIXED` are searched at the start
but never mutated: a trial that takes over a checkpoint takes them from its donor.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import ConfigError

#: Scheduler names accepted by ``kiln.tune.search(scheduler=...)`` and ``kiln tune``.
SCHEDULERS = ("asha", "median", "fifo", "pbt")

TIME_ATTR = "epoch"

#: Fields PBT never mutates: they fix what a checkpoint is (its optimizer, its length,
#: where it runs, its data), so changing them mid-run would not continue the run.
PBT_FIXED = frozenset(
    {
        "epochs", "optimizer", "num_workers", "use_gpu", "cpus_per_worker", "random_seed",
        "deterministic", "validation_split", "dataset", "data_backend", "loss", "use_amp",
        "amp_dtype", "compile_mode",
    }
)  # fmt: skip

_PLATEAU_DEFAULTS = {"std": 0.01, "num_results": 4, "grace_period": 4}


def check_scheduler(name: Any) -> list[str]:
    """Problems with a scheduler name (instances of Tune's TrialScheduler are accepted)."""
    if not isinstance(name, str):
        from ray.tune.schedulers import TrialScheduler

        if isinstance(name, TrialScheduler):
            return []
        return [f"scheduler={name!r} must be one of {', '.join(SCHEDULERS)} or a TrialScheduler"]
    if name not in SCHEDULERS:
        return [f"scheduler={name!r} is not one of {', '.join(SCHEDULERS)}"]
    return []


def is_pbt(scheduler: Any) -> bool:
    """True for "pbt" and Tune's PopulationBasedTraining (and subclasses such as PB2)."""
    if isinstance(scheduler, str):
        return scheduler == "pbt"
    from ray.tune.schedulers import PopulationBasedTraining

    return isinstance(scheduler, PopulationBasedTraining)


def check_pbt(
    space: dict[str, Any],
    candidates: list[Any],
    num_trials: int,
    perturbation_interval: Any = None,
    *,
    mutations_from_space: bool = True,
) -> list[str]:
    """Problems with a PBT search, before any trial starts.

    Args:
        space: the parsed search space.
        candidates: one TrainingConfig per preset/hardware combination of the space.
        num_trials: how many trials the search will start.
        perturbation_interval: epochs between PBT's exploit/explore steps (None: default).
        mutations_from_space: the mutations come from ``space`` ("pbt"), not from a
            PopulationBasedTraining the caller built.
    """
    errors = []
    if perturbation_interval is not None and (
        isinstance(perturbation_interval, bool)
        or not isinstance(perturbation_interval, int)
        or perturbation_interval < 1
    ):
        errors.append(
            f"perturbation_interval={perturbation_interval!r} must be an integer >= 1 (epochs)"
        )
    workers = sorted({c.num_workers for c in candidates if c.num_workers != 0})
    if workers:
        errors.append(
            f"scheduler='pbt' restarts trials from each other's checkpoints, which kiln does "
            f"for in-process trials only (num_workers=0); this search has trials with "
            f"num_workers={workers!r}; set num_workers=0 or use 'asha', 'median' or 'fifo'"
        )
    if num_trials < 2:
        errors.append(
            f"scheduler='pbt' needs a population of at least 2 trials, but this search "
            f"starts {num_trials}; raise num_samples"
        )
    if mutations_from_space and not pbt_mutations(space):
        from kiln.tune.spaces import searched_keys

        searched = searched_keys(space)
        errors.append(
            "scheduler='pbt' needs at least one searched hyperparameter it can mutate (such "
            "as learning_rate or weight_decay); "
            + (
                f"{', '.join(searched)} stay fixed for a trial's whole run (model.*, preset, "
                f"{', '.join(sorted(PBT_FIXED))})"
                if searched
                else "the search space varies nothing"
            )
        )
    return errors


def pbt_mutations(space: dict[str, Any]) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations`` from the search space: the same Tune domains.

    Float/integer ranges are perturbed by a factor or resampled; choices and grids are
    lists that PBT shifts along or resamples. Architecture, presets and
    :data:`PBT_FIXED` fields are left out.
    """
    from ray.tune.search.sample import Categorical, Domain, Function

    from kiln.tune import spaces

    out: dict[str, Any] = {}
    for key in spaces.searched_keys(space):
        if key == spaces.PRESET_KEY or key.startswith(spaces.MODEL_PREFIX) or key in PBT_FIXED:
            continue
        domain = space[key]
        if spaces._is_grid(domain):
            out[key] = list(domain["grid_search"])
        elif isinstance(domain, Categorical):
            out[key] = list(domain.categories)
        elif isinstance(domain, Domain) and not isinstance(domain, Function):
            out[key] = domain  # a range: perturbed by a factor or resampled
    return out


class ClampToSpace:
    """PBT ``custom_explore_fn``: keep perturbed values inside the space's ranges.

    PBT multiplies a value by 0.8 or 1.2 and can walk out of ``[lower, upper]`` (a
    momentum of 1.1); such values are put back at the nearest end that
    :func:`kiln.tune.spaces.check_space` checked.
    """

    def __init__(self, bounds: dict[str, tuple[float, float]]) -> None:
        self.bounds = dict(bounds)

    @classmethod
    def for_mutations(cls, mutations: dict[str, Any]) -> ClampToSpace:
        from ray.tune.search.sample import Float, Integer

        from kiln.tune.spaces import candidate_values

        bounds = {}
        for key, domain in mutations.items():
            if isinstance(domain, (Float, Integer)):
                lo, hi = candidate_values(domain) or (None, None)
                if lo is not None:
                    bounds[key] = (min(lo, hi), max(lo, hi))
        return cls(bounds)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (lo, hi) in self.bounds.items():
            value = config.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                clamped = min(max(value, lo), hi)
                config[key] = type(value)(clamped) if isinstance(value, int) else clamped
        return config


def create_scheduler(
    name: Any,
    *,
    max_t: int,
    grace_period: int = 1,
    reduction_factor: float = 2,
    space: dict[str, Any] | None = None,
    perturbation_interval: int | None = None,
) -> Any:
    """A Tune TrialScheduler for ``name`` (metric and mode come from the TuneConfig).

    Args:
        name: "asha", "median", "fifo" or "pbt" (a TrialScheduler instance is returned
            as is).
        max_t: the most epochs a trial can run.
        grace_period: epochs every trial runs before it can be stopped.
        reduction_factor: ASHA keeps the top ``1/reduction_factor`` at each rung.
        space: the search space; PBT mutates its searched hyperparameters.
        perturbation_interval: PBT exploits/explores every this many epochs (default:
            a quarter of ``max_t``, at least 1).
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
    if name == "pbt":
        return _pbt(space or {}, max_t, perturbation_interval)
    return FIFOScheduler()


def _pbt(space: dict[str, Any], max_t: int, perturbation_interval: int | None) -> Any:
    from ray.tune.schedulers import PopulationBasedTraining

    problems = check_pbt(space, [], 2, perturbation_interval)
    if problems:
        raise ConfigError(problems)
    interval = max(1, max_t // 4) if perturbation_interval is None else perturbation_interval
    mutations = pbt_mutations(space)
    return PopulationBasedTraining(
        time_attr=TIME_ATTR,
        perturbation_interval=interval,
        hyperparam_mutations=mutations,
        custom_explore_fn=ClampToSpace.for_mutations(mutations),
    )


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
    return TrialPlateauStopper(metric=metric, mode=mode, **options)  # type: ignore[arg-type]  # options mixes int and float keywords, checked above
