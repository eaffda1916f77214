"""The queue's tables (component ``queue`` of kiln's SQLite file) and its time format.

Times are stored as UTC ISO 8601 text of one fixed width (microseconds, ``+00:00``), so
comparing the text compares the times: ``not_before <= ?`` and ``lease_expires_at < ?``
run on indexes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from kiln._store import Migration

__all__ = ["COMPONENT", "MIGRATIONS", "Clock", "iso", "parse_time", "utcnow"]

COMPONENT = "queue"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "jobs, dependencies, schedules, fires and retraining decisions",
        """
        CREATE TABLE jobs (
            job_id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_type TEXT NOT NULL,
            status TEXT NOT NULL,
            priority INTEGER NOT NULL,
            config TEXT NOT NULL,
            created_at TEXT NOT NULL,
            started_at TEXT,
            completed_at TEXT,
            error_message TEXT,
            worker_id TEXT,
            retry_count INTEGER NOT NULL DEFAULT 0,
            max_retries INTEGER NOT NULL,
            result TEXT,
            details TEXT,
            not_before TEXT,
            schedule_id INTEGER,
            log_path TEXT,
            ray_job_id TEXT,
            attempt INTEGER NOT NULL DEFAULT 0,
            lease_expires_at TEXT
        );
        CREATE INDEX jobs_claim ON jobs(status, priority DESC, job_id);
        CREATE INDEX jobs_lease ON jobs(status, lease_expires_at);
        CREATE TABLE job_dependencies (
            job_id INTEGER NOT NULL REFERENCES jobs(job_id),
            depends_on INTEGER NOT NULL REFERENCES jobs(job_id),
            PRIMARY KEY (job_id, depends_on)
        );
        CREATE INDEX job_dependents ON job_dependencies(depends_on);
        CREATE TABLE schedules (
            schedule_id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            job_type TEXT NOT NULL,
            config TEXT NOT NULL,
            schedule_expr TEXT NOT NULL,
            priority INTEGER NOT NULL,
            timezone TEXT NOT NULL,
            catch_up TEXT NOT NULL,
            paused INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            last_fire_at TEXT
        );
        CREATE TABLE schedule_fires (
            schedule_id INTEGER NOT NULL,
            fire_key TEXT NOT NULL,
            job_id INTEGER,
            fired_at TEXT NOT NULL,
            PRIMARY KEY (schedule_id, fire_key)
        );
        CREATE TABLE retrain_decisions (
            decision_id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id INTEGER,
            model_name TEXT NOT NULL,
            incumbent_id INTEGER,
            candidate_id INTEGER,
            action TEXT NOT NULL,
            reasons TEXT NOT NULL,
            numbers TEXT NOT NULL,
            at TEXT NOT NULL
        );
        CREATE INDEX retrain_decisions_by_model ON retrain_decisions(model_name, decision_id);
        """,
    ),
)

Clock = Callable[[], datetime]


def iso(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds: one fixed width, so text order is time order."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def parse_time(value: str | datetime) -> datetime:
    """A timezone-aware datetime from an ISO string or datetime (naive means UTC)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
