"""``kiln.tune.search``: hyperparameter search where every trial is one kiln Trainer run.

    from ray import tune
    from kiln.tune import search

    result = search(
        TrainingConfig(epochs=8, model={"name": "mlp", "hidden": [32]}),
        None, "iris", None,
        {"learning_rate": tune.loguniform(1e-5, 1e-1), "batch_size": tune.choice([8, 32])},
        num_samples=8, scheduler="asha", metric="val_loss", mode="min",
    )
    result.best_config, result.best_metrics, result.best_checkpoint, result.trials

How it runs (the driver is the process that calls ``search``)::

    driver:  check space, metric, scheduler and resources      (ConfigError before any trial)
             tune.Tuner(with_resources(with_parameters(run_trial, data...)), ...).fit()
    trial:   run_trial(params) -> Trainer(training_config=trial config).train(data)
               num_workers=0: the one worker loop runs inside the trial actor and reports
                              each epoch to Tune (ray.tune.report)
               num_workers>=1: Ray Train workers report through TuneReportCallback
             the scheduler (ASHA, median) reads the per-epoch reports and stops losers
    pbt:     trials also hand Tune each epoch's kiln checkpoint; PBT restarts a losing
             trial from a winner's checkpoint (run_trial: resume_from=Tune's checkpoint)
             with the winner's config, its hyperparameters perturbed; the resumed
             run takes learning rate, weight decay and momentum from that config
    driver:  trials table; each trial recorded as a run grouped under the search id;
             the best trial's best checkpoint registered when ``register_as`` is given

Trials write no database (only the driver does). A search interrupted (Ctrl-C, a
crash) continues with ``resume=True``: Tune restores its experiment state and a
restarted trial resumes from its own latest kiln checkpoint (under PBT: from the
checkpoint Tune hands it back).

Under PBT a trial's epochs continue its donor's count (a trial that took over a
checkpoint at epoch 4 goes on with epoch 5), ``trials.restored_from`` lists the trials
whose checkpoints it took over, and ``best_config`` is the winner's config when it
reported its best epoch (its last perturbation before it; the run before it may have
used other values: PBT finds a schedule, not one config).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import pandas as pd

from kiln.config import TaskSpec, TrainingConfig
from kiln.errors import ConfigError
from kiln.paths import RunPaths
from kiln.tune import schedulers as _sched
from kiln.tune import spaces
from kiln.tune.trial import (
    TRIALS_DIR,
    TrialResources,
    TrialSetup,
    run_trial,
    trial_resources,
)

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        best_config: the winning trial's validated TrainingConfig (the base config's
            tracking/registration settings kept).
        best_metrics: the winner's metrics at its best epoch (by ``metric``).
        best_checkpoint: path of the winner's best kiln checkpoint (or None).
        trials: one row per trial: trial_id, the searched params, epochs, max_epochs,
            final_<metric>, best_<metric>, status, stopped_early, restored_from (trial
            ids whose checkpoints it took over under PBT), run_id, error.
        search_id: the experiment name; every trial's run is grouped under it.
    """

    best_config: TrainingConfig
    best_metrics: dict[str, Any]
    best_checkpoint: str | None
    trials: pd.DataFrame
    search_id: str
    metric: str = "val_loss"
    mode: str = "min"
    best_trial_id: str | None = None
    experiment_path: str | None = None
    model_id: int | None = None
    interrupted: bool = False


