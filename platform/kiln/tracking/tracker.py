"""MetricsTracker: per-epoch and per-step metrics with a summary.

Backed by an :class:`~kiln.tracking.experiments.ExperimentDB` run when one is given
(the same store the Trainer writes, not a second one), in memory otherwise.

Epoch metrics are flattened to one name each: ``train_metrics={"loss": ...}`` becomes
``train_loss``, ``val_metrics={"accuracy": ...}`` becomes ``val_accuracy``; the learning
rate and gradient norm are ``learning_rate`` and ``gradient_norm``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from kiln.errors import ConfigError
from kiln.tracking.experiments import ExperimentDB

__all__ = ["MetricsSummary", "MetricsTracker", "flatten_epoch_metrics", "metric_mode"]

_MIN_IS_BETTER = re.compile(r"loss|err|perplexity|mse|mae|rmse|divergence|time|duration", re.I)


def metric_mode(name: str) -> str:
    """``"min"`` for loss-like names (loss, error, perplexity...), else ``"max"``."""
    return "min" if _MIN_IS_BETTER.search(name) else "max"


def flatten_epoch_metrics(
    train_metrics: Mapping[str, float] | None = None,
    val_metrics: Mapping[str, float] | None = None,
    **scalars: float | None,
) -> dict[str, float]:
    """``{"train_loss": .., "val_loss": .., <scalar name>: ..}``; None scalars are dropped."""
    out = {f"train_{k}": float(v) for k, v in (train_metrics or {}).items()}
    out.update({f"val_{k}": float(v) for k, v in (val_metrics or {}).items()})
    out.update({k: float(v) for k, v in scalars.items() if v is not None})
    return out


class MetricsSummary(dict):
    """``{metric: {"last", "min", "max", "mean", "count", "best", "best_epoch", "mode"}}``.

    Indexing with a list of columns (``summary[["epoch", "train_loss"]]``) selects from
    :attr:`history`, the per-epoch DataFrame.
    """

    def __init__(self, stats: dict[str, dict[str, Any]], history: pd.DataFrame) -> None:
        super().__init__(stats)
        self.history = history

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, list):
            return self.history[key]
        return super().__getitem__(key)


class MetricsTracker:
    """Records metrics and summarises them.

    Args:
        db: Store rows in this run of an ExperimentDB (with ``run_id``); in memory if None.
        run_id: The run the rows belong to (required with ``db``).
        use_wandb: Also send every row to Weights & Biases (needs ``wandb`` installed).
            The first row joins the active W&B run, or starts one in ``wandb_project``;
            :meth:`close` finishes a run the tracker started.
        wandb_project: The W&B project of a run the tracker starts (W&B's default if None).
        modes: ``{"metric": "min"|"max"}`` overriding :func:`metric_mode` for "best".
    """

    def __init__(
        self,
        db: ExperimentDB | None = None,
        run_id: int | None = None,
        use_wandb: bool = False,
        modes: Mapping[str, str] | None = None,
        wandb_project: str | None = None,
    ) -> None:
        if (db is None) != (run_id is None):
            raise ConfigError(
                f"db and run_id go together; got db={db!r}, run_id={run_id!r} "
                f"(create the run with db.log_run(...) first)"
            )
        self.db, self.run_id = db, run_id
        self.modes = dict(modes or {})
        for name, mode in self.modes.items():
            if mode not in ("min", "max"):
                raise ConfigError(f"modes[{name!r}]={mode!r} is not allowed; use 'min' or 'max'")
        self._rows: list[dict[str, Any]] = []
        self._step = 0
        self._wandb = _import_wandb() if use_wandb else None
        self.wandb_project = wandb_project
        self._wandb_run: Any = None
        self._started_wandb_run = False

    def update(
        self, metrics: Mapping[str, float], step: int | None = None, epoch: int | None = None
    ) -> None:
        """Record ``metrics`` at ``step`` (the next step when None) and optional epoch."""
        step = self._step if step is None and epoch is None else step
        if step is not None:
            self._step = step + 1
        values = {str(k): float(v) for k, v in metrics.items()}
        if self.db is not None:
            self.db.log_metrics(self.run_id, values, epoch=epoch, step=step)  # type: ignore[arg-type]
        else:
            self._rows.extend(
                {"name": k, "value": v, "epoch": epoch, "step": step} for k, v in values.items()
            )
        if self._wandb is not None:
            self._run().log(
                {**values, **({"epoch": epoch} if epoch is not None else {})}, step=step
            )

    def _run(self) -> Any:
        """The W&B run rows go to: the active one, else one started here (once)."""
        assert self._wandb is not None  # only called when use_wandb=True
        if self._wandb_run is None:
            self._wandb_run = self._wandb.run
            if self._wandb_run is None:
                self._wandb_run = self._wandb.init(project=self.wandb_project)
                self._started_wandb_run = True
        return self._wandb_run

    def close(self) -> None:
        """Finish the W&B run this tracker started, if any."""
        if self._started_wandb_run and self._wandb_run is not None:
            self._wandb_run.finish()
        self._wandb_run, self._started_wandb_run = None, False

    @property
    def current_step(self) -> int:
        """The step the next ``update`` without ``step`` records at."""
        return self._step

    @property
    def metrics(self) -> dict[str, list[tuple[int | None, float]]]:
        """``{name: [(step, value), ...]}`` in recording order."""
        out: dict[str, list[tuple[int | None, float]]] = {}
        for row in self.rows().itertuples(index=False):
            step = None if pd.isna(row.step) else int(row.step)
            out.setdefault(str(row.name), []).append((step, float(row.value)))
        return out

    def log_epoch(
        self,
        epoch: int,
        train_metrics: Mapping[str, float] | None = None,
        val_metrics: Mapping[str, float] | None = None,
        learning_rate: float | None = None,
        gradient_norm: float | None = None,
        epoch_duration: float | None = None,
        **extra: float,
    ) -> dict[str, float]:
        """Record one epoch (names flattened as in the module docstring); return the row."""
        row = flatten_epoch_metrics(
            train_metrics,
            val_metrics,
            learning_rate=learning_rate,
            gradient_norm=gradient_norm,
            epoch_duration=epoch_duration,
            **extra,
        )
        self.update(row, epoch=epoch)
        return row

    def rows(self) -> pd.DataFrame:
        """Every recorded value: name, value, epoch, step."""
        if self.db is not None:
            df = self.db.get_metrics(self.run_id)  # type: ignore[arg-type]
            return df[["name", "value", "epoch", "step"]]
        return pd.DataFrame(self._rows, columns=["name", "value", "epoch", "step"])

    def history(self) -> pd.DataFrame:
        """One row per epoch, one column per epoch metric (``epoch`` first)."""
        df = self.rows()
        df = df[df["epoch"].notna()].astype({"epoch": "int64"})
        if df.empty:
            return pd.DataFrame(columns=["epoch"])
        wide = df.pivot_table(index="epoch", columns="name", values="value", aggfunc="last")
        wide = wide.reset_index()
        wide.columns.name = None
        return wide

    def get_summary(self) -> MetricsSummary:
        """Per metric: last, min, max, mean, count, best (by its mode) and best_epoch."""
        df = self.rows()
        stats: dict[str, dict[str, Any]] = {}
        for name, group in df.groupby("name", sort=True):
            values = group["value"].astype(float)
            valid = group[values.notna()]
            mode = self.modes.get(str(name), metric_mode(str(name)))
            best_epoch = best = None
            if not valid.empty:
                idx = valid["value"].idxmin() if mode == "min" else valid["value"].idxmax()
                best = float(valid.loc[idx, "value"])
                epoch = valid.loc[idx, "epoch"]
                best_epoch = None if pd.isna(epoch) else int(epoch)
            stats[str(name)] = {
                "last": float(values.iloc[-1]),
                "min": float(values.min()) if not valid.empty else math.nan,
                "max": float(values.max()) if not valid.empty else math.nan,
                "mean": float(values.mean()) if not valid.empty else math.nan,
                "count": int(len(values)),
                "best": best,
                "best_epoch": best_epoch,
                "mode": mode,
            }
        return MetricsSummary(stats, self.history())


def _import_wandb() -> Any:
    try:
        import wandb  # type: ignore[import-not-found]
    except ImportError:
        from kiln.errors import KilnError

        raise KilnError(
            "use_wandb=True needs the `wandb` package, which is not installed; "
            "`pip install wandb` or pass use_wandb=False (runs are still recorded in kiln.db)"
        ) from None
    return wandb
