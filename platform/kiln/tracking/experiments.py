"""ExperimentDB: the record of every training run, in kiln's SQLite file.

A run has a name, a config, params (seed, versions, git commit), metrics per epoch or
step, artifacts (checkpoint paths), a data profile and a final status. Only the driver
writes: :class:`kiln.engine.trainer.Trainer` calls, in order::

    run_id = db.log_run(run_name, config.to_dict(), notes, group=None)
    db.log_params(run_id, {"seed": ..., **collect_environment()})
    db.set_profile(run_id, compute_profile(x_train))          # optional
    for each epoch:  db.log_metrics(run_id, {"train_loss": ..., "val_loss": ...}, epoch=e)
    for each kept checkpoint:  db.log_artifact(run_id, "checkpoint", path)
    db.finish_run(run_id, "completed" | "failed" | "stopped", error=None)

A run's row also holds its driver's pid and host: a driver killed before ``finish_run``
leaves the run ``running`` until :meth:`ExperimentDB.mark_interrupted_runs` (called by
the next run's start and by ``kiln runs list``) sees that process gone and marks it
``interrupted``.

Run ids are SQLite autoincrement integers (never reused). ``group`` ties runs
together, e.g. the trials of one Ray Tune search.
"""

from __future__ import annotations

import enum
import json
import math
import os
import platform as _platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import apsw
import pandas as pd

from kiln._store import Migration, Store
from kiln.config.modes import MetricMode
from kiln.errors import ConfigError, RunNotFoundError

__all__ = ["ExperimentDB", "RunStatus", "collect_environment", "MIGRATIONS"]

COMPONENT = "tracking"

#: Ordered schema steps of the runs store. Never edit a released step; append one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, metrics and params",
        """
        CREATE TABLE runs (
            run_id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_name TEXT NOT NULL,
            config TEXT NOT NULL DEFAULT '{}',
            notes TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'running',
            started_at TEXT NOT NULL,
            ended_at TEXT,
            error TEXT
        );
        CREATE INDEX runs_by_name ON runs(run_name);
        CREATE TABLE metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            value REAL,
            epoch INTEGER,
            step INTEGER,
            timestamp TEXT NOT NULL
        );
        CREATE INDEX metrics_by_run ON metrics(run_id, name);
        CREATE TABLE params (
            run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (run_id, key)
        );
        """,
    ),
    Migration(
        2,
        "run groups (Tune searches), data profiles and artifacts",
        """
        ALTER TABLE runs ADD COLUMN group_name TEXT;
        ALTER TABLE runs ADD COLUMN profile TEXT;
        CREATE INDEX runs_by_group ON runs(group_name);
        CREATE INDEX metrics_by_name ON metrics(name, value);
        CREATE TABLE artifacts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            path TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        """,
    ),
    Migration(
        3,
        "the driver process of a run (pid, host), to tell a killed run from a running one",
        """
        ALTER TABLE runs ADD COLUMN driver_pid INTEGER;
        ALTER TABLE runs ADD COLUMN driver_host TEXT;
        """,
    ),
)


class RunStatus(str, enum.Enum):
    """Lifecycle of a run: ``running`` until it ends in one of the terminal states.

    ``interrupted``: its driver process died (kill -9, a crash, a reboot) without
    recording an end; see :meth:`ExperimentDB.mark_interrupted_runs`.
    """

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    INTERRUPTED = "interrupted"

    @property
    def is_terminal(self) -> bool:
        return self is not RunStatus.RUNNING

    @classmethod
    def parse(cls, value: str | RunStatus) -> RunStatus:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            raise ConfigError(
                f"status={value!r} is not a run status; use one of: {allowed}"
            ) from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _float(value: Any) -> float | None:
    """A metric value as a float; NaN is stored as NULL and read back as NaN."""
    out = float(value)
    return None if math.isnan(out) else out


