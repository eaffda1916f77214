"""TrainingScheduler: cron schedules that enqueue jobs, exactly once per fire.

    scheduler = TrainingScheduler()
    scheduler.create_schedule("nightly", "retraining", {...}, "30 2 * * *",
                              timezone="Europe/Berlin", catch_up="latest")
    scheduler.tick()          # enqueue every fire that is due (kiln scheduler loops on it)

How fires are found: cron expressions (``croniter``) are walked in the schedule's
local wall-clock time (``zoneinfo``) and each wall-clock fire is mapped to one UTC
instant. Daylight-saving changes: a time the clock skips (02:30 on a spring-forward
day) fires once, at the moment the clock jumps past it; a time the clock shows
twice (02:30 on a fall-back day) fires once, at its first occurrence. Fires that map
to the same instant are one fire.

Exactly once: every fire has a key (its UTC instant) that is unique per schedule in
the store, and a tick takes each schedule in one ``BEGIN IMMEDIATE`` transaction that
records the fire and inserts its job together; two schedulers ticking at once
enqueue each fire once.

Catch-up, for fires missed while no scheduler ran (older than ``misfire_grace_s``):
``latest`` enqueues the most recent one, ``all`` each of them, ``none`` none.
"""

from __future__ import annotations

import enum
import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
from croniter import croniter

from kiln.errors import ConfigError, ScheduleNotFoundError
from kiln.paths import RunPaths
from kiln.queue._schema import Clock, iso, parse_time
from kiln.queue.jobs import JobType
from kiln.queue.manager import JobManager
from kiln.queue.validation import validate_job_config, validate_priority

__all__ = ["CatchUp", "Schedule", "TrainingScheduler", "fire_times"]

_COLUMNS = (
    "schedule_id, name, job_type, config, schedule_expr, priority, timezone, catch_up, "
    "paused, created_at, last_fire_at"
)
_NAMES = [c.strip() for c in _COLUMNS.split(",")]


class CatchUp(str, enum.Enum):
    """What a tick does with fires that were missed (see the module docstring)."""

    LATEST = "latest"
    ALL = "all"
    NONE = "none"

    def select(self, missed: list[datetime], on_time: list[datetime]) -> list[datetime]:
        """The fires to enqueue out of the missed ones and those still on time."""
        if self is CatchUp.ALL:
            return missed + on_time
        if self is CatchUp.LATEST:
            return (missed + on_time)[-1:]
        return on_time


@dataclass(frozen=True)
class Schedule:
    """One schedule. ``last_fire_at`` is the UTC instant of the last fire considered."""

    schedule_id: int
    name: str
    job_type: JobType
    config: dict[str, Any]
    schedule_expr: str
    priority: int
    timezone: str
    catch_up: CatchUp
    paused: bool
    created_at: str
    last_fire_at: str | None


def fire_times(expr: str, tz: ZoneInfo, after: datetime, until: datetime) -> list[datetime]:
    """UTC instants of the fires of ``expr`` in ``tz`` in ``(after, until]``, in order."""
    out: list[datetime] = []
    local = after.astimezone(tz).replace(tzinfo=None)
    it = croniter(expr, local)
    for _ in range(100_000):  # bound: ~11 years of hourly fires
        wall = it.get_next(datetime)
        instant = _instant(wall, tz)
        if instant > until:
            break
        if instant > after and (not out or instant > out[-1]):
            out.append(instant)
    return out


def next_fires(expr: str, tz: ZoneInfo, after: datetime, n: int) -> list[datetime]:
    out: list[datetime] = []
    it = croniter(expr, after.astimezone(tz).replace(tzinfo=None))
    while len(out) < n:
        instant = _instant(it.get_next(datetime), tz)
        if instant > after and (not out or instant > out[-1]):
            out.append(instant)
    return out


