"""Job configs checked when a job is submitted (or a schedule created), not when it runs.

Each job type's config is normalised into the mapping the job runs from and checked
whole: every problem is collected into one :class:`~kiln.errors.ConfigError`.

- ``training``: what a ``kiln train`` run file holds (a mapping, or the path of the
  file), or ``{"training_config": {...}, "task": {...}}``; it must build a
  ``TrainingConfig`` (and ``TaskSpec``).
- ``evaluation``: ``{"model": "NAME@TAG", "dataset": ID_OR_PATH}``.
- ``export``: ``{"model": "NAME@TAG", "formats": "onnx,pytorch", "output": DIR}``.
- ``retraining``: ``{"model": "NAME@TAG", "data": GLOB, "holdout": PATH, "trigger": {...},
  "margin": 0.0, "epochs": N, "warm_start": false}``. The data need not exist yet (a schedule names tomorrow's files);
  the job checks it when it runs. Or ``{"training_config": {...}}`` (a training job's
  config): the run is trained afresh from it, e.g. on a dataset file that is refreshed
  between fires.
- ``noop``: ``{"seconds": 0, "fail": false}``.

Model references must exist in the registry at submit time.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, KilnError
from kiln.paths import RunPaths
from kiln.queue.jobs import JobType
from kiln.queue.triggers import RetrainingTrigger

__all__ = ["validate_job_config", "validate_priority"]

_KEYS = {
    JobType.EVALUATION: {"model", "dataset", "batch_size"},
    JobType.EXPORT: {"model", "formats", "output"},
    JobType.RETRAINING: {
        "model",
        "data",
        "holdout",
        "trigger",
        "margin",
        "epochs",
        "tag",
        "warm_start",
    },
    JobType.NOOP: {"seconds", "fail", "result"},
}
_TRIGGER_KEYS = set(inspect.signature(RetrainingTrigger).parameters)


def validate_priority(priority: Any) -> list[str]:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 10:
        return [f"priority={priority!r} must be an integer from 1 (least urgent) to 10 (most)"]
    return []


def validate_job_config(job_type: JobType, config: Any, paths: RunPaths) -> dict[str, Any]:
    """The config a job of ``job_type`` runs from; raises ConfigError listing every problem."""
    if job_type is JobType.TRAINING or _retrains_from_config(job_type, config):
        return _training(config)
    if not isinstance(config, dict):
        raise ConfigError(
            f"config of a {job_type.value} job must be a mapping; got {type(config).__name__}"
        )
    config = dict(config)
    errors = [
        f"config.{k}: unknown key for a {job_type.value} job; known keys: "
        f"{', '.join(sorted(_KEYS[job_type]))}"
        for k in config
        if k not in _KEYS[job_type]
    ]
    if job_type.needs_model:
        errors.extend(_model_errors(config.get("model"), paths))
    if job_type is JobType.EVALUATION:
        errors.extend(_dataset_errors(config.get("dataset"), paths))
    elif job_type is JobType.EXPORT:
        errors.extend(_format_errors(config.get("formats", "onnx,pytorch")))
    elif job_type is JobType.RETRAINING:
        errors.extend(_retraining_errors(config))
    elif job_type is JobType.NOOP:
        seconds = config.get("seconds", 0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            errors.append(f"config.seconds={seconds!r} must be a number >= 0")
    if errors:
        raise ConfigError(errors)
    return config


def _retrains_from_config(job_type: JobType, config: Any) -> bool:
    """A retraining job given a training job's config (no registered model to gate)."""
    return (
        job_type is JobType.RETRAINING and isinstance(config, dict) and "training_config" in config
    )


def retrains_registered_model(config: dict[str, Any]) -> bool:
    """True for the closed loop's config (``model: NAME@TAG``), False for a run mapping
    (whose ``model``, if any, is an architecture)."""
    return isinstance(config.get("model"), str)


def _training(config: Any) -> dict[str, Any]:
    from kiln.cli.train import load_run_mapping
    from kiln.config import read_mapping

    source = "config"
    if isinstance(config, (str, os.PathLike)):
        source = str(config)
        config = read_mapping(Path(config))
    if not isinstance(config, dict):
        raise ConfigError(
            f"config of a training job must be a run-file mapping or its path; got "
            f"{type(config).__name__}"
        )
    raw = dict(config)
    if "training_config" in raw:  # {'training_config': cfg.to_dict(), 'task': {...}}
        extra = sorted(set(raw) - {"training_config", "task", "task_spec"})
        if extra:
            raise ConfigError(
                f"config: keys {extra} next to 'training_config'; allowed beside it: task"
            )
        inner = raw["training_config"]
        if not isinstance(inner, dict):
            raise ConfigError(f"config.training_config={inner!r} must be a mapping")
        task = raw.get("task", raw.get("task_spec"))
        raw = {**inner, **({"task": task} if task is not None else {})}
    load_run_mapping(raw, source=source)  # raises ConfigError naming each bad field
    return raw


def _model_errors(ref: Any, paths: RunPaths) -> list[str]:
    if not isinstance(ref, str) or not ref:
        return [f"config.model={ref!r} must name a registered model: NAME@TAG or NAME:VERSION"]
    from kiln.tracking.registry import ModelRegistry

    registry = ModelRegistry(paths.db, paths.artifacts)
    try:
        registry.resolve(ref)
    except KilnError as exc:
        return [f"config.model={ref!r}: {exc}"]
    finally:
        registry.close()
    return []


def _dataset_errors(dataset: Any, paths: RunPaths) -> list[str]:
    from kiln.data import dataset_ids

    if not isinstance(dataset, str) or not dataset:
        return [f"config.dataset={dataset!r} must be a dataset id or a local file path"]
    if dataset in dataset_ids() or Path(dataset).expanduser().exists():
        return []
    return [
        f"config.dataset={dataset!r} is neither a dataset id ({', '.join(dataset_ids())}) "
        "nor an existing file or folder"
    ]


def _format_errors(formats: Any) -> list[str]:
    from kiln.config.training import EXPORT_FORMATS

    names = formats.split(",") if isinstance(formats, str) else formats
    if not isinstance(names, (list, tuple)):
        return [f"config.formats={formats!r} must be a comma-separated string or a list"]
    bad = [f for f in names if f not in EXPORT_FORMATS]
    if bad or not names:
        return [f"config.formats={formats!r}: unknown {bad}; use {', '.join(EXPORT_FORMATS)}"]
    return []


def _retraining_errors(config: dict[str, Any]) -> list[str]:
    errors = []
    for key in ("data", "holdout"):
        value = config.get(key)
        if not isinstance(value, str) or not value:
            errors.append(f"config.{key}={value!r} must be a path or glob of data files")
    model = config.get("model")
    if isinstance(model, str) and "@" not in model and "tag" not in config:
        errors.append(
            f"config.model={model!r} has no tag to promote to; use NAME@TAG or give config.tag"
        )
    margin = config.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
        errors.append(f"config.margin={margin!r} must be a number >= 0")
    trigger = config.get("trigger", {})
    if not isinstance(trigger, dict):
        return [*errors, f"config.trigger={trigger!r} must be a mapping of trigger settings"]
    unknown = sorted(set(trigger) - _TRIGGER_KEYS)
    if unknown:
        errors.append(f"config.trigger: unknown keys {unknown}; known: {sorted(_TRIGGER_KEYS)}")
    else:
        try:
            RetrainingTrigger(**trigger)
        except ConfigError as exc:
            errors.extend(f"config.trigger.{e}" for e in exc.errors)
    return errors
