"""Ray Tune over fine-tuning jobs: each trial is one ``TrainerEngine.run_job``.

    kiln llm tune job.yaml --space llm_space.yaml --samples 4

The space names config fields with dotted keys, in the YAML forms ``kiln tune``
reads (``{loguniform: [lo, hi]}``, ``{choice: [...]}``, a list, ``{grid: [...]}``)::

    hyperparams.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
    model.lora.r: [4, 8, 16]
    tune: {num_samples: 4, metric: val_loss, mode: min}

A trial runs in-process in its Tune actor, so kiln's worker loop reports every
epoch's metrics to Tune: ``scheduler="asha"`` or ``"median"`` stops losing trials
early (``"fifo"``, the default, runs every trial to the end). Its output goes to
``<runs>/llm-tune/<trial id>``; the best trial is chosen among those that finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, TrainingFailedError
from kiln.llm.config import TrainerConfig

__all__ = ["LLMTuneResult", "tune_llm"]

_SCHEDULERS = ("fifo", "asha", "median")


@dataclass
class LLMTuneResult:
    """Every trial's parameters and last metrics, and the best one's output folder."""

    trials: list[dict[str, Any]]
    best_params: dict[str, Any] | None
    best_metric: float | None
    best_output_dir: str | None
    metric: str


def _run_trial(params: dict[str, Any], *, base: TrainerConfig, root: str, paths: Any) -> None:
    from ray import tune

    from kiln.llm.engine import TrainerEngine

    trial_id = tune.get_context().get_trial_id()
    config = base.with_overrides(
        {
            **params,
            "output.output_dir": str(Path(root) / trial_id),
            "output.run_name": f"llm-tune-{trial_id}",
            "environment.num_workers": 0,  # in the trial's actor: reports go to Tune
        }
    )
    result = TrainerEngine(paths=paths).run_job(config)
    if not result.success:
        raise TrainingFailedError(f"trial {trial_id}: {result.error}")


def tune_llm(
    config: TrainerConfig,
    space: dict[str, Any],
    *,
    num_samples: int = 4,
    metric: str | None = None,
    mode: str = "min",
    paths: Any = None,
    seed: int | None = 0,
    max_concurrent_trials: int | None = 1,
    scheduler: str = "fifo",
) -> LLMTuneResult:
    """Search ``space`` (dotted config keys -> domains) around ``config``."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from kiln._ray import ensure_ray
    from kiln.llm.config import ConfigLoader
    from kiln.paths import RunPaths
    from kiln.tune.schedulers import create_scheduler
    from kiln.tune.spaces import candidate_values, parse_space

    parsed = parse_space(space)
    metric = metric or ("val_loss" if config.monitoring.validation_split > 0 else "train_loss")
    errors: list[str] = []
    for key, domain in parsed.items():
        for value in candidate_values(domain) or []:
            try:
                config.with_overrides({key: value})
            except ConfigError as exc:
                errors.extend(f"space {key!r}={value!r}: {e}" for e in exc.errors)
    if mode not in ("min", "max"):
        errors.append(f"mode={mode!r} must be 'min' or 'max'")
    if scheduler not in _SCHEDULERS:
        errors.append(
            f"scheduler={scheduler!r} is not one of {', '.join(_SCHEDULERS)} for fine-tuning "
            "trials (pbt needs a checkpoint handed to Tune every epoch, which they do not do)"
        )
    if errors:
        raise ConfigError(errors)
    ConfigLoader.validate_locked_config(config)
    paths = paths or RunPaths.resolve()
    root = paths.runs / "llm-tune"
    ensure_ray()
    trainable = tune.with_parameters(_run_trial, base=config, root=str(root), paths=paths)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=dict(parsed),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=num_samples,
            search_alg=BasicVariantGenerator(random_state=seed) if seed is not None else None,
            max_concurrent_trials=max_concurrent_trials,
            # max_t past the last epoch: a scheduler stops a trial for losing, never for
            # reaching max_t, which would end it before its job saves the model
            scheduler=create_scheduler(scheduler, max_t=config.hyperparams.num_epochs + 1),
        ),
        run_config=tune.RunConfig(storage_path=str(paths.tune), verbose=0),
    )
    results = tuner.fit()
    trials: list[dict[str, Any]] = []
    for r in (results[i] for i in range(len(results))):
        row = {"params": dict(r.config or {}), "error": str(r.error) if r.error else None}
        row[metric] = (r.metrics or {}).get(metric)
        row["output_dir"] = str(root / r.metrics["trial_id"]) if r.metrics else None
        trials.append(row)
    finished = [t for t in trials if t["output_dir"] and Path(t["output_dir"]).is_dir()]
    scored = [t for t in finished if isinstance(t[metric], (int, float))]
    best = (min if mode == "min" else max)(scored, key=lambda t: t[metric]) if scored else None
    return LLMTuneResult(
        trials=trials,
        best_params=best["params"] if best else None,
        best_metric=best[metric] if best else None,
        best_output_dir=best["output_dir"] if best else None,
        metric=metric,
    )
