"""What each job type runs, inside the job's own process (a child or a Ray job's driver).

Every handler takes the job's validated config and kiln's paths and returns
``(result, details)``: ``result`` is the short answer stored on the job row (a run
name, a bundle path, a model reference), ``details`` a JSON-able dict.

- ``training``: a :class:`~kiln.engine.trainer.Trainer` run from the run mapping; the
  result is the run's name (``kiln runs show NAME``).
- ``evaluation``: loss and accuracy of a registered model on a dataset, the model
  rebuilt from its registered checkpoint.
- ``export``: an export bundle of a registered model.
- ``retraining``: the closed loop (:mod:`kiln.queue.retraining`); given a training
  config instead of a registered model, a training run of it.
- ``noop``: sleeps ``seconds`` and succeeds (or fails when ``fail`` is set).
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import DatasetError, KilnError
from kiln.paths import RunPaths
from kiln.queue.jobs import JobType

__all__ = ["HANDLERS", "evaluate_arrays", "load_arrays", "load_registered"]

Handler = Callable[[dict[str, Any], RunPaths, int], tuple[str | None, dict[str, Any]]]


def run_training(config: dict[str, Any], paths: RunPaths, job_id: int) -> tuple[str, dict]:
    from kiln.cli.train import load_run_mapping
    from kiln.engine.trainer import Trainer

    cfg, task = load_run_mapping(config, source=f"job {job_id}")
    if not cfg.notes:
        cfg = cfg.replace(notes=f"queued job {job_id}")
    trainer = Trainer(training_config=cfg, task_spec=task, paths=paths)  # logs each epoch
    results = trainer.train()
    keep = (
        "run_id", "model_id", "registered", "best_epoch", "best_val_loss", "test_metrics",
        "checkpoint_path", "run_dir",
    )  # fmt: skip
    details = {k: results.get(k) for k in keep}
    details["final_metrics"] = _scalars(results.get("final_metrics", {}))
    return results["run_name"], details


def run_evaluation(config: dict[str, Any], paths: RunPaths, job_id: int) -> tuple[str, dict]:
    model, meta, entry = load_registered(config["model"], paths)
    x, y = load_arrays(config["dataset"], paths)
    metrics = evaluate_arrays(model, meta, x, y, batch_size=int(config.get("batch_size", 512)))
    details = {"model": entry.ref, "model_id": entry.model_id, "dataset": config["dataset"]}
    details["metrics"] = metrics
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "rows")
    return f"{entry.ref} on {config['dataset']}: {shown}", details


def run_export(config: dict[str, Any], paths: RunPaths, job_id: int) -> tuple[str, dict]:
    from kiln.export import export_checkpoint, registered_checkpoint

    checkpoint, entry = registered_checkpoint(config["model"], paths.db, paths.artifacts)
    out = Path(config.get("output") or paths.bundles / f"{entry.name}-{entry.version}-job{job_id}")
    out = out.expanduser().resolve()
    bundle = export_checkpoint(
        checkpoint,
        out.parent,
        config.get("formats", "onnx,pytorch"),
        bundle_name=out.name,
        overwrite=True,
    )
    return str(bundle), {"model": entry.ref, "model_id": entry.model_id}


def run_retraining(config: dict[str, Any], paths: RunPaths, job_id: int) -> tuple[str, dict]:
    from kiln.queue.retraining import retrain
    from kiln.queue.validation import retrains_registered_model

    if not retrains_registered_model(config):  # a training config: a fresh run of it
        return run_training(config, paths, job_id)
    return retrain(config, paths, job_id)


def run_noop(config: dict[str, Any], paths: RunPaths, job_id: int) -> tuple[str | None, dict]:
    seconds = float(config.get("seconds", 0))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # short sleeps: a stop signal lands promptly
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    if config.get("fail"):
        raise KilnError(f"noop job {job_id} failed on purpose (config.fail={config['fail']!r})")
    return config.get("result", "ok"), {"slept_s": seconds}


HANDLERS: dict[JobType, Handler] = {
    JobType.TRAINING: run_training,
    JobType.EVALUATION: run_evaluation,
    JobType.EXPORT: run_export,
    JobType.RETRAINING: run_retraining,
    JobType.NOOP: run_noop,
}


# -- shared pieces ------------------------------------------------------------------------


def load_registered(ref: str, paths: RunPaths) -> tuple[Any, dict[str, Any], Any]:
    """``(model, checkpoint metadata, registry entry)`` for ``NAME@TAG`` / ``NAME:VERSION``."""
    from kiln.export import load_checkpoint_model, registered_checkpoint

    checkpoint, entry = registered_checkpoint(ref, paths.db, paths.artifacts)
    model, meta = load_checkpoint_model(checkpoint)
    return model, meta, entry


def load_arrays(source: str, paths: RunPaths) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a dataset id, a file or folder, or a glob of files, read without Ray."""
    from kiln.data import ArrayDataset, get_dataset

    if any(c in source for c in "*?["):
        files = sorted(glob.glob(str(Path(source).expanduser())))
        if not files:
            raise DatasetError(f"data={source!r} matches no file")
    else:
        files = [source]
    xs, ys = [], []
    for item in files:
        data = get_dataset(item, data_dir=paths.datasets / item)
        if isinstance(data, ArrayDataset):
            xs.append(np.asarray(data.x))
            ys.append(np.asarray(data.y))
        elif hasattr(data, "local_arrays"):
            x, y = data.local_arrays()
            xs.append(x)
            ys.append(y)
        else:
            raise DatasetError(f"{item!r}: cannot read it as arrays ({type(data).__name__})")
    return np.concatenate(xs), np.concatenate(ys)


def evaluate_arrays(
    model: Any, meta: dict[str, Any], x: np.ndarray, y: np.ndarray, batch_size: int = 512
) -> dict[str, float]:
    """Loss and the task's scalar metrics of ``model`` on ``(x, y)`` (as ``kiln eval``
    computes them: accuracy and macro P/R/F1, or MAE/RMSE/R²), plus ``rows``."""
    from kiln.predict.evaluation import score_arrays

    if len(x) == 0:
        raise DatasetError("cannot evaluate on an empty dataset")
    values = score_arrays(model, meta, x, y, batch_size=batch_size)
    metrics = _scalars({k: v for k, v in values.items() if k != "num_rows"})
    metrics["rows"] = float(values["num_rows"])
    return metrics


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
