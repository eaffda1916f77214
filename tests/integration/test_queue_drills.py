"""Queue drills with real processes: exactly-once under contention, kill -9, two schedulers,
timeouts and cancellation of a running job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from kiln.errors import LeaseLostError
from kiln.paths import RunPaths
from kiln.queue import JobExecutor, JobManager, JobStatus, TrainingScheduler

pytestmark = pytest.mark.integration

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")
ENV = {**os.environ, "PYTHONPATH": PLATFORM + os.pathsep + os.environ.get("PYTHONPATH", "")}

SUBMIT_AND_WORK = textwrap.dedent(
    """
    import json, sys, time
    from kiln.paths import RunPaths
    from kiln.queue.manager import JobManager
    home, n, total, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    m = JobManager(paths=RunPaths.resolve(home))
    while not __import__("os").path.exists(go):
        time.sleep(0.005)
    ids = [m.submit_job("noop", {"seconds": 0}) for _ in range(n)]
    done, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        job = m.claim_job(f"w{n}")
        if job is None:
            if m.counts()["completed"] >= total:
                break
            time.sleep(0.005)
            continue
        m.complete_job(job.job_id, job.attempt, "ok")
        done.append(job.job_id)
    print(json.dumps({"submitted": ids, "done": done}))
    """
)


def _spawn(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        **kw,
    )


def test_four_processes_submit_and_work_2000_jobs_exactly_once(tmp_path):
    home, go = tmp_path / "home", tmp_path / "go"
    JobManager(paths=RunPaths.resolve(home))  # schema in place before the race
    procs = [_spawn(SUBMIT_AND_WORK, str(home), "500", "2000", str(go)) for _ in range(4)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert "database is locked" not in err
    results = [json.loads(out) for out, _ in outs]
    submitted = [i for r in results for i in r["submitted"]]
    done = [i for r in results for i in r["done"]]
    assert len(submitted) == len(set(submitted)) == 2000  # ids unique, none lost
    assert sorted(done) == sorted(submitted)  # each completed exactly once
    assert sum(1 for r in results if r["done"]) >= 2  # the work was really shared
    manager = JobManager(paths=RunPaths.resolve(home))
    assert manager.counts() == {"pending": 0, "running": 0, "completed": 2000, "failed": 0,
                                "cancelled": 0}  # fmt: skip
    attempts = manager.store.query("SELECT DISTINCT attempt FROM jobs")
    assert attempts == [(1,)]  # nobody claimed a job twice


EXECUTOR = textwrap.dedent(
    """
    import sys
    from kiln.paths import RunPaths
    from kiln.queue import JobExecutor, JobManager
    m = JobManager(paths=RunPaths.resolve(sys.argv[1]), lease_s=3.0)
    JobExecutor(m, worker_id="doomed").run_worker(max_jobs=1, poll_s=0.05)
    """
)


def test_kill_9_of_an_executor_holding_a_job(tmp_path):
    paths = RunPaths.resolve(tmp_path / "home")
    manager = JobManager(paths=paths, lease_s=1.5)
    job_id = manager.submit_job("noop", {"seconds": 2.0, "result": "done"}, max_retries=2)
    doomed = _spawn(EXECUTOR, str(paths.home))
    deadline = time.monotonic() + 30

    def started() -> bool:  # its job process is up and printing
        log = manager.get_job(job_id).log_path
        return bool(log) and Path(log).is_file() and "kiln: job" in Path(log).read_text()

    while not started():
        assert time.monotonic() < deadline and doomed.poll() is None
        time.sleep(0.05)
    first = manager.get_job(job_id)
    assert first.status is JobStatus.RUNNING
    assert first.worker_id == "doomed" and first.attempt == 1
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    assert manager.claim_job("early") is None  # the lease still holds
    # The survivor polls until the dead worker's lease (3 s after its last renewal) expires.
    survivor = JobExecutor(manager, worker_id="survivor")
    assert survivor.run_worker(max_jobs=1, poll_s=0.05, idle_exit_s=30) == {
        "completed": 1, "failed": 0, "requeued": 0, "lost": 0,
    }  # fmt: skip
    job = manager.get_job(job_id)
    assert (job.status, job.worker_id, job.attempt, job.retry_count) == (
        JobStatus.COMPLETED, "survivor", 2, 1,
    )  # fmt: skip
    assert job.result == "done"
    with pytest.raises(LeaseLostError):  # the dead worker's late report
        manager.complete_job(job_id, first.attempt, result="late")
    assert manager.get_job(job_id).result == "done"
    first_log = Path(first.log_path).read_text()
    assert "KILN_JOB_RESULT" not in first_log  # the orphaned run died with its executor


TICK = textwrap.dedent(
    """
    import json, os, sys, time
    from kiln.paths import RunPaths
    from kiln.queue import TrainingScheduler
    s = TrainingScheduler(paths=RunPaths.resolve(sys.argv[1]))
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.002)
    print(json.dumps(s.tick()))
    """
)


def test_two_scheduler_processes_enqueue_each_fire_once(tmp_path):
    paths = RunPaths.resolve(tmp_path / "home")
    past = datetime.now(timezone.utc) - timedelta(minutes=10, seconds=30)
    sched = TrainingScheduler(paths=paths, clock=lambda: past)
    sched.create_schedule("every-minute", "noop", {"seconds": 0}, "* * * * *", catch_up="all")
    go = tmp_path / "go"
    procs = [_spawn(TICK, str(paths.home), str(go)) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    a, b = (json.loads(out) for out, _ in outs)
    assert 10 <= len(a) + len(b) <= 11 and not set(a) & set(b)  # 10 or 11 whole minutes
    manager = JobManager(paths=paths)
    assert manager.counts()["pending"] == len(a) + len(b)
    fires = manager.store.query("SELECT fire_key, job_id FROM schedule_fires")
    assert sorted(j for _, j in fires) == sorted(a + b)


def test_a_job_over_its_timeout_is_stopped_and_failed_with_the_reason(tmp_path):
    manager = JobManager(paths=RunPaths.resolve(tmp_path / "home"))
    job_id = manager.submit_job("noop", {"seconds": 60}, max_retries=3)
    started = time.monotonic()
    counts = JobExecutor(manager).run_worker(max_jobs=1, timeout_minutes=2 / 60, poll_s=0.05)
    assert counts["failed"] == 1 and time.monotonic() - started < 20
    job = manager.get_job(job_id)
    assert job.status is JobStatus.FAILED and job.retry_count == 0
    assert job.error_message.startswith("timed out after")
    assert Path(job.log_path).is_file()  # kept; what it holds depends on how far it got


def test_cancelling_a_running_job_stops_its_run(tmp_path):
    manager = JobManager(paths=RunPaths.resolve(tmp_path / "home"), lease_s=0.6)
    job_id = manager.submit_job("noop", {"seconds": 60})
    executor = JobExecutor(manager)
    counts: dict = {}
    thread = threading.Thread(target=lambda: counts.update(executor.run_worker(max_jobs=1)))
    thread.start()
    deadline = time.monotonic() + 30
    while manager.get_job(job_id).status is not JobStatus.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    manager.cancel_job(job_id)
    thread.join(20)
    assert not thread.is_alive() and counts["lost"] == 1
    job = manager.get_job(job_id)
    assert job.status is JobStatus.CANCELLED and job.result is None


def test_sigterm_hands_the_running_job_back(tmp_path):
    paths = RunPaths.resolve(tmp_path / "home")
    manager = JobManager(paths=paths)
    job_id = manager.submit_job("noop", {"seconds": 60})
    code = EXECUTOR.replace('worker_id="doomed"', 'worker_id="w", stop_grace_s=0.2')
    proc = _spawn(code, str(paths.home))
    deadline = time.monotonic() + 30
    while manager.get_job(job_id).status is not JobStatus.RUNNING:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    job = manager.get_job(job_id)
    assert job.status is JobStatus.PENDING and job.retry_count == 0
    assert "handed back" in job.error_message
