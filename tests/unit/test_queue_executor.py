"""JobExecutor's loop against a fake launcher: outcomes, timeouts, lost leases, stop."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kiln.paths import RunPaths
from kiln.queue import JobExecutor, JobManager, JobStatus
from kiln.queue.run_job import MARKER, parse_outcome


class FakeRun:
    def __init__(self, log_path, outcome, code=0, seconds=0.0):
        self.log_path, self.outcome, self.code = log_path, outcome, code
        self.ends = time.monotonic() + seconds
        self.stopped = False
        self.ray_job_id = None

    def poll(self):
        if self.stopped:
            return -15
        return self.code if time.monotonic() >= self.ends else None

    def stop(self):
        self.stopped = True

    def logs(self):
        text = "some output\n" + (MARKER + json.dumps(self.outcome) if self.outcome else "")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text(text)
        return text


class FakeLauncher:
    def __init__(self, **run_kw):
        self.run_kw, self.runs = run_kw, []

    def start(self, argv, log_path, job_id, attempt):
        assert argv[1:3] == ["-m", "kiln.queue.run_job"] and str(job_id) in argv
        self.runs.append(FakeRun(log_path, **self.run_kw))
        return self.runs[-1]


@pytest.fixture()
def jm(tmp_path):
    return JobManager(paths=RunPaths.resolve(tmp_path / "home"), lease_s=0.3, backoff_base_s=0)


def test_a_result_line_completes_the_job(jm):
    job_id = jm.submit_job("noop", {})
    launcher = FakeLauncher(outcome={"ok": True, "result": "run-1", "details": {"run_id": 4}})
    assert JobExecutor(jm, launcher=launcher).run_worker(max_jobs=1)["completed"] == 1
    job = jm.get_job(job_id)
    assert (job.status, job.result, job.details) == (JobStatus.COMPLETED, "run-1", {"run_id": 4})
    assert job.log_path.endswith(f"job-{job_id}-attempt-1.log")


def test_a_failure_is_retried_then_failed_with_the_jobs_error(jm):
    job_id = jm.submit_job("noop", {}, max_retries=1)
    launcher = FakeLauncher(outcome={"ok": False, "error": "ConfigError: bad"}, code=1)
    counts = JobExecutor(jm, launcher=launcher).run_worker(max_jobs=2, poll_s=0.01)
    assert counts["failed"] == 2 and len(launcher.runs) == 2
    job = jm.get_job(job_id)
    assert (job.status, job.error_message, job.attempt) == (JobStatus.FAILED, "ConfigError: bad", 2)


def test_an_exit_without_a_result_line_fails_and_points_at_the_log(jm):
    job_id = jm.submit_job("noop", {}, max_retries=0)
    JobExecutor(jm, launcher=FakeLauncher(outcome=None, code=-9)).run_worker(max_jobs=1)
    error = jm.get_job(job_id).error_message
    assert "exited with status -9 without a result" in error and "job-1-attempt-1.log" in error


def test_renewals_keep_a_long_job_and_a_lost_lease_stops_it(jm):
    job_id = jm.submit_job("noop", {})
    launcher = FakeLauncher(outcome={"ok": True, "result": "r"}, seconds=1.0)  # > 3 leases
    assert JobExecutor(jm, launcher=launcher).run_worker(max_jobs=1)["completed"] == 1
    other = jm.submit_job("noop", {})
    slow = FakeLauncher(outcome={"ok": True}, seconds=30)
    executor = JobExecutor(jm, launcher=slow)
    job = jm.claim_job("w")
    assert job.job_id == other
    threading.Timer(0.2, lambda: JobManager(paths=jm.paths).cancel_job(other)).start()
    assert executor.run_job(job, timeout_s=60) == "lost" and slow.runs[0].stopped
    assert jm.get_job(other).status is JobStatus.CANCELLED
    assert jm.get_job(job_id).status is JobStatus.COMPLETED


def test_timeout_stops_and_fails_without_retry(jm):
    job_id = jm.submit_job("noop", {}, max_retries=5)
    launcher = FakeLauncher(outcome={"ok": True}, seconds=30)
    JobExecutor(jm, launcher=launcher).run_worker(max_jobs=1, timeout_minutes=0.2 / 60)
    job = jm.get_job(job_id)
    assert launcher.runs[0].stopped and job.status is JobStatus.FAILED
    assert job.error_message.startswith("timed out after 0.00333333 minutes")


def test_stop_hands_the_job_back_after_the_grace_period(jm):
    job_id = jm.submit_job("noop", {})
    launcher = FakeLauncher(outcome={"ok": True}, seconds=30)
    executor = JobExecutor(jm, launcher=launcher, stop_grace_s=0.1)
    job = jm.claim_job("w")
    executor.stop()
    assert executor.run_job(job, timeout_s=60) == "requeued"
    assert jm.get_job(job_id).status is JobStatus.PENDING
    assert executor.run_worker() == {"completed": 0, "failed": 0, "requeued": 0, "lost": 0}


def test_a_job_cancelled_before_it_starts_is_not_started(jm):
    job_id = jm.submit_job("noop", {})
    job = jm.claim_job("w")
    jm.cancel_job(job_id)
    launcher = FakeLauncher(outcome={"ok": True})
    assert JobExecutor(jm, launcher=launcher).run_job(job, 60) == "lost" and not launcher.runs


def test_a_launch_that_raises_is_a_failed_attempt(jm):
    class Broken:
        def start(self, *args):
            raise OSError("no such interpreter")

    job_id = jm.submit_job("noop", {}, max_retries=0)
    JobExecutor(jm, launcher=Broken()).run_worker(max_jobs=1)
    assert jm.get_job(job_id).error_message == "could not start: no such interpreter"


def test_idle_exit_and_parse_outcome(jm):
    started = time.monotonic()
    assert JobExecutor(jm, launcher=FakeLauncher(outcome=None)).run_worker(
        idle_exit_s=0.2, poll_s=0.05
    ) == {"completed": 0, "failed": 0, "requeued": 0, "lost": 0}  # fmt: skip
    assert time.monotonic() - started < 5
    assert parse_outcome('x\nKILN_JOB_RESULT {"ok": true}\ntrailing') == {"ok": True}
    assert parse_outcome("no marker") is None


def test_the_scheduler_ticks_while_a_job_runs(jm):
    jm.submit_job("noop", {})
    ticks = []
    launcher = FakeLauncher(outcome={"ok": True}, seconds=0.5)
    JobExecutor(jm, launcher=launcher).run_worker(
        max_jobs=1, poll_s=0.05, tick=lambda: ticks.append(1)
    )
    assert len(ticks) >= 4  # every poll_s, not only between jobs