def _duration_s(started: str | None, ended: str | None) -> float | None:
    if not started or not ended:
        return None
    return (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds()


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_commit(cwd: str | os.PathLike[str] | None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def collect_environment(cwd: str | os.PathLike[str] | None = None) -> dict[str, str | None]:
    """Versions and provenance to store with a run (all values strings or None).

    Args:
        cwd: Folder whose git commit is recorded (the current one by default).
    """
    import kiln

    return {
        "kiln_version": kiln.__version__,
        "ray_version": _package_version("ray"),
        "torch_version": _package_version("torch"),
        "python_version": _platform.python_version(),
        "platform": _platform.platform(),
        "hostname": socket.gethostname(),
        "git_commit": _git_commit(cwd),
        "executable": sys.executable,
    }


class ExperimentDB:
    """Runs, their params, metrics, artifacts and profiles in one SQLite file.

    Args:
        path: The SQLite file (usually ``kiln_home()/kiln.db``); created if missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.store = Store(path)
        self.store.migrate(COMPONENT, MIGRATIONS)

    @property
    def path(self) -> str:
        return self.store.path

    def close(self) -> None:
        self.store.close()

    # -- writing ----------------------------------------------------------------------

    def log_run(
        self,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        notes: str = "",
        group: str | None = None,
    ) -> int:
        """Start a run (status ``running``) and return its id.

        Args:
            run_name: Display name; ``run-<id>`` when None. Names need not be unique.
            config: The training config as a JSON-able dict.
            notes: Free text.
            group: Groups runs, e.g. the id of the Tune search whose trial this is.
        """
        with self.store.transaction() as cur:
            cur.execute(
                "INSERT INTO runs(run_name, config, notes, status, started_at, group_name, "
                "driver_pid, driver_host) VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
                (
                    run_name or "",
                    _dumps(dict(config or {})),
                    notes or "",
                    _now(),
                    group,
                    os.getpid(),
                    socket.gethostname(),
                ),
            )
            run_id = int(self.store.connection().last_insert_rowid())
            if not run_name:
                cur.execute(
                    "UPDATE runs SET run_name = ? WHERE run_id = ?", (f"run-{run_id}", run_id)
                )
        return run_id

    def log_params(self, run_id: int, params: Mapping[str, Any]) -> None:
        """Set (or overwrite) key/value params of a run; values are stored as JSON."""
        rows = [(run_id, str(k), _dumps(v)) for k, v in params.items()]
        self._write_many(
            run_id,
            "INSERT INTO params(run_id, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT(run_id, key) DO UPDATE SET value = excluded.value",
            rows,
        )

    def log_metric(
        self,
        run_id: int,
        name: str,
        value: float,
        epoch: int | None = None,
        step: int | None = None,
    ) -> None:
        """Append one metric value (NaN allowed) to a run."""
        self.log_metrics(run_id, {name: value}, epoch=epoch, step=step)

    def log_metrics(
        self,
        run_id: int,
        metrics: Mapping[str, float],
        epoch: int | None = None,
        step: int | None = None,
    ) -> None:
        """Append several metric values with one epoch/step, in one transaction."""
        now = _now()
        rows = [(run_id, str(k), _float(v), epoch, step, now) for k, v in metrics.items()]
        self._write_many(
            run_id,
            "INSERT INTO metrics(run_id, name, value, epoch, step, timestamp) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )

    def log_artifact(self, run_id: int, kind: str, path: str | os.PathLike[str]) -> None:
        """Record a file the run produced, e.g. ``kind="checkpoint"``."""
        self._write_many(
            run_id,
            "INSERT INTO artifacts(run_id, kind, path, created_at) VALUES (?, ?, ?, ?)",
            [(run_id, kind, os.fspath(path), _now())],
        )

    def set_profile(self, run_id: int, profile: Mapping[str, Any]) -> None:
        """Store the run's data profile (see :func:`kiln.tracking.metrics.compute_profile`)."""
        self._update_run(run_id, "profile = ?", (_dumps(dict(profile)),))

    def finish_run(
        self, run_id: int, status: str | RunStatus = RunStatus.COMPLETED, error: str | None = None
    ) -> None:
        """Set a run's final status (completed/failed/stopped; running re-opens it)."""
        state = RunStatus.parse(status)
        ended = _now() if state.is_terminal else None
        self._update_run(run_id, "status = ?, ended_at = ?, error = ?", (state.value, ended, error))

    def mark_interrupted_runs(self) -> list[int]:
        """Mark ``interrupted`` the running runs whose driver died; return their ids.

        A run is left ``running`` when its driver is killed (kill -9, a crash). A run
        started on this host whose driver pid is no longer alive is closed here, with
        ``ended_at`` at its last checkpoint (its ``checkpoint_dir`` param) when there is
        one, else its start, and the checkpoint named in ``error`` for ``--resume``.
        Runs of other hosts are left alone: this process cannot see their drivers.
        """
        host = socket.gethostname()
        rows = self.store.query(
            "SELECT run_id, started_at, driver_pid FROM runs WHERE status = 'running' "
            "AND driver_host = ? AND driver_pid IS NOT NULL AND driver_pid != ?",
            (host, os.getpid()),
        )
        marked = []
        for run_id, started_at, pid in rows:
            if _pid_alive(int(pid)):
                continue
            path, at = self._last_checkpoint(run_id)
            where = f"its last checkpoint is {path} ({at})" if path else "it saved no checkpoint"
            error = (
                f"interrupted: the driver process {pid} on {host} ended without recording an "
                f"end; {where}" + ("; continue it with --resume latest" if path else "")
            )
            with self.store.transaction() as cur:
                cur.execute(
                    "UPDATE runs SET status = 'interrupted', ended_at = ?, error = ? "
                    "WHERE run_id = ? AND status = 'running'",
                    (at or started_at, error, run_id),
                )
                if self.store.connection().changes():
                    marked.append(int(run_id))
        return marked

    def _last_checkpoint(self, run_id: int) -> tuple[str | None, str | None]:
        """The latest committed checkpoint of a run and its time, from its checkpoint_dir."""
        rows = self.store.query(
            "SELECT value FROM params WHERE run_id = ? AND key = 'checkpoint_dir'", (run_id,)
        )
        if not rows:
            return None, None
        from kiln.engine.checkpoint_reader import read_metadata, resolve_checkpoint
        from kiln.errors import CheckpointError

        try:
            latest = resolve_checkpoint("latest", json.loads(rows[0][0]))
            return str(latest), str(read_metadata(latest)["timestamp"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            return None, None

    def _write_many(self, run_id: int, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        try:
            with self.store.transaction() as cur:
                cur.executemany(sql, rows)
        except apsw.ConstraintError as exc:
            if "FOREIGN KEY" in str(exc):
                raise self._not_found(run_id) from None
            raise

    def _update_run(self, run_id: int, assignments: str, values: tuple) -> None:
        with self.store.transaction() as cur:
            cur.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*values, run_id))
            changed = self.store.connection().changes()
        if not changed:
            raise self._not_found(run_id)

    # -- reading ----------------------------------------------------------------------

    def resolve_run_id(self, run: int | str) -> int:
        """The id of ``run``: an id, or a name (the newest run of that name wins)."""
        if isinstance(run, str):
            rows = self.store.query("SELECT MAX(run_id) FROM runs WHERE run_name = ?", (run,))
            if rows[0][0] is not None:
                return int(rows[0][0])
            if not run.strip().isdigit():
                raise self._not_found(run)
            run = int(run)
        if self.store.query("SELECT 1 FROM runs WHERE run_id = ?", (int(run),)):
            return int(run)
        raise self._not_found(run)

    def get_run(self, run: int | str) -> dict[str, Any]:
        """Everything about one run: config, params, status, times, error, artifacts.

        ``metrics`` holds the last value of each metric; :meth:`get_metrics` has all.
        """
        run_id = self.resolve_run_id(run)
        row = self.store.query_dicts("SELECT * FROM runs WHERE run_id = ?", (run_id,))[0]
        params = {
            k: json.loads(v)
            for k, v in self.store.query(
                "SELECT key, value FROM params WHERE run_id = ?", (run_id,)
            )
        }
        artifacts = self.store.query_dicts(
            "SELECT kind, path, created_at FROM artifacts WHERE run_id = ? ORDER BY id", (run_id,)
        )
        last = self.store.query(
            "SELECT name, value FROM metrics WHERE id IN "
            "(SELECT MAX(id) FROM metrics WHERE run_id = ? GROUP BY name) ORDER BY name",
            (run_id,),
        )
        return {
            "run_id": run_id,
            "run_name": row["run_name"],
            "group": row["group_name"],
            "status": row["status"],
            "notes": row["notes"],
            "config": json.loads(row["config"]),
            "params": params,
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "duration_s": _duration_s(row["started_at"], row["ended_at"]),
            "error": row["error"],
            "artifacts": artifacts,
            "metrics": {name: (math.nan if v is None else v) for name, v in last},
            "profile": json.loads(row["profile"]) if row["profile"] else None,
        }

    def get_profile(self, run: int | str) -> dict[str, Any] | None:
        """The data profile stored with a run, or None."""
        return self.get_run(run)["profile"]

    def list_runs(
        self, group: str | None = None, status: str | None = None, limit: int | None = None
    ) -> pd.DataFrame:
        """Runs, newest first: run_id, run_name, group, status, started_at, ended_at,
        duration_s, notes."""
        where: list[str] = []
        args: list[Any] = []
        if group is not None:
            where.append("group_name = ?")
            args.append(group)
        if status is not None:
            where.append("status = ?")
            args.append(RunStatus.parse(status).value)
        sql = (
            "SELECT run_id, run_name, group_name AS 'group', status, started_at, ended_at, notes "
            "FROM runs"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY run_id DESC"
            + (" LIMIT ?" if limit is not None else "")
        )
        if limit is not None:
            args.append(int(limit))
        columns = ["run_id", "run_name", "group", "status", "started_at", "ended_at",
                   "duration_s", "notes"]  # fmt: skip
        rows = [(*r[:6], _duration_s(r[4], r[5]), r[6]) for r in self.store.query(sql, args)]
        df = pd.DataFrame(rows, columns=columns)
        return df

    def get_metrics(self, run: int | str, name: str | None = None) -> pd.DataFrame:
        """Every metric row of a run in logging order: run_id, name, value, epoch, step,
        timestamp."""
        run_id = self.resolve_run_id(run)
        sql = "SELECT run_id, name, value, epoch, step, timestamp FROM metrics WHERE run_id = ?"
        args: list[Any] = [run_id]
        if name is not None:
            sql += " AND name = ?"
            args.append(name)
        rows = self.store.query(sql + " ORDER BY id", args)
        df = pd.DataFrame(rows, columns=["run_id", "name", "value", "epoch", "step", "timestamp"])
        df["value"] = pd.to_numeric(df["value"]).astype(float)  # NULL -> NaN
        for col in ("epoch", "step"):
            df[col] = df[col].astype("Int64")
        return df

    def metric_names(self) -> list[str]:
        """Every metric name logged by any run."""
        return [r[0] for r in self.store.query("SELECT DISTINCT name FROM metrics ORDER BY name")]

    def get_best_run(
        self, metric: str, mode: str = "min", group: str | None = None
    ) -> dict[str, Any]:
        """The run holding the best value of ``metric``: run_name, run_id, best_value,
        epoch, step."""
        order = MetricMode.parse(mode).sql_order
        sql = (
            "SELECT m.run_id, r.run_name, m.value, m.epoch, m.step FROM metrics m "
            "JOIN runs r ON r.run_id = m.run_id WHERE m.name = ? AND m.value IS NOT NULL"
        )
        args: list[Any] = [metric]
        if group is not None:
            sql += " AND r.group_name = ?"
            args.append(group)
        rows = self.store.query(sql + f" ORDER BY m.value {order}, m.id LIMIT 1", args)
        if not rows:
            known = ", ".join(self.metric_names()) or "(none)"
            where = f" in group {group!r}" if group is not None else ""
            raise RunNotFoundError(
                f"no run{where} has logged metric {metric!r}; logged metrics: {known}"
            )
        run_id, run_name, value, epoch, step = rows[0]
        return {
            "run_name": run_name,
            "run_id": run_id,
            "best_value": value,
            "epoch": epoch,
            "step": step,
        }

    def compare_runs(
        self,
        run_ids: Iterable[int | str],
        metrics: Iterable[str] | None = None,
        agg: str = "last",
    ) -> pd.DataFrame:
        """One row per run: run_id, run_name, status, duration_s, then one column per metric.

        Args:
            run_ids: Ids or names.
            metrics: Metric names to show (all the runs logged when None).
            agg: Which value per metric: ``last`` (default), ``min``, ``max`` or ``mean``.
        """
        if agg not in ("last", "min", "max", "mean"):
            raise ConfigError(f"agg={agg!r} is not allowed; use 'last', 'min', 'max' or 'mean'")
        ids = [self.resolve_run_id(r) for r in run_ids]
        wanted = list(metrics) if metrics is not None else None
        rows = []
        for run_id in ids:
            info = self.get_run(run_id)
            df = self.get_metrics(run_id)
            if wanted is not None:
                df = df[df["name"].isin(wanted)]
            grouped = df.groupby("name", sort=True)["value"]
            values = grouped.last() if agg == "last" else grouped.agg(agg)
            rows.append(
                {
                    "run_id": run_id,
                    "run_name": info["run_name"],
                    "status": info["status"],
                    "duration_s": info["duration_s"],
                    **values.to_dict(),
                }
            )
        out = pd.DataFrame(rows)
        for name in wanted or []:
            if name not in out.columns:
                out[name] = math.nan
        return out

    def _not_found(self, run: int | str) -> RunNotFoundError:
        recent = self.store.query("SELECT run_id, run_name FROM runs ORDER BY run_id DESC LIMIT 10")
        known = ", ".join(f"{i} ({n})" for i, n in recent) or "(no runs yet)"
        return RunNotFoundError(
            f"no run with id or name {run!r} in {self.path!r}; newest runs: {known}"
        )
