"""JobManager: the job queue, in the same SQLite file as runs and the registry.

Each operation is one ``BEGIN IMMEDIATE`` transaction of :class:`kiln._store.Store`,
so any number of processes on one host may submit, claim and report at once.

The worker protocol:

1. ``claim_job(worker_id)`` first returns expired leases to the queue (retry_count
   + 1, or ``failed`` when retries are spent), then takes the highest-priority
   pending job whose ``not_before`` has passed and whose dependencies completed
   (ties: oldest first). The job becomes ``running`` with the worker's id, a lease
   and a new ``attempt`` number: the fencing token.
2. While it runs, the worker calls ``renew_lease(job_id, attempt)``; it returns False
   once the job was cancelled or reclaimed, and the worker stops the run.
3. ``complete_job`` / ``fail_job`` / ``release_job`` under that attempt. A report
   under a stale attempt raises :class:`~kiln.errors.LeaseLostError` and changes
   nothing. A failure with retries left goes back to ``pending`` after an
   exponential backoff (``backoff_base_s * 2**retry_count``, capped).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from kiln._store import Store
from kiln.errors import ConfigError, JobNotFoundError, JobStateError, LeaseLostError
from kiln.paths import RunPaths
from kiln.queue._schema import COMPONENT, MIGRATIONS, Clock, iso, parse_time, utcnow
from kiln.queue.jobs import Job, JobStatus, JobType
from kiln.queue.validation import validate_job_config, validate_priority

__all__ = ["COMPONENT", "MIGRATIONS", "JobManager"]

_COLUMNS = (
    "job_id, job_type, status, priority, config, created_at, started_at, completed_at, "
    "error_message, worker_id, retry_count, max_retries, result, details, not_before, "
    "schedule_id, log_path, ray_job_id, attempt, lease_expires_at"
)
_NAMES = [c.strip() for c in _COLUMNS.split(",")]


class JobManager:
    """Submit, inspect and work the job queue.

    Args:
        db_path: The SQLite file; default ``paths.db`` (``$KILN_HOME/kiln.db``).
        paths: kiln's locations (the registry for model references, ``logs/``).
        lease_s: How long a claim holds a job without renewal.
        backoff_base_s, backoff_max_s: Delay before retry ``n`` is
            ``min(backoff_max_s, backoff_base_s * 2**n)``.
        clock: Returns the current time (tests pass a fake one).
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None = None,
        *,
        paths: RunPaths | None = None,
        lease_s: float = 60.0,
        backoff_base_s: float = 30.0,
        backoff_max_s: float = 3600.0,
        clock: Clock | None = None,
    ) -> None:
        self.paths = (paths or RunPaths.resolve()).with_overrides(db=db_path)
        self.store = Store(self.paths.db)
        self.store.migrate(COMPONENT, MIGRATIONS)
        self.lease_s = float(lease_s)
        self.backoff_base_s, self.backoff_max_s = float(backoff_base_s), float(backoff_max_s)
        self.clock: Clock = clock or utcnow

    def close(self) -> None:
        self.store.close()

    def now(self) -> datetime:
        return self.clock()

    # -- submitting -------------------------------------------------------------------

    def submit_job(
        self,
        job_type: str | JobType,
        config: Any,
        priority: int = 5,
        max_retries: int = 3,
        not_before: str | datetime | None = None,
        depends_on: int | Iterable[int] | None = None,
        *,
        schedule_id: int | None = None,
    ) -> int:
        """Validate and queue a job; return its id.

        Raises:
            ConfigError: unknown job type, priority outside 1-10, a config that does
                not build, a model reference the registry lacks (every problem listed).
        """
        kind = JobType.parse(job_type)
        errors = validate_priority(priority)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            errors.append(f"max_retries={max_retries!r} must be an integer >= 0")
        deps = _dependency_list(depends_on, errors)
        when = None
        if not_before is not None:
            try:
                when = iso(parse_time(not_before))
            except (TypeError, ValueError):
                errors.append(f"not_before={not_before!r} must be a datetime or ISO 8601 string")
        try:
            normalized = validate_job_config(kind, config, self.paths)
        except ConfigError as exc:
            errors.extend(exc.errors)
        if errors:
            raise ConfigError(errors)
        with self.store.transaction() as cur:
            return self._insert(
                cur, kind, normalized, priority, max_retries, when, deps, schedule_id
            )

    def _insert(
        self,
        cur: Any,
        kind: JobType,
        config: dict[str, Any],
        priority: int,
        max_retries: int,
        not_before: str | None,
        deps: list[int],
        schedule_id: int | None,
    ) -> int:
        """Insert one pending job inside the caller's transaction (config already valid)."""
        for dep in deps:
            if not list(cur.execute("SELECT 1 FROM jobs WHERE job_id = ?", (dep,))):
                raise JobNotFoundError(f"depends_on: no job with id {dep!r}")
        cur.execute(
            "INSERT INTO jobs(job_type, status, priority, config, created_at, max_retries, "
            "not_before, schedule_id) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?)",
            (kind.value, priority, json.dumps(config), iso(self.now()), max_retries,
             not_before, schedule_id),
        )  # fmt: skip
        job_id = int(self.store.connection().last_insert_rowid())
        for dep in deps:
            cur.execute(
                "INSERT INTO job_dependencies(job_id, depends_on) VALUES (?, ?)", (job_id, dep)
            )
        return job_id

    # -- reading ----------------------------------------------------------------------

    def get_job(self, job_id: int) -> Job:
        rows = self.store.query_dicts(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            raise self._not_found(job_id)
        deps = self.store.query(
            "SELECT depends_on FROM job_dependencies WHERE job_id = ? ORDER BY depends_on",
            (job_id,),
        )
        return _job(rows[0], tuple(d[0] for d in deps))

    def list_jobs(
        self,
        status: str | JobStatus | None = None,
        job_type: str | JobType | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Jobs, newest first: one row per job, one column per :class:`Job` field."""
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append("status = ?")
            args.append(JobStatus.parse(status).value)
        if job_type is not None:
            where.append("job_type = ?")
            args.append(JobType.parse(job_type).value)
        sql = f"SELECT {_COLUMNS} FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY job_id DESC" + (" LIMIT ?" if limit is not None else "")
        if limit is not None:
            args.append(int(limit))
        rows = [_job(r).__dict__ for r in self.store.query_dicts(sql, args)]
        frame = pd.DataFrame(rows, columns=[f.name for f in fields(Job)])
        for col in ("job_type", "status"):
            frame[col] = frame[col].map(lambda v: getattr(v, "value", v))
        return frame

    def counts(self) -> dict[str, int]:
        """Number of jobs in each status."""
        rows = self.store.query("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {s.value: 0 for s in JobStatus} | {status: int(n) for status, n in rows}

    # -- the worker protocol ----------------------------------------------------------

    def claim_job(self, worker_id: str, lease_s: float | None = None) -> Job | None:
        """Take the next due job for ``worker_id`` (see the module docstring), or None."""
        now = self.now()
        expires = iso(now + timedelta(seconds=lease_s or self.lease_s))
        with self.store.transaction() as cur:
            self._reap(cur, iso(now))
            rows = list(
                cur.execute(
                    "SELECT job_id FROM jobs AS j WHERE status = 'pending' "
                    "AND (not_before IS NULL OR not_before <= ?) AND NOT EXISTS ("
                    " SELECT 1 FROM job_dependencies d JOIN jobs p ON p.job_id = d.depends_on"
                    " WHERE d.job_id = j.job_id AND p.status != 'completed') "
                    "ORDER BY priority DESC, job_id LIMIT 1",
                    (iso(now),),
                )
            )
            if not rows:
                return None
            job_id = rows[0][0]
            cur.execute(
                "UPDATE jobs SET status = 'running', worker_id = ?, started_at = ?, "
                "lease_expires_at = ?, attempt = attempt + 1, error_message = NULL, "
                "log_path = NULL, ray_job_id = NULL WHERE job_id = ?",
                (worker_id, iso(now), expires, job_id),
            )
            row = self._row(cur, job_id)
        return _job(row)

    def renew_lease(self, job_id: int, attempt: int, lease_s: float | None = None) -> bool:
        """Extend the lease of a running attempt; False when it is no longer that attempt's."""
        expires = iso(self.now() + timedelta(seconds=lease_s or self.lease_s))
        with self.store.transaction() as cur:
            cur.execute(
                "UPDATE jobs SET lease_expires_at = ? "
                "WHERE job_id = ? AND attempt = ? AND status = 'running'",
                (expires, job_id, attempt),
            )
            return self.store.connection().changes() == 1

    def holds(self, job_id: int, attempt: int) -> bool:
        """True while ``attempt`` is the running attempt of the job."""
        rows = self.store.query(
            "SELECT 1 FROM jobs WHERE job_id = ? AND attempt = ? AND status = 'running'",
            (job_id, attempt),
        )
        return bool(rows)

    def note_run(
        self, job_id: int, attempt: int, log_path: str | None = None, ray_job_id: str | None = None
    ) -> None:
        """Record where a running attempt logs (and its Ray job id)."""
        with self.store.transaction() as cur:
            self._fenced(cur, job_id, attempt)
            cur.execute(
                "UPDATE jobs SET log_path = COALESCE(?, log_path), "
                "ray_job_id = COALESCE(?, ray_job_id) WHERE job_id = ?",
                (log_path, ray_job_id, job_id),
            )

    def complete_job(
        self,
        job_id: int,
        attempt: int,
        result: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Mark the attempt completed. Raises LeaseLostError (changing nothing) if stale."""
        with self.store.transaction() as cur:
            self._fenced(cur, job_id, attempt)
            cur.execute(
                "UPDATE jobs SET status = 'completed', completed_at = ?, result = ?, details = ?, "
                "lease_expires_at = NULL WHERE job_id = ?",
                (iso(self.now()), result, _dumps(details), job_id),
            )

    def fail_job(
        self,
        job_id: int,
        attempt: int,
        error: str,
        *,
        retry: bool = True,
        details: dict[str, Any] | None = None,
    ) -> JobStatus:
        """Record a failed attempt: back to pending after a backoff while retries remain
        (and ``retry``), else ``failed``. Returns the new status; stale -> LeaseLostError."""
        now = self.now()
        with self.store.transaction() as cur:
            row = self._fenced(cur, job_id, attempt)
            if retry and row["retry_count"] < row["max_retries"]:
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** row["retry_count"])
                cur.execute(
                    "UPDATE jobs SET status = 'pending', retry_count = retry_count + 1, "
                    "not_before = ?, error_message = ?, details = ?, worker_id = NULL, "
                    "lease_expires_at = NULL WHERE job_id = ?",
                    (iso(now + timedelta(seconds=delay)), error, _dumps(details), job_id),
                )
                return JobStatus.PENDING
            cur.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, error_message = ?, "
                "details = ?, lease_expires_at = NULL WHERE job_id = ?",
                (iso(now), error, _dumps(details), job_id),
            )
            self._cascade(cur, job_id, "failed")
        return JobStatus.FAILED

    def release_job(self, job_id: int, attempt: int, reason: str = "worker stopped") -> None:
        """Hand a running attempt back to the queue untouched (a worker shutting down)."""
        with self.store.transaction() as cur:
            self._fenced(cur, job_id, attempt)
            cur.execute(
                "UPDATE jobs SET status = 'pending', worker_id = NULL, lease_expires_at = NULL, "
                "error_message = ? WHERE job_id = ?",
                (f"handed back: {reason}", job_id),
            )

    # -- user actions -----------------------------------------------------------------

    def cancel_job(self, job_id: int, reason: str = "cancelled by user") -> Job:
        """Cancel a pending or running job (a worker running it stops the run)."""
        with self.store.transaction() as cur:
            status = JobStatus(self._row(cur, job_id)["status"])
            if not status.can_cancel:
                raise JobStateError(
                    f"job {job_id} is {status.value}; only pending or running jobs can be cancelled"
                )
            cur.execute(
                "UPDATE jobs SET status = 'cancelled', completed_at = ?, error_message = ?, "
                "lease_expires_at = NULL WHERE job_id = ?",
                (iso(self.now()), reason, job_id),
            )
            self._cascade(cur, job_id, "cancelled")
        return self.get_job(job_id)

    def retry_job(self, job_id: int) -> Job:
        """Queue a failed or cancelled job again, with a fresh set of retries."""
        with self.store.transaction() as cur:
            status = JobStatus(self._row(cur, job_id)["status"])
            if not status.can_retry:
                raise JobStateError(
                    f"job {job_id} is {status.value}; only failed or cancelled jobs can be retried"
                )
            cur.execute(
                "UPDATE jobs SET status = 'pending', retry_count = 0, not_before = NULL, "
                "error_message = NULL, completed_at = NULL, worker_id = NULL, result = NULL "
                "WHERE job_id = ?",
                (job_id,),
            )
        return self.get_job(job_id)

    def reap_expired(self) -> int:
        """Return every expired lease to the queue now (``claim_job`` does this too)."""
        with self.store.transaction() as cur:
            return self._reap(cur, iso(self.now()))

    # -- helpers ----------------------------------------------------------------------

    def _reap(self, cur: Any, now: str) -> int:
        expired = list(
            cur.execute(
                "SELECT job_id, retry_count, max_retries, attempt, worker_id FROM jobs "
                "WHERE status = 'running' AND lease_expires_at < ?",
                (now,),
            )
        )
        for job_id, retries, max_retries, attempt, worker in expired:
            why = f"lease of attempt {attempt} (worker {worker!r}) expired"
            if retries < max_retries:
                cur.execute(
                    "UPDATE jobs SET status = 'pending', retry_count = retry_count + 1, "
                    "worker_id = NULL, lease_expires_at = NULL, error_message = ? "
                    "WHERE job_id = ?",
                    (why, job_id),
                )
            else:
                cur.execute(
                    "UPDATE jobs SET status = 'failed', completed_at = ?, lease_expires_at = NULL, "
                    "error_message = ? WHERE job_id = ?",
                    (now, f"{why}; retries spent ({max_retries})", job_id),
                )
                self._cascade(cur, job_id, "failed")
        return len(expired)

    def _cascade(self, cur: Any, job_id: int, how: str) -> None:
        """Pending jobs that depend on a job that will never complete fail with it."""
        todo, seen = [job_id], set[int]()
        while todo and len(seen) < 100_000:
            parent = todo.pop()
            seen.add(parent)
            children = [
                r[0]
                for r in cur.execute(
                    "SELECT d.job_id FROM job_dependencies d JOIN jobs j ON j.job_id = d.job_id "
                    "WHERE d.depends_on = ? AND j.status = 'pending'",
                    (parent,),
                )
            ]
            for child in children:
                cur.execute(
                    "UPDATE jobs SET status = 'failed', completed_at = ?, error_message = ? "
                    "WHERE job_id = ?",
                    (iso(self.now()), f"dependency job {parent} {how}", child),
                )
                todo.append(child)

    def _row(self, cur: Any, job_id: int) -> dict[str, Any]:
        rows = list(cur.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)))
        if not rows:
            raise self._not_found(job_id)
        return dict(zip(_NAMES, rows[0], strict=True))

    def _fenced(self, cur: Any, job_id: int, attempt: int) -> dict[str, Any]:
        row = self._row(cur, job_id)
        if row["status"] != JobStatus.RUNNING.value or row["attempt"] != attempt:
            raise LeaseLostError(
                f"job {job_id}: attempt {attempt} no longer holds it (status {row['status']!r}, "
                f"current attempt {row['attempt']}); the report was refused"
            )
        return row

    def _not_found(self, job_id: Any) -> JobNotFoundError:
        newest = self.store.query("SELECT job_id FROM jobs ORDER BY job_id DESC LIMIT 5")
        known = ", ".join(str(r[0]) for r in newest) or "(the queue is empty)"
        return JobNotFoundError(f"no job with id {job_id!r}; newest jobs: {known}")


def _dependency_list(depends_on: Any, errors: list[str]) -> list[int]:
    if depends_on is None:
        return []
    items = [depends_on] if isinstance(depends_on, int) else depends_on
    try:
        deps = list(items)
    except TypeError:
        errors.append(f"depends_on={depends_on!r} must be a job id or a list of job ids")
        return []
    bad = [d for d in deps if isinstance(d, bool) or not isinstance(d, int)]
    if bad:
        errors.append(f"depends_on={depends_on!r}: {bad!r} are not job ids (integers)")
    return [d for d in deps if d not in bad]


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _job(row: dict[str, Any], depends_on: tuple[int, ...] = ()) -> Job:
    return Job(
        job_id=row["job_id"],
        job_type=JobType(row["job_type"]),
        status=JobStatus(row["status"]),
        priority=row["priority"],
        config=json.loads(row["config"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        error_message=row["error_message"],
        worker_id=row["worker_id"],
        retry_count=row["retry_count"],
        max_retries=row["max_retries"],
        result=row["result"],
        details=json.loads(row["details"]) if row["details"] else None,
        not_before=row["not_before"],
        depends_on=depends_on,
        schedule_id=row["schedule_id"],
        log_path=row["log_path"],
        ray_job_id=row["ray_job_id"],
        attempt=row["attempt"],
        lease_expires_at=row["lease_expires_at"],
    )
