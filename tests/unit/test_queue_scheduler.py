"""TrainingScheduler: cron + time zones, DST in both directions, catch-up, exactly-once fires."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from kiln.errors import ConfigError, ScheduleNotFoundError
from kiln.paths import RunPaths
from kiln.queue import CatchUp, JobManager, TrainingScheduler
from kiln.queue.scheduler import fire_times

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NOOP = {"seconds": 0}


class FakeClock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture()
def paths(tmp_path):
    return RunPaths.resolve(tmp_path / "home")


def make(paths, start: datetime, **kw):
    clock = FakeClock(start)
    return TrainingScheduler(paths=paths, clock=clock, **kw), clock


def local(*args, tz=BERLIN) -> datetime:
    return datetime(*args, tzinfo=tz)


# -- cron and time zones -----------------------------------------------------------------


def test_daily_fires_at_local_time_in_its_zone():
    fires = fire_times("0 2 * * *", BERLIN, local(2026, 1, 10, 12), local(2026, 1, 13, 12))
    assert [f.astimezone(BERLIN).strftime("%d %H:%M %z") for f in fires] == [
        "11 02:00 +0100", "12 02:00 +0100", "13 02:00 +0100",
    ]  # fmt: skip
    assert fires[0] == datetime(2026, 1, 11, 1, tzinfo=UTC)


def test_spring_forward_a_skipped_time_fires_once_when_the_clock_jumps():
    # 2026-03-29 in Berlin: 02:00 CET -> 03:00 CEST, so 02:30 never shows on the clock.
    fires = fire_times("30 2 * * *", BERLIN, local(2026, 3, 27, 12), local(2026, 3, 30, 12))
    shown = [f.astimezone(BERLIN).strftime("%d %H:%M %z") for f in fires]
    assert shown == ["28 02:30 +0100", "29 03:00 +0200", "30 02:30 +0200"]
    hourly = fire_times("0 * * * *", BERLIN, local(2026, 3, 29, 0, 30), local(2026, 3, 29, 4, 30))
    assert [f.astimezone(BERLIN).hour for f in hourly] == [1, 3, 4]  # 02:00 and 03:00 are one


def test_fall_back_a_repeated_time_fires_once_at_its_first_occurrence():
    # 2026-10-25 in Berlin: 03:00 CEST -> 02:00 CET, so 02:30 shows twice.
    fires = fire_times("30 2 * * *", BERLIN, local(2026, 10, 23, 12), local(2026, 10, 26, 12))
    shown = [f.astimezone(BERLIN).strftime("%d %H:%M %z") for f in fires]
    assert shown == ["24 02:30 +0200", "25 02:30 +0200", "26 02:30 +0100"]


def test_fall_back_day_ticking_through_the_repeated_hour_enqueues_once(paths):
    start = datetime(2026, 10, 24, 12, tzinfo=UTC)
    sched, clock = make(paths, start)
    sched.create_schedule("nightly", "noop", NOOP, "30 2 * * *", timezone="Europe/Berlin")
    jobs = []
    t = start
    while t < datetime(2026, 10, 25, 6, tzinfo=UTC):  # every 5 minutes through the night
        t += timedelta(minutes=5)
        clock.t = t
        jobs += sched.tick()
    assert len(jobs) == 1
    assert sched.manager.get_job(jobs[0]).created_at.startswith("2026-10-25T00:30")


# -- catch-up and exactly once -----------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"), [("all", 3), ("latest", 1), ("none", 0)]
)  # fmt: skip
def test_missed_fires_follow_the_catch_up_policy(paths, policy, expected):
    start = datetime(2026, 1, 1, 12, tzinfo=UTC)
    sched, clock = make(paths, start)
    sid = sched.create_schedule("s", "noop", NOOP, "0 * * * *", catch_up=policy)
    clock.t = start + timedelta(hours=3, minutes=30)  # 13:00, 14:00, 15:00 were missed
    jobs = sched.tick()
    assert len(jobs) == expected
    assert sched.tick() == []  # consumed, whatever the policy
    clock.t = datetime(2026, 1, 1, 16, 0, 20, tzinfo=UTC)  # on time: every policy fires
    assert len(sched.tick()) == 1
    if policy == "latest":
        job = sched.manager.get_job(jobs[0])
        assert job.schedule_id == sid and job.created_at.startswith("2026-01-01T15:30")


def test_two_schedulers_enqueue_a_fire_once(paths):
    start = datetime(2026, 1, 1, 12, tzinfo=UTC)
    a, clock = make(paths, start)
    b = TrainingScheduler(paths=paths, clock=clock)
    a.create_schedule("s", "noop", NOOP, "*/5 * * * *")
    clock.t = start + timedelta(minutes=5, seconds=1)
    assert len(a.tick()) + len(b.tick()) == 1
    assert JobManager(paths=paths).counts()["pending"] == 1


def test_a_fire_key_is_unique_even_if_the_cursor_is_rewound(paths):
    start = datetime(2026, 1, 1, 12, tzinfo=UTC)
    sched, clock = make(paths, start)
    sid = sched.create_schedule("s", "noop", NOOP, "*/5 * * * *")
    clock.t = start + timedelta(minutes=5, seconds=1)
    assert len(sched.tick()) == 1
    with sched.store.transaction() as cur:  # a scheduler that read the old cursor
        cur.execute("UPDATE schedules SET last_fire_at = created_at WHERE schedule_id = ?", (sid,))
    assert sched.tick() == []


# -- managing ----------------------------------------------------------------------------


def test_bad_cron_zone_and_duplicate_name_raise_at_create(paths):
    sched, _ = make(paths, datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(ConfigError) as info:
        sched.create_schedule("s", "noop", NOOP, "61 * * * *", timezone="Mars/Olympus",
                              catch_up="some", priority=0)  # fmt: skip
    text = str(info.value)
    assert "schedule_expr='61 * * * *' is not a cron expression" in text
    assert "timezone='Mars/Olympus' is not a known time zone" in text
    assert "catch_up='some'" in text and "priority=0" in text
    sched.create_schedule("s", "noop", NOOP, "0 2 * * *")
    with pytest.raises(ConfigError, match="name='s' is already schedule 1"):
        sched.create_schedule("s", "noop", NOOP, "0 3 * * *")
    with pytest.raises(ConfigError, match="learning_rat"):
        sched.create_schedule(
            "t", "training", {"dataset": "digits", "learning_rat": 1}, "0 2 * * *"
        )


def test_pause_resume_trigger_delete_and_next_fires(paths):
    start = datetime(2026, 3, 27, 12, tzinfo=UTC)
    sched, clock = make(paths, start)
    sid = sched.create_schedule("nightly", "noop", NOOP, "30 2 * * *", timezone="Europe/Berlin")
    assert sched.next_fire_times("nightly", 3) == [
        "2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00",
    ]  # fmt: skip
    sched.pause(sid)
    clock.t = start + timedelta(days=2)
    assert sched.tick() == []
    sched.resume("nightly")  # fires while paused are skipped
    assert sched.tick() == []
    job_id = sched.trigger_schedule("nightly")
    assert sched.manager.get_job(job_id).schedule_id == sid
    frame = sched.list_schedules()
    assert frame.loc[0, "name"] == "nightly" and frame.loc[0, "next_fire"].startswith("2026-03-30")
    assert sched.get_schedule(sid).catch_up is CatchUp.LATEST
    sched.delete_schedule("nightly")
    with pytest.raises(ScheduleNotFoundError, match="no schedule 'nightly'"):
        sched.get_schedule("nightly")
