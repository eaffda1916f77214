"""What a queued job is: its type, its lifecycle and the frozen record the queue returns.

Lifecycle (every transition happens in one ``BEGIN IMMEDIATE`` transaction of
:class:`~kiln.queue.manager.JobManager`)::

    pending --claim--> running --complete--> completed
       ^                  |  \\--fail (retries left: backoff)--> pending
       |                  |  \\--fail (retries spent) / timeout--> failed
       |                  |  \\--lease expired--> pending (retry_count + 1) | failed
       |                  \\--cancel--> cancelled (the worker stops the run)
       +--retry_job-- failed | cancelled
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import ConfigError

__all__ = ["Job", "JobStatus", "JobType"]


class JobType(str, enum.Enum):
    """What a job runs. ``noop`` sleeps and succeeds: a smoke test for a worker."""

    TRAINING = "training"
    EVALUATION = "evaluation"
    EXPORT = "export"
    RETRAINING = "retraining"
    NOOP = "noop"

    def __str__(self) -> str:
        return self.value

    @property
    def needs_model(self) -> bool:
        """True when the config names a registered model (``model: NAME@TAG``)."""
        return self in (JobType.EVALUATION, JobType.EXPORT, JobType.RETRAINING)

    @classmethod
    def parse(cls, value: str | JobType) -> JobType:
        """The member named by ``value``; a :class:`ConfigError` listing them otherwise."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(t.value for t in cls)
            raise ConfigError(
                f"job_type={value!r} is not a job type; use one of: {allowed}"
            ) from None


class JobStatus(str, enum.Enum):
    """Where a job is in its lifecycle (see the module docstring)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # f"{job.status}" prints "pending", not "JobStatus.PENDING"
        return self.value

    @property
    def is_terminal(self) -> bool:
        """Completed, failed or cancelled: nothing happens to it unless it is retried."""
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)

    @property
    def can_cancel(self) -> bool:
        return not self.is_terminal

    @property
    def can_retry(self) -> bool:
        """Failed and cancelled jobs may be queued again by hand; completed ones may not."""
        return self in (JobStatus.FAILED, JobStatus.CANCELLED)

    @classmethod
    def parse(cls, value: str | JobStatus) -> JobStatus:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            raise ConfigError(
                f"status={value!r} is not a job status; use one of: {allowed}"
            ) from None


@dataclass(frozen=True)
class Job:
    """One queued job: the seed's fields, then what kiln adds.

    Times are ISO 8601 strings in UTC. ``result`` is what the job produced: the run
    name (training), the new model reference (retraining), the bundle path (export),
    the metrics as JSON (evaluation); ``details`` holds the rest (run id, metrics,
    the retraining decision).

    Lease fields belong to the worker protocol: ``attempt`` is the fencing token (the
    number of times the job was claimed); a worker reports under the attempt it
    claimed, and a report under an older one is refused. ``lease_expires_at`` is when
    the job goes back to the queue unless the worker renews it.
    """

    job_id: int
    job_type: JobType
    status: JobStatus
    priority: int
    config: dict[str, Any]
    created_at: str
    started_at: str | None
    completed_at: str | None
    error_message: str | None
    worker_id: str | None
    retry_count: int
    max_retries: int
    result: str | None = None
    details: dict[str, Any] | None = field(default=None, repr=False)
    not_before: str | None = None
    depends_on: tuple[int, ...] = ()
    schedule_id: int | None = None
    log_path: str | None = None
    ray_job_id: str | None = None
    attempt: int = 0
    lease_expires_at: str | None = None

    @property
    def retries_left(self) -> int:
        return max(0, self.max_retries - self.retry_count)
