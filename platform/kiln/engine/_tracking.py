"""RunTracker: records a Trainer run in the ExperimentDB and registers its model.

Runs in the driver only (workers never open the database). Everything is written
after ``fit()`` returns, in a handful of transactions, so tracking costs a run almost
nothing (benchmarks/: tracking on vs off).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PROFILE_SAMPLE_ROWS = 2048


class RunTracker:
    """Start, complete or fail one run record; register the best checkpoint if asked."""

    def __init__(self, db_path: Path, artifacts_dir: Path, *, record: bool = True) -> None:
        self.db_path, self.artifacts_dir, self.record = Path(db_path), Path(artifacts_dir), record
        self.db_path.parent.mkdir(parents=True, exist_ok=True)

    def _db(self):
        from kiln.tracking import ExperimentDB

        return ExperimentDB(self.db_path)

    def start(
        self, run_name: str, cfg: Any, plan: Any, resume: str | None, *, group: str | None = None
    ) -> int | None:
        if not self.record:
            return None
        from kiln.tracking import collect_environment

        db = self._db()
        try:
            run_id = db.log_run(run_name, cfg.to_dict(), cfg.notes, group=group)
            db.log_params(
                run_id,
                {
                    "random_seed": cfg.random_seed,
                    "dataset": plan.dataset_id,
                    "task": plan.task.to_dict(),
                    "num_workers": cfg.num_workers,
                    "resumed_from": resume,
                    **collect_environment(),
                },
            )
        finally:
            db.close()
        return run_id

    def finish(self, run_id: int | None, status: str, error: BaseException | None = None) -> None:
        if run_id is None:
            return
        db = self._db()
        try:
            db.finish_run(
                run_id, status, error=f"{type(error).__name__}: {error}" if error else None
            )
        finally:
            db.close()

    def complete(
        self, run_id: int | None, results: dict[str, Any], cfg: Any, plan: Any, model: Any = None
    ) -> int | None:
        """Write per-epoch metrics, checkpoints and the data profile; register if asked."""
        if run_id is not None:
            db = self._db()
            try:
                log_history(db, run_id, results["history"])
                for path in results["checkpoints"]:
                    db.log_artifact(run_id, "checkpoint", path)
                profile = data_profile(plan, model)
                if profile is not None:
                    db.set_profile(run_id, profile)
                status = "stopped" if results["stopped_early"] else "completed"
                db.finish_run(run_id, status)
            finally:
                db.close()
        if not cfg.register_as or not results.get("checkpoint_path"):
            return None
        from kiln.tracking import ModelRegistry

        registry = ModelRegistry(self.db_path, self.artifacts_dir)
        try:
            final = {
                k: float(v)
                for k, v in results["final_metrics"].items()
                if isinstance(v, (int, float)) and k not in ("epoch", "timestamp", "global_step")
            }
            return registry.register_model(
                cfg.register_as,
                results["checkpoint_path"],
                config=cfg.to_dict(),
                metrics=final,
                task_type=plan.task.task_type,
                training_run_id=run_id,
                description=f"run {results['run_name']}, best epoch {results['best_epoch']}",
            )
        finally:
            registry.close()


def log_history(db: Any, run_id: int, history: list[dict[str, Any]]) -> None:
    """Per-epoch scalar metrics (and buffered per-step loss/lr) of one run."""
    for row in history:
        scalars = {
            k: float(v)
            for k, v in row.items()
            if k not in ("epoch", "steps", "timestamp")
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        }
        db.log_metrics(run_id, scalars, epoch=int(row["epoch"]))
        for step in row.get("steps", []):
            db.log_metrics(
                run_id,
                {"step_loss": step["loss"], "step_lr": step["lr"]},
                epoch=int(row["epoch"]),
                step=step["step"],
            )


def data_profile(plan: Any, model: Any = None) -> dict[str, Any] | None:
    """Histograms of the training inputs (and the model's predictions) for drift checks."""
    try:
        from kiln.tracking.drift import compute_profile

        if plan.arrays:
            x = np.asarray(plan.arrays["train"][0][:PROFILE_SAMPLE_ROWS])
        elif plan.datasets:
            batch = plan.datasets["train"].take_batch(PROFILE_SAMPLE_ROWS, batch_format="numpy")
            x = np.asarray(batch[plan.task.input_column])
        else:
            return None
        predictions = None
        if model is not None and x.dtype.kind == "f":
            import torch

            model.eval()
            with torch.no_grad():
                logits = model(torch.as_tensor(x))
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            predictions = (
                logits.argmax(-1).numpy() if plan.task.is_classification else logits.numpy()
            )
        return compute_profile(x, predictions=predictions)
    except Exception:  # a profile is a convenience; never fail a finished run over it
        logger.warning("could not compute the data profile", exc_info=True)
        return None
