"""Send kiln runs to MLflow: ``report_to: [mlflow]`` and ``kiln runs export RUN --to mlflow``.

One MLflow run per kiln run, written from the driver once the run's history is
known (workers never talk to MLflow): the config flattened into params
(``model.hidden``, ``learning_rate``, ...), every per-epoch metric at step = the epoch,
per-step loss/lr at step = the global step, tags (kiln's run id, name, status,
task), and the best checkpoint's folder as the artifact ``best_checkpoint/``.

A kiln run is one MLflow run: sending it again (``kiln runs export`` after
``report_to``, or twice) replaces the earlier one, which is deleted once the new one is
complete. A run is known by the tag ``kiln.run_key``, its name and start time in
kiln's database (``RUN_NAME@STARTED_AT``: two runs given the same name stay apart).

The tracking server is ``tracking_uri`` when given, else MLflow's own default
(``MLFLOW_TRACKING_URI``, read by MLflow); a local file store (``file:///tmp/mlruns``)
works. ``mlflow`` is an optional extra: ``pip install 'kiln[mlflow]'``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, KilnError
from kiln.tracking.recorder import numeric_metrics

__all__ = ["log_run_to_mlflow", "export_recorded_run", "run_key", "DEFAULT_EXPERIMENT"]

DEFAULT_EXPERIMENT = "kiln"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value (MAX_PARAM_VAL_LENGTH)
_BATCH = 900  # MLflow takes at most 1000 metrics and 100 params per log_batch
_STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "failed": "FAILED"}
RUN_KEY_TAG = "kiln.run_key"
_DONE_TAG = "kiln.source"  # set last: an export that stopped part way has no such tag


def run_key(run_name: str, started_at: str) -> str:
    """What tells one kiln run from every other: its name and its recorded start time."""
    return f"{run_name}@{started_at}"


def _client(tracking_uri: str | None) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(
            "exporting to MLflow needs the `mlflow` package, which is not installed; "
            "`pip install 'kiln[mlflow]'` (or `pip install mlflow-skinny`)"
        ) from None
    return MlflowClient(tracking_uri=tracking_uri)


def log_run_to_mlflow(
    run_name: str,
    *,
    config: Mapping[str, Any],
    history: list[dict[str, Any]],
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    status: str = "completed",
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> str:
    """Write one finished kiln run (its history rows, as ``Trainer`` returns them) as an
    MLflow run; return the MLflow run id."""
    rows = []
    for row in history:
        epoch = int(row["epoch"])
        millis = int(float(row.get("timestamp") or time.time()) * 1000)
        rows += [(k, v, millis, epoch) for k, v in numeric_metrics(row).items()]
        for step in row.get("steps", []):
            for key in ("loss", "lr"):
                if key in step:
                    rows.append((f"step_{key}", float(step[key]), millis, int(step["step"])))
    return _write(
        _client(tracking_uri),
        experiment,
        run_name,
        {**_flatten(config), **_flatten(params or {})},
        rows,
        {"kiln.run_name": run_name, **(tags or {})},
        checkpoint,
        status,
    )


def export_recorded_run(
    db_path: str | Path,
    run: int | str,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> str:
    """Export a run recorded in kiln's database (``kiln runs export RUN --to mlflow``);
    return the MLflow run id."""
    from kiln.tracking.experiments import ExperimentDB

    db = ExperimentDB(db_path)
    try:
        record = db.get_run(run)
        metrics = db.get_metrics(record["run_id"])
    finally:
        db.close()
    import pandas as pd

    rows = []
    for item in metrics.itertuples(index=False):
        step = item.epoch if pd.isna(item.step) else item.step  # step rows: the global step
        millis = int(datetime.fromisoformat(str(item.timestamp)).timestamp() * 1000)
        rows.append((item.name, float(item.value), millis, 0 if pd.isna(step) else int(step)))
    params = {k: v for k, v in record["params"].items() if k != "alerts"}
    tags = {
        "kiln.run_id": record["run_id"],
        "kiln.run_name": record["run_name"],
        RUN_KEY_TAG: run_key(record["run_name"], record["started_at"]),
        "kiln.status": record["status"],
        "kiln.group": record["group"],
        "mlflow.note.content": record["notes"] or None,
    }
    return _write(
        _client(tracking_uri),
        experiment,
        record["run_name"],
        {**_flatten(record["config"]), **_flatten(params)},
        rows,
        tags,
        _best_checkpoint(record),
        record["status"],
    )


def _best_checkpoint(record: Mapping[str, Any]) -> str | None:
    """The run's best checkpoint (by its monitor), else its last recorded one, else None."""
    from kiln.engine.checkpoint_reader import resolve_checkpoint
    from kiln.errors import CheckpointError

    folder = record["params"].get("checkpoint_dir")
    if folder:
        try:
            return str(resolve_checkpoint("best", folder))
        except CheckpointError:
            pass
    paths = [a["path"] for a in record["artifacts"] if a["kind"] == "checkpoint"]
    existing = [p for p in paths if Path(p).exists()]
    return existing[-1] if existing else None


def _write(
    client: Any,
    experiment: str,
    run_name: str,
    params: Mapping[str, str],
    rows: list[tuple[str, float, int, int]],
    tags: Mapping[str, Any],
    checkpoint: str | None,
    status: str,
) -> str:
    from mlflow.entities import Metric, Param, RunTag

    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tag_values = {k: str(v) for k, v in tags.items() if v not in (None, "")}
    key = tag_values.get(RUN_KEY_TAG)
    earlier = _exports_of(client, experiment_id, key) if key else []
    run = client.create_run(experiment_id, run_name=run_name, tags=tag_values)
    run_id = run.info.run_id
    try:
        param_list = [Param(_key(k), v) for k, v in params.items()]
        for chunk in _chunks(param_list, 100):
            client.log_batch(run_id, params=chunk)
        metric_list = [Metric(_key(k), v, ms, step) for k, v, ms, step in rows]
        for chunk in _chunks(metric_list, _BATCH):
            client.log_batch(run_id, metrics=chunk)
        if checkpoint:
            _log_checkpoint(client, run_id, Path(checkpoint))
        client.log_batch(run_id, tags=[RunTag(_DONE_TAG, "kiln")])
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status=_STATUS.get(status, "KILLED"))
    for old in earlier:  # the new export is whole: the earlier ones of this run go
        client.delete_run(old)
    return run_id


def _exports_of(client: Any, experiment_id: str, key: str) -> list[str]:
    """The MLflow run ids of the complete, not deleted, exports of kiln run ``key``."""
    from mlflow.entities import ViewType

    found, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{_DONE_TAG}` = 'kiln'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        found += [r.info.run_id for r in page if r.data.tags.get(RUN_KEY_TAG) == key]
        token = page.token
        if not token:
            return found


def _log_checkpoint(client: Any, run_id: str, checkpoint: Path) -> None:
    if not checkpoint.exists():
        raise KilnError(f"checkpoint {str(checkpoint)!r} does not exist; nothing to upload")
    if checkpoint.is_dir():
        client.log_artifacts(run_id, str(checkpoint), artifact_path="best_checkpoint")
    else:
        client.log_artifact(run_id, str(checkpoint), artifact_path="best_checkpoint")


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"hidden": [64]}}`` -> ``{"model.hidden": "[64]"}``; None left out."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_MAX_PARAM_CHARS]
    return out


def _key(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . / :`` and spaces)."""
    return re.sub(r"[^\w\-./: ]", "_", str(name))