@dataclass(frozen=True)
class SearchConfig:
    """How a search runs: how many trials, how they are ranked, stopped and kept.

    Attributes:
        num_samples: samples drawn from the space (each grid point is repeated this often).
        scheduler: "asha", "median", "fifo", "pbt" (or a Tune TrialScheduler). "pbt"
            needs in-process trials (num_workers=0), at least 2 trials and a searched
            hyperparameter it can mutate (see :mod:`kiln.tune.schedulers`).
        metric, mode: what ranks trials; must be a metric every trial reports.
        max_concurrent_trials: at most this many trials at once (default: what fits).
        resources_per_trial: e.g. ``{"cpu": 2}``; default from the trial's config.
        time_budget_s: stop the whole search after this many seconds.
        register_as: register the best trial's best checkpoint under this name.
        resume: continue the interrupted search ``name`` (or the newest one) instead of
            starting over.
        name: the search id (default: generated).
        plateau: True or TrialPlateauStopper options: stop trials whose metric plateaus.
        grace_period, reduction_factor: ASHA/median settings (in epochs).
        perturbation_interval: PBT's epochs between exploit/explore steps (default: a
            quarter of the most epochs a trial runs).
        verbose: Tune's console verbosity (0 quiet, 1 status table, 2 + trial results).
        seed: seeds the sampling of the space (same seed, same trials).
    """

    num_samples: int = 1
    scheduler: Any = "asha"
    metric: str = "val_loss"
    mode: str = "min"
    max_concurrent_trials: int | None = None
    resources_per_trial: Mapping[str, float] | None = None
    time_budget_s: float | None = None
    register_as: str | None = None
    resume: bool = False
    name: str | None = None
    plateau: Any = None
    grace_period: int = 1
    reduction_factor: float = 2
    perturbation_interval: int | None = None
    verbose: int = 0
    seed: int | None = None

    def with_options(self, **options: Any) -> SearchConfig:
        """A copy with ``options`` set; an unknown name is a ConfigError with suggestions."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise ConfigError(
                [
                    f"{k!r} is not a search setting"
                    + (
                        f"; did you mean {close[0]!r}?"
                        if (close := get_close_matches(k, names, 1))
                        else ""
                    )
                    + f" (settings: {', '.join(names)})"
                    for k in unknown
                ]
            )
        return dataclasses.replace(self, **options)


def search(
    training_config: TrainingConfig | None,
    task_spec: TaskSpec | None,
    train_data: Any,
    val_data: Any,
    search_space: Mapping[str, Any] | str | os.PathLike[str],
    settings: SearchConfig | None = None,
    *,
    model: Any = None,
    hooks: Sequence[Any] = (),
    callbacks: Sequence[Any] = (),
    paths: RunPaths | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    db_path: str | os.PathLike[str] | None = None,
    artifacts_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    metrics: Any = None,
    **options: Any,
) -> SearchResult:
    """Search hyperparameters with Ray Tune; every trial is one kiln Trainer run.

    Args:
        training_config: the base config every trial starts from.
        task_spec: what is predicted (completed from the data where silent).
        train_data, val_data: anything ``Trainer.train`` accepts (dataset id, (X, y), ...).
        search_space: field -> Tune domain (``model.<param>``, ``preset`` allowed), its
            YAML form, or a path to a YAML search file (see :mod:`kiln.tune.spaces`).
        settings: how the search runs (:class:`SearchConfig`); ``**options`` set single
            fields of it (``num_samples=8, scheduler="asha", metric="val_accuracy"``).
        model: an nn.Module or factory shared by all trials (None: built from config).
        hooks: kiln hooks/callbacks run inside every trial's loop.
        metrics: custom metrics every trial computes, as ``Trainer(metrics=...)``; their
            ``train_<name>`` / ``val_<name>`` can be the search ``metric``.
        callbacks: Ray Tune callbacks (e.g. a reporter) for the driver.
        paths: every location at once, as an entry point resolved them; ``storage_path``
            (where searches live, default ``<home>/tune``), ``db_path``, ``artifacts_dir``
            and ``data_dir`` override single ones.
    """
    opts = (settings or SearchConfig()).with_options(**options)
    base = (training_config or TrainingConfig()).validate()
    space = _load_space(search_space)
    home = (paths or RunPaths.resolve()).with_overrides(
        tune=storage_path,
        db=db_path or base.tracking_db,
        artifacts=artifacts_dir,
        datasets=data_dir,
    )
    plan = _plan(train_data, val_data, task_spec, base, home.datasets)
    from kiln.engine.custom_metrics import MetricSet

    custom = MetricSet.from_user(metrics)
    _check_search(space, base, plan, opts, model, custom.names if custom else ())

    from kiln._ray import ensure_ray

    ensure_ray()
    _check_resources(space, base, opts.resources_per_trial)
    home.tune.mkdir(parents=True, exist_ok=True)
    search_id, experiment = _experiment(home.tune, opts.name, opts.resume)
    setup = TrialSetup(
        base=base,
        task=plan.task,
        trials_dir=str(experiment / TRIALS_DIR),
        metric=opts.metric,
        mode=opts.mode,
        data_dir=str(home.datasets),
        hooks=list(hooks),
        report_checkpoints=_sched.is_pbt(opts.scheduler),
        metrics=custom,
    )
    progress = _sample_counter()
    tuner = _tuner(
        setup, space, opts, experiment, search_id, home, [*callbacks, progress],
        train_data=train_data, val_data=val_data, model=model,
    )  # fmt: skip
    results = tuner.fit()
    return _summarize(
        results, setup, space, search_id, home, opts.register_as, plan, progress.total
    )


def _tuner(setup, space, opts: SearchConfig, experiment, search_id, home, callbacks, **data):
    """A new ``tune.Tuner`` for this search, or the restored one when resuming."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup, **data),
        # Tune also takes a callable returning a resource dict (typed as a PG factory).
        TrialResources(setup.base, opts.resources_per_trial),  # type: ignore[arg-type]
    )
    if opts.resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(
            str(experiment), trainable, resume_unfinished=True, resume_errored=True
        )
        # Tune restores the pickled RunConfig, callbacks included, and has no public way to
        # replace them; the old ones would carry stale state (and this run's reporters).
        local = tuner._local_tuner
        assert local is not None  # a restored local (not Ray Client) Tuner has one
        local.get_run_config().callbacks = callbacks
        return tuner
    base = setup.base
    scheduler = _sched.create_scheduler(
        opts.scheduler,
        max_t=spaces.epoch_bound(space, base),
        grace_period=opts.grace_period,
        reduction_factor=opts.reduction_factor,
        space=space,
        perturbation_interval=opts.perturbation_interval,
    )
    seeded = BasicVariantGenerator(random_state=opts.seed) if opts.seed is not None else None
    return tune.Tuner(
        trainable,
        param_space=dict(space),
        tune_config=tune.TuneConfig(
            metric=opts.metric,
            mode=opts.mode,
            scheduler=scheduler,
            num_samples=opts.num_samples,
            search_alg=seeded,
            max_concurrent_trials=opts.max_concurrent_trials or _default_concurrency(space, base),
            time_budget_s=opts.time_budget_s,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=search_id,
            storage_path=str(home.tune),
            stop=_sched.create_stopper(opts.plateau, opts.metric, opts.mode),
            callbacks=callbacks,
            verbose=opts.verbose,
        ),
    )