def _instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of a local wall-clock time: its first occurrence; a skipped time
    maps to the moment the clock jumps past it."""
    for minutes in range(0, 24 * 60):
        candidate = wall + timedelta(minutes=minutes)
        aware = candidate.replace(tzinfo=tz, fold=0)
        back = aware.astimezone(timezone.utc).astimezone(tz).replace(tzinfo=None)
        if back == candidate:  # exists on the wall clock
            return aware.astimezone(timezone.utc)
    raise ConfigError(f"no valid local time near {wall} in {tz.key}")  # pragma: no cover


class TrainingScheduler:
    """Cron schedules in kiln's SQLite file; :meth:`tick` enqueues due fires.

    Args:
        db_path: The SQLite file (default ``paths.db``).
        paths: kiln's locations.
        misfire_grace_s: A fire older than this at tick time counts as missed.
        clock: Returns the current time (tests pass a fake one).
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None = None,
        *,
        paths: RunPaths | None = None,
        misfire_grace_s: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        self.manager = JobManager(db_path, paths=paths, clock=clock)
        self.store, self.paths = self.manager.store, self.manager.paths
        self.misfire_grace_s = float(misfire_grace_s)

    def now(self) -> datetime:
        return self.manager.now()

    # -- managing schedules -----------------------------------------------------------

    def create_schedule(
        self,
        name: str,
        job_type: str | JobType,
        config: Any,
        schedule_expr: str,
        priority: int = 5,
        timezone: str = "UTC",
        catch_up: str | CatchUp = "latest",
    ) -> int:
        """Validate and store a schedule; return its id. Fires start after now.

        Raises:
            ConfigError: a bad cron expression, an unknown time zone, a taken name,
                or a job config that would not submit (every problem listed).
        """
        errors: list[str] = []
        if not isinstance(name, str) or not name.strip():
            errors.append(f"name={name!r} must be a non-empty string")
        kind = normalized = None
        try:
            kind = JobType.parse(job_type)
            normalized = validate_job_config(kind, config, self.paths)
        except ConfigError as exc:
            errors.extend(exc.errors)
        if not isinstance(schedule_expr, str) or not croniter.is_valid(schedule_expr):
            errors.append(
                f"schedule_expr={schedule_expr!r} is not a cron expression; use five fields "
                "'minute hour day-of-month month day-of-week', e.g. '0 2 * * *' (daily 02:00)"
            )
        errors.extend(_zone_errors(timezone))
        errors.extend(validate_priority(priority))
        if catch_up not in CatchUp._value2member_map_:
            allowed = ", ".join(c.value for c in CatchUp)
            errors.append(f"catch_up={catch_up!r} must be one of: {allowed}")
        with self.store.transaction() as cur:
            taken = list(cur.execute("SELECT schedule_id FROM schedules WHERE name = ?", (name,)))
            if taken:
                errors.append(
                    f"name={name!r} is already schedule {taken[0][0]}; pick another name or "
                    "delete that schedule first"
                )
            if errors or kind is None:
                raise ConfigError(errors)
            cur.execute(
                "INSERT INTO schedules(name, job_type, config, schedule_expr, priority, timezone, "
                "catch_up, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, kind.value, json.dumps(normalized), schedule_expr, priority, timezone,
                 CatchUp(catch_up).value, iso(self.now())),
            )  # fmt: skip
            return int(self.store.connection().last_insert_rowid())

    def get_schedule(self, schedule: int | str) -> Schedule:
        """A schedule by id or name."""
        column = "schedule_id" if isinstance(schedule, int) else "name"
        rows = self.store.query_dicts(
            f"SELECT {_COLUMNS} FROM schedules WHERE {column} = ?", (schedule,)
        )
        if not rows and isinstance(schedule, str) and schedule.isdigit():  # an id from the CLI
            rows = self.store.query_dicts(
                f"SELECT {_COLUMNS} FROM schedules WHERE schedule_id = ?", (int(schedule),)
            )
        if not rows:
            names = [r[0] for r in self.store.query("SELECT name FROM schedules ORDER BY name")]
            raise ScheduleNotFoundError(
                f"no schedule {schedule!r}; schedules: {', '.join(names) or '(none)'}"
            )
        return _schedule(rows[0])

    def list_schedules(self) -> pd.DataFrame:
        """Every schedule with its next fire (local time of its zone)."""
        rows = []
        for raw in self.store.query_dicts(f"SELECT {_COLUMNS} FROM schedules ORDER BY name"):
            s = _schedule(raw)
            row = {k: getattr(s, k) for k in ("schedule_id", "name", "schedule_expr", "timezone")}
            row |= {"job_type": s.job_type.value, "catch_up": s.catch_up.value}
            row |= {"priority": s.priority, "paused": s.paused, "last_fire_at": s.last_fire_at}
            row["next_fire"] = None if s.paused else self.next_fire_times(s.schedule_id, 1)[0]
            rows.append(row)
        columns = ["schedule_id", "name", "schedule_expr", "timezone", "job_type", "catch_up",
                   "priority", "paused", "last_fire_at", "next_fire"]  # fmt: skip
        return pd.DataFrame(rows, columns=columns)

    def next_fire_times(self, schedule: int | str, n: int = 5) -> list[str]:
        """The next ``n`` fires, as ISO 8601 times in the schedule's zone."""
        s = self.get_schedule(schedule)
        tz = ZoneInfo(s.timezone)
        after = max(self.now(), parse_time(s.last_fire_at or s.created_at))
        return [t.astimezone(tz).isoformat() for t in next_fires(s.schedule_expr, tz, after, n)]

    def trigger_schedule(self, schedule: int | str) -> int:
        """Enqueue the schedule's job now (outside its cron times); return the job id."""
        s = self.get_schedule(schedule)
        now = self.now()
        with self.store.transaction() as cur:
            job_id = self.manager._insert(
                cur, s.job_type, s.config, s.priority, 3, None, [], s.schedule_id
            )
            cur.execute(
                "INSERT INTO schedule_fires(schedule_id, fire_key, job_id, fired_at) "
                "VALUES (?, ?, ?, ?)",
                (s.schedule_id, f"manual:{job_id}", job_id, iso(now)),
            )
        return job_id

    def pause(self, schedule: int | str) -> None:
        self._set_paused(schedule, True)

    def resume(self, schedule: int | str) -> None:
        """Resume; fires that fell while it was paused are skipped."""
        self._set_paused(schedule, False)

    def delete_schedule(self, schedule: int | str) -> None:
        s = self.get_schedule(schedule)
        with self.store.transaction() as cur:
            cur.execute("DELETE FROM schedule_fires WHERE schedule_id = ?", (s.schedule_id,))
            cur.execute("DELETE FROM schedules WHERE schedule_id = ?", (s.schedule_id,))

    def _set_paused(self, schedule: int | str, paused: bool) -> None:
        s = self.get_schedule(schedule)
        with self.store.transaction() as cur:
            cur.execute(
                "UPDATE schedules SET paused = ?, last_fire_at = CASE WHEN ? THEN last_fire_at "
                "ELSE ? END WHERE schedule_id = ?",
                (int(paused), int(paused), iso(self.now()), s.schedule_id),
            )

    # -- firing -----------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> list[int]:
        """Enqueue every due fire of every active schedule; return the new job ids."""
        now = parse_time(now) if now is not None else self.now()
        ids = [r[0] for r in self.store.query("SELECT schedule_id FROM schedules WHERE paused = 0")]
        jobs: list[int] = []
        for schedule_id in ids:
            jobs.extend(self._tick_one(schedule_id, now))
        return jobs

    def _tick_one(self, schedule_id: int, now: datetime) -> list[int]:
        jobs = []
        with self.store.transaction() as cur:
            rows = list(
                cur.execute(
                    f"SELECT {_COLUMNS} FROM schedules WHERE schedule_id = ?", (schedule_id,)
                )
            )
            if not rows:
                return []
            s = _schedule(dict(zip(_NAMES, rows[0], strict=True)))
            if s.paused:
                return []
            after = parse_time(s.last_fire_at or s.created_at)
            due = fire_times(s.schedule_expr, ZoneInfo(s.timezone), after, now)
            if not due:
                return []
            grace = now - timedelta(seconds=self.misfire_grace_s)
            missed, on_time = [t for t in due if t < grace], [t for t in due if t >= grace]
            for fire in s.catch_up.select(missed, on_time):
                cur.execute(
                    "INSERT OR IGNORE INTO schedule_fires(schedule_id, fire_key, fired_at) "
                    "VALUES (?, ?, ?)",
                    (schedule_id, iso(fire), iso(now)),
                )
                if self.store.connection().changes() != 1:
                    continue  # another scheduler enqueued this fire
                job_id = self.manager._insert(
                    cur, s.job_type, s.config, s.priority, 3, None, [], schedule_id
                )
                cur.execute(
                    "UPDATE schedule_fires SET job_id = ? WHERE schedule_id = ? AND fire_key = ?",
                    (job_id, schedule_id, iso(fire)),
                )
                jobs.append(job_id)
            cur.execute(
                "UPDATE schedules SET last_fire_at = ? WHERE schedule_id = ?",
                (iso(due[-1]), schedule_id),
            )
        return jobs

    def run(self, poll_s: float = 1.0, stop: threading.Event | None = None) -> None:
        """Tick every ``poll_s`` seconds until ``stop`` is set (``kiln scheduler``)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            self.tick()
            stop.wait(poll_s)


def _zone_errors(name: Any) -> list[str]:
    try:
        if not isinstance(name, str) or not name:
            raise ValueError
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return [
            f"timezone={name!r} is not a known time zone; use an IANA name such as 'UTC', "
            "'Europe/Berlin' or 'America/New_York'"
        ]
    return []


def _schedule(row: dict[str, Any]) -> Schedule:
    return Schedule(
        schedule_id=row["schedule_id"],
        name=row["name"],
        job_type=JobType(row["job_type"]),
        config=json.loads(row["config"]),
        schedule_expr=row["schedule_expr"],
        priority=row["priority"],
        timezone=row["timezone"],
        catch_up=CatchUp(row["catch_up"]),
        paused=bool(row["paused"]),
        created_at=row["created_at"],
        last_fire_at=row["last_fire_at"],
    )
