"""After a search, in the driver: read the trials back, record them, register the winner.

Trials never open the database (DESIGN: only the driver writes SQLite). Everything
here reads Tune's experiment state and each trial's kiln checkpoint directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kiln.config import TrainingConfig
from kiln.config.modes import MetricMode
from kiln.errors import CheckpointError, ConfigError
from kiln.tracking.recorder import RunRecorder

# Tune's bookkeeping columns, not metrics of the run.
_TUNE_COLUMNS = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "should_checkpoint",
}  # fmt: skip


@dataclass
class TrialRecord:
    """One trial as the driver sees it after the search."""

    trial_id: str
    params: dict[str, Any]
    config: TrainingConfig | None
    history: list[dict[str, Any]]
    status: str  # completed | stopped | failed | unfinished
    error: str | None = None
    best_row: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: str | None = None
    latest_checkpoint: str | None = None
    run_id: int | None = None
    seconds: float | None = None
    restored_from: list[str] = field(default_factory=list)  # PBT donors, in order
    best_params: dict[str, Any] | None = None  # params when best_row was reported (PBT)

    @property
    def epochs(self) -> int:
        return max((int(r["epoch"]) for r in self.history if "epoch" in r), default=0)


def collect_trials(results: Any, setup: Any, space: dict[str, Any]) -> list[TrialRecord]:
    """Every trial of the finished (or interrupted) search, with status and history."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    from kiln.engine.checkpoint import resolve_checkpoint

    analysis = ExperimentAnalysis(str(results.experiment_path))
    frames = analysis.trial_dataframes
    errors = {str(r.path): r.error for r in results if r.error is not None}
    out = []
    for trial in analysis.trials:
        params = dict(trial.config)
        try:
            cfg = _trial_config(setup.base, params)
        except ConfigError:
            cfg = None
        df = frames.get(trial.trial_id)
        history = _history(df)
        scored = [r for r in history if _finite(r.get(setup.metric))]
        best = MetricMode(setup.mode).best(scored, key=lambda r: r[setup.metric]) or {}
        trial_dir = Path(setup.trials_dir) / trial.trial_id
        ckpt_dir = trial_dir / "checkpoints"
        record = TrialRecord(
            trial_id=trial.trial_id,
            params=params,
            config=cfg,
            history=history,
            status="unfinished",
            best_row=best,
            best_checkpoint=_resolve(resolve_checkpoint, "best", ckpt_dir),
            latest_checkpoint=_resolve(resolve_checkpoint, "latest", ckpt_dir),
            seconds=_last(df, "time_total_s"),
            restored_from=_restores(trial_dir),
        )
        if getattr(setup, "report_checkpoints", False) and best:  # PBT changes params
            record.best_params = _params_at(params, _config_at(df, best["epoch"]))
        if trial.status == Trial.ERROR:
            record.status = "failed"
            error = errors.get(str(trial.path))
            record.error = f"{type(error).__name__}: {error}" if error else "trial failed"
        elif trial.status == Trial.TERMINATED:
            done = cfg is not None and record.epochs >= cfg.epochs
            record.status = "completed" if done else "stopped"
        out.append(record)
    return out


