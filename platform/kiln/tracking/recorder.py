"""RunRecorder: the one writer of run records, for Trainer runs and Tune trials alike.

It runs in the driver only (workers never open the database) and takes plain
values: a run name, a config, parameters, the per-epoch history, checkpoint paths
and a data profile dict. Everything is written after ``fit()`` returns, in a
handful of transactions, so recording costs a run almost nothing
(``benchmarks/bench_tracking.py``: tracking on vs off).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kiln.tracking.experiments import ExperimentDB

logger = logging.getLogger(__name__)

__all__ = ["RunRecorder", "log_history", "numeric_metrics"]

# History keys that are bookkeeping, not metrics.
_NOT_METRICS = ("epoch", "steps", "evals", "timestamp", "global_step")


class RunRecorder:
    """Start, complete or fail run records in one database; register models there.

    Args:
        db_path: the SQLite file (runs, registry, queue).
        artifacts_dir: the content-addressed store registered checkpoints are copied to.
    """

    def __init__(
        self, db_path: str | os.PathLike[str], artifacts_dir: str | os.PathLike[str]
    ) -> None:
        self.db_path, self.artifacts_dir = Path(db_path), Path(artifacts_dir)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        run_name: str,
        config: Mapping[str, Any],
        params: Mapping[str, Any],
        *,
        notes: str | None = None,
        group: str | None = None,
    ) -> int:
        """A new run in state ``running`` with its config and parameters; its id."""
        db = ExperimentDB(self.db_path)
        try:
            db.mark_interrupted_runs()  # runs whose driver was killed are not 'running' forever
            run_id = db.log_run(run_name, dict(config), notes or "", group=group)
            db.log_params(run_id, dict(params))
        finally:
            db.close()
        return run_id

    def run_key(self, run_id: int) -> str:
        """``RUN_NAME@STARTED_AT`` of a recorded run (see ``kiln.tracking.mlflow_export``)."""
        from kiln.tracking.mlflow_export import run_key

        db = ExperimentDB(self.db_path)
        try:
            record = db.get_run(run_id)
        finally:
            db.close()
        return run_key(record["run_name"], record["started_at"])

    def finish(
        self, run_id: int | None, status: str, error: BaseException | str | None = None
    ) -> None:
        """Mark a run ``failed``/``stopped``/``completed`` without further records."""
        if run_id is None:
            return
        db = ExperimentDB(self.db_path)
        try:
            db.finish_run(run_id, status, error=_error_text(error))
        finally:
            db.close()

    def complete(
        self,
        run_id: int,
        status: str,
        history: list[dict[str, Any]],
        checkpoints: Iterable[str] = (),
        profile: Mapping[str, Any] | None = None,
        error: BaseException | str | None = None,
        final_metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the run's per-epoch metrics, checkpoints, alerts and data profile, then its status.

        Alerts raised during training (``alerts`` in history rows) are kept as the run's
        ``alerts`` parameter, so ``kiln runs show`` lists them.
        """
        db = ExperimentDB(self.db_path)
        try:
            log_history(db, run_id, history)
            if final_metrics:  # scored once after the run (e.g. the test split): no epoch
                db.log_metrics(run_id, numeric_metrics(final_metrics))
            alerts = [a for row in history for a in row.get("alerts", [])]
            if alerts:
                db.log_params(run_id, {"alerts": alerts})
            for path in checkpoints:
                db.log_artifact(run_id, "checkpoint", str(path))
            if profile is not None:  # the reference for `kiln models drift`
                db.set_profile(run_id, dict(profile))
            db.finish_run(run_id, status, error=_error_text(error))
        finally:
            db.close()

    def runs_in_group(self, group: str) -> dict[str, int]:
        """``run_name -> run_id`` of the runs already recorded under ``group``."""
        db = ExperimentDB(self.db_path)
        try:
            known = db.list_runs(group=group)
            return {
                str(n): int(i) for n, i in zip(known["run_name"], known["run_id"], strict=False)
            }
        finally:
            db.close()

    def register(
        self,
        name: str,
        checkpoint: str,
        *,
        config: Mapping[str, Any],
        metrics: Mapping[str, Any],
        task_type: str,
        run_id: int | None,
        description: str,
    ) -> Any:
        """Register ``checkpoint`` as the next version of model ``name``; its registry entry
        (``model_id``, ``name``, ``version``, ...)."""
        from kiln.tracking.registry import ModelRegistry

        registry = ModelRegistry(self.db_path, self.artifacts_dir)
        try:
            model_id = registry.register_model(
                name,
                checkpoint,
                config=dict(config),
                metrics=numeric_metrics(metrics),
                task_type=task_type,
                training_run_id=run_id,
                description=description,
            )
            return registry.get_model(model_id=model_id)
        finally:
            registry.close()


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of one history row (bookkeeping keys left out)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def log_history(db: ExperimentDB, run_id: int, history: list[dict[str, Any]]) -> None:
    """Per-epoch scalar metrics (and buffered per-step loss/lr) of one run."""
    for row in history:
        db.log_metrics(run_id, numeric_metrics(row), epoch=int(row["epoch"]))
        for step in row.get("steps", []):
            values = {"step_loss": step["loss"], "step_lr": step["lr"]}
            if "tokens_per_s" in step:
                values["step_tokens_per_s"] = step["tokens_per_s"]
            db.log_metrics(
                run_id,
                values,
                epoch=int(row["epoch"]),
                step=step["step"],
            )
        for ev in row.get("evals", []):  # validations every eval_every_n_steps steps
            db.log_metrics(
                run_id,
                {f"step_{k}": float(v) for k, v in ev.items() if k.startswith("val_")},
                epoch=int(row["epoch"]),
                step=int(ev["step"]),
            )


def _error_text(error: BaseException | str | None) -> str | None:
    if error is None or isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"