# ---------------------------------------------------------------------- checks
def _load_space(search_space: Any) -> dict[str, Any]:
    if isinstance(search_space, (str, os.PathLike)):
        space, settings = spaces.load_search_file(Path(search_space))
        if settings:
            logger.warning("search(): the file's tune: settings are read by `kiln tune` only")
        return space
    return spaces.parse_space(search_space)


def _plan(train_data, val_data, task_spec, base, data_dir):
    """Resolve the data once in the driver: the task, and whether validation data exists."""
    from kiln.engine.data_plan import plan_data

    probe = base.replace(num_workers=0, data_backend="auto")
    return plan_data(train_data, val_data, task_spec, probe, data_dir=data_dir)


def _check_search(space, base, plan, opts: SearchConfig, model, custom=()) -> None:
    """Every problem with the space, metric, scheduler and data, before any trial runs."""
    errors = _check_inputs(
        space, base, plan, opts.metric, opts.mode, opts.scheduler, opts.num_samples, model,
        custom,
    )  # fmt: skip
    if _sched.is_pbt(opts.scheduler):
        samples = opts.num_samples if isinstance(opts.num_samples, int) else 2
        errors += _sched.check_pbt(
            space,
            _safe_candidates(space, base),
            samples * _grid_size(space),
            opts.perturbation_interval,
            mutations_from_space=opts.scheduler == "pbt",
        )
    if errors:
        raise ConfigError(errors)


def _check_inputs(
    space, base, plan, metric, mode, scheduler, num_samples, model, custom=()
) -> list[str]:
    from kiln.engine.data_plan import DataKind

    errors = []
    if not isinstance(num_samples, int) or num_samples < 1:
        errors.append(f"num_samples={num_samples!r} must be an integer >= 1")
    model_check = None if model is not None else _model_checker(plan)
    errors += spaces.check_space(space, base, model_check=model_check)
    has_val = plan.data_kind == DataKind.MEMORY and "val" in (plan.arrays or {})
    has_val = has_val or "val" in (plan.datasets or {}) or "val" in (plan.loaders or {})
    errors += spaces.check_metric(metric, mode, plan.task.task_type, has_val, custom)
    errors += _sched.check_scheduler(scheduler)
    if plan.data_kind == DataKind.RAY and any(
        c.num_workers == 0 for c in _safe_candidates(space, base)
    ):
        errors.append(
            "in-process trials (num_workers=0) read in-memory data, but this data is read "
            "through Ray Data; pass arrays or a bundled dataset id, or set num_workers>=1"
        )
    return errors


def _grid_size(space) -> int:
    """Trials per sample: the product of the grid searches' sizes."""
    return math.prod(len(v["grid_search"]) for v in space.values() if spaces._is_grid(v))