def best_trial(trials: list[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    scored = [t for t in trials if _finite(t.best_row.get(metric))]
    return MetricMode(mode).best(scored, key=lambda t: t.best_row[metric])


def trials_frame(trials: list[TrialRecord], keys: list[str], metric: str) -> pd.DataFrame:
    """One row per trial: id, searched params, epochs, final/best metric, status, ..."""
    rows = []
    for t in trials:
        final = t.history[-1].get(metric) if t.history else None
        rows.append(
            {
                "trial_id": t.trial_id,
                **{k: t.params.get(k) for k in keys},
                "epochs": t.epochs,
                "max_epochs": t.config.epochs if t.config else None,
                f"final_{metric}": final,
                f"best_{metric}": t.best_row.get(metric),
                "status": t.status,
                "stopped_early": t.status == "stopped",
                "restored_from": list(t.restored_from),
                "run_id": t.run_id,
                "error": t.error,
            }
        )
    return pd.DataFrame(rows)


def record_trials(
    recorder: RunRecorder, search_id: str, trials: list[TrialRecord], plan: Any
) -> None:
    """One run per finished trial, grouped under ``search_id`` (already recorded ones kept)."""
    from kiln.engine.data_plan import data_profile

    profile = data_profile(plan)  # the trials share their training data: profile it once
    existing = recorder.runs_in_group(search_id)
    for t in trials:
        name = f"{search_id}/{t.trial_id}"
        if name in existing:
            t.run_id = existing[name]
            continue
        if t.status == "unfinished" or t.config is None:
            continue
        cfg = t.config
        params = {
            "search_id": search_id,
            "trial_id": t.trial_id,
            "trial_params": t.params,
            "random_seed": cfg.random_seed,
            "dataset": plan.dataset_id,
            "task": plan.task.to_dict(),
            "num_workers": cfg.num_workers,
            "trial_seconds": t.seconds,
            "restored_from": list(t.restored_from),
        }
        t.run_id = recorder.start(name, cfg.to_dict(), params, notes=cfg.notes, group=search_id)
        checkpoints = sorted(p for p in {t.best_checkpoint, t.latest_checkpoint} if p)
        # the profile too, so `kiln models drift` works for a tuned model
        recorder.complete(t.run_id, t.status, t.history, checkpoints, profile, error=t.error)


def register_best(
    recorder: RunRecorder,
    name: str,
    best: TrialRecord,
    config: TrainingConfig,
    search_id: str,
    plan: Any,
    metric: str,
) -> int:
    """Register the winner's best checkpoint; the search id goes into its description."""
    value = best.best_row.get(metric)
    metrics = {
        k: v for k, v in best.best_row.items() if k.startswith(("train_", "val_")) and _finite(v)
    }
    entry = recorder.register(
        name,
        str(best.best_checkpoint),
        config=config.to_dict(),
        metrics=metrics,
        task_type=plan.task.task_type,
        run_id=best.run_id,
        description=(
            f"tune search {search_id}: best trial {best.trial_id} "
            f"({metric}={value:.6g} at epoch {best.best_row.get('epoch')})"
        ),
    )
    return int(entry.model_id)


def _trial_config(base: TrainingConfig, params: dict[str, Any]) -> TrainingConfig:
    from kiln.tune.spaces import trial_config

    return trial_config(base, params)


def _history(df: pd.DataFrame | None) -> list[dict[str, Any]]:
    if df is None or df.empty or "epoch" not in df.columns:
        return []
    keep = [c for c in df.columns if c not in _TUNE_COLUMNS and not c.startswith("config/")]
    rows = df[keep].to_dict("records")
    by_epoch: dict[int, dict[str, Any]] = {}
    for row in rows:  # a restarted trial may report an epoch twice; keep the last
        if _finite(row.get("epoch")):
            by_epoch[int(row["epoch"])] = {k: v for k, v in row.items() if not _is_nan(v)}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _config_at(df: pd.DataFrame | None, epoch: Any) -> dict[str, Any]:
    """The ``config/*`` columns of the last row reported for ``epoch`` (as _history keeps)."""
    if df is None or df.empty or "epoch" not in df.columns:
        return {}
    rows = df[df["epoch"] == epoch]
    if rows.empty:
        return {}
    row = rows.iloc[-1]
    return {c[len("config/") :]: row[c] for c in df.columns if c.startswith("config/")}


def _params_at(params: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the scalar values the trial had when it reported ``config``.

    Tune's progress table holds the config of every report; lists and mappings come
    back from it as text, so only numbers and strings are taken from it.
    """
    out = dict(params)
    for key, now in params.items():
        value: Any = config.get(key)
        if value is not None and hasattr(value, "item"):
            value = value.item()  # numpy scalars from the table
        if isinstance(now, bool) or not isinstance(now, (int, float, str)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or _is_nan(value):
            continue
        try:
            out[key] = type(now)(value)
        except (TypeError, ValueError):
            continue
    return out


def _restores(trial_dir: Path) -> list[str]:
    """Trials whose checkpoints this trial took over (PBT), from the trial's restores file."""
    from kiln.tune.trial import RESTORES_FILE

    path = trial_dir / RESTORES_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(str(json.loads(line)["from_trial"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return out


def _last(df: pd.DataFrame | None, column: str) -> float | None:
    if df is None or df.empty or column not in df.columns:
        return None
    value = df[column].iloc[-1]
    return float(value) if _finite(value) else None


def _resolve(resolve, which: str, directory: Path) -> str | None:
    try:
        return str(resolve(which, directory))
    except CheckpointError:
        return None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)
