"""Send a finished run's per-epoch metrics to Weights & Biases (``wandb_project``).

The driver does it once per run, after ``fit()`` returns: one ``wandb.init``, one
``wandb.log`` per epoch (``step`` = the epoch), one ``wandb.finish``. Workers never
talk to W&B. ``wandb`` is optional: a config that names a project without it
installed fails validation before training starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kiln.tracking.recorder import numeric_metrics

__all__ = ["log_run_to_wandb"]


def log_run_to_wandb(
    project: str, run_name: str, config: Mapping[str, Any], history: list[dict[str, Any]]
) -> None:
    """One W&B run named ``run_name`` in ``project`` with the run's config and history."""
    import wandb  # type: ignore[import-not-found]

    run = wandb.init(project=project, name=run_name, config=dict(config), reinit=True)
    try:
        for row in history:
            run.log(numeric_metrics(row), step=int(row["epoch"]))
    finally:
        run.finish()