def _model_checker(plan):
    from kiln.models import validate_model_config

    def check(spec: dict[str, Any]) -> list[str]:
        return validate_model_config(
            spec, input_shape=plan.input_shape, num_outputs=plan.task.output_dim
        )

    return check


def _safe_candidates(space, base) -> list[TrainingConfig]:
    try:
        return spaces.hardware_candidates(space, base)
    except ConfigError:
        return [base]


def _check_resources(space, base, override) -> None:
    """Every trial must fit on the cluster; otherwise Tune would wait forever."""
    import ray

    total = ray.cluster_resources()
    problems = []
    for cfg in spaces.hardware_candidates(space, base):
        need = dict(trial_resources(cfg, override))
        if cfg.num_workers > 0:
            need["CPU"] = need.get("CPU", 0) + cfg.num_workers * (cfg.cpus_per_worker or 1)
            need["GPU"] = need.get("GPU", 0) + (cfg.num_workers if cfg.use_gpu else 0)
        for res, amount in need.items():
            have = total.get(res, 0)
            if amount > have + 1e-9:
                problems.append(
                    f"a trial with num_workers={cfg.num_workers}, use_gpu={cfg.use_gpu}, "
                    f"cpus_per_worker={cfg.cpus_per_worker} needs {amount:g} {res} but the Ray "
                    f"cluster has {have:g}; lower resources_per_trial / num_workers, set "
                    "use_gpu=false, or add nodes"
                )
    if problems:
        raise ConfigError(sorted(set(problems)))


def _default_concurrency(space, base) -> int | None:
    """Trials driving Ray Train workers: as many as the cluster's CPUs can hold at once."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    need = max(
        (c.num_workers * (c.cpus_per_worker or 1) for c in spaces.hardware_candidates(space, base)),
        default=0,
    )
    return max(1, int(cpus // need)) if need else None


def _experiment(storage: Path, name: str | None, resume: bool) -> tuple[str, Path]:
    from ray import tune

    if resume and name is None:
        found = sorted(
            (p for p in storage.iterdir() if p.is_dir() and tune.Tuner.can_restore(str(p))),
            key=lambda p: p.stat().st_mtime,
        )
        if not found:
            raise ConfigError(
                f"resume=True, but {str(storage)!r} holds no search to resume; start one first"
            )
        return found[-1].name, found[-1]
    if name is None:
        name = f"search-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    path = storage / name
    if resume and not tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"resume=True, but there is no search {name!r} under {str(storage)!r}")
    if not resume and tune.Tuner.can_restore(str(path)):
        raise ConfigError(
            f"a search named {name!r} already exists under {str(storage)!r}; pass resume=True "
            "to continue it or choose another name"
        )
    return name, path


# ---------------------------------------------------------------------- results
def _sample_counter() -> Any:
    """A Tune callback that learns how many trials the search will have (from setup)."""
    from ray.tune import Callback

    class _Count(Callback):
        total: int | None = None

        def setup(
            self,
            stop: Any = None,
            num_samples: int | None = None,
            total_num_samples: int | None = None,
            **info: Any,
        ) -> None:
            self.total = total_num_samples

    return _Count()


def _summarize(
    results, setup, space, search_id, home, register_as, plan, total: int | None
) -> SearchResult:
    from kiln.tracking.recorder import RunRecorder
    from kiln.tune import _record

    trials = _record.collect_trials(results, setup, space)
    recorder = RunRecorder(home.db, home.artifacts)
    if setup.base.tracking:
        _record.record_trials(recorder, search_id, trials, plan)
    frame = _record.trials_frame(trials, spaces.searched_keys(space), setup.metric)
    interrupted = any(t.status == "unfinished" for t in trials) or (
        total is not None and len(trials) < total
    )
    best = _record.best_trial(trials, setup.metric, setup.mode)
    if best is None:
        errors = [t.error for t in trials if t.error]
        raise ConfigError(
            f"no trial of search {search_id!r} reported {setup.metric!r}"
            + (f"; first error: {errors[0]}" if errors else "")
        )
    best_config = spaces.trial_config(setup.base, best.best_params or best.params)
    model_id = None
    if register_as and best.best_checkpoint:
        model_id = _record.register_best(
            recorder, register_as, best, best_config, search_id, plan, setup.metric
        )
    return SearchResult(
        best_config=best_config,
        best_metrics=best.best_row,
        best_checkpoint=best.best_checkpoint,
        trials=frame,
        search_id=search_id,
        metric=setup.metric,
        mode=setup.mode,
        best_trial_id=best.trial_id,
        experiment_path=str(results.experiment_path),
        model_id=model_id,
        interrupted=interrupted,
    )
