"""JobManager: validation at submit, claim order, leases, fencing, backoff, cancel, retry."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest

from kiln.errors import ConfigError, JobNotFoundError, JobStateError, LeaseLostError
from kiln.paths import RunPaths
from kiln.queue import Job, JobManager, JobStatus, JobType

NOOP = {"seconds": 0}


class FakeClock:
    def __init__(self) -> None:
        self.t = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@pytest.fixture()
def clock():
    return FakeClock()


@pytest.fixture()
def paths(tmp_path):
    return RunPaths.resolve(tmp_path / "home")


@pytest.fixture()
def jm(paths, clock):
    return JobManager(paths=paths, clock=clock, lease_s=30, backoff_base_s=10, backoff_max_s=25)


def submit(jm, clock, **kw):
    job_id = jm.submit_job("noop", kw.pop("config", NOOP), **kw)
    clock.advance(0.001)  # distinct created_at
    return job_id


# -- the record ---------------------------------------------------------------------------


def test_job_carries_every_seed_field_and_is_frozen(jm, clock):
    job = jm.get_job(submit(jm, clock, priority=7, max_retries=2))
    seed = {
        "job_id", "job_type", "status", "priority", "config", "created_at", "started_at",
        "completed_at", "error_message", "worker_id", "retry_count", "max_retries",
    }  # fmt: skip
    assert seed | {"result"} <= {f.name for f in dataclasses.fields(Job)}
    assert job.job_type is JobType.NOOP and job.status is JobStatus.PENDING
    assert job.status == "pending"  # str enum: compares like the seed's strings
    assert (job.priority, job.max_retries, job.retry_count, job.config) == (7, 2, 0, NOOP)
    assert datetime.fromisoformat(job.created_at).tzinfo is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.status = JobStatus.RUNNING  # type: ignore[misc]


def test_status_enum_behaviour():
    assert not JobStatus.PENDING.is_terminal and not JobStatus.RUNNING.is_terminal
    assert all(s.is_terminal for s in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED))
    assert JobStatus.FAILED.can_retry and not JobStatus.COMPLETED.can_retry
    assert JobStatus.RUNNING.can_cancel and not JobStatus.CANCELLED.can_cancel
    assert JobType.EXPORT.needs_model and not JobType.TRAINING.needs_model


# -- validation at submit -----------------------------------------------------------------


def test_unknown_type_and_bad_priority_raise_at_submit(jm):
    with pytest.raises(ConfigError, match=r"job_type='trianing' is not a job type.*training"):
        jm.submit_job("trianing", {})
    with pytest.raises(ConfigError) as info:
        jm.submit_job("noop", {"seconds": -1, "sleep": 3}, priority=11, max_retries=-1)
    text = str(info.value)
    assert "priority=11 must be an integer from 1" in text
    assert "max_retries=-1" in text and "config.seconds=-1" in text and "config.sleep" in text
    assert len(info.value.errors) == 4  # every problem at once
    with pytest.raises(ConfigError, match="priority=True"):
        jm.submit_job("noop", {}, priority=True)
    assert jm.counts()["pending"] == 0


def test_training_config_is_checked_at_submit(jm, tmp_path):
    with pytest.raises(ConfigError, match=r"learning_rat.*learning_rate"):
        jm.submit_job("training", {"dataset": "digits", "learning_rat": 0.1})
    with pytest.raises(ConfigError, match="epochs"):
        jm.submit_job("training", {"training_config": {"dataset": "digits", "epochs": -1}})
    with pytest.raises(ConfigError, match="does not exist"):
        jm.submit_job("training", str(tmp_path / "missing.yaml"))
    run_file = tmp_path / "run.yaml"
    run_file.write_text("dataset: digits\nepochs: 2\ntask:\n  task_type: classification\n")
    job = jm.get_job(jm.submit_job("training", str(run_file)))
    assert job.config == {"dataset": "digits", "epochs": 2, "task": {"task_type": "classification"}}
    seed_form = {
        "training_config": {"dataset": "digits", "epochs": 3},
        "task": {"task_type": "classification"},
    }
    job = jm.get_job(jm.submit_job("training", seed_form))
    assert job.config == {"dataset": "digits", "epochs": 3, "task": {"task_type": "classification"}}


def test_model_references_must_exist_at_submit(jm, paths, tmp_path):
    from kiln.tracking import ModelRegistry

    with pytest.raises(ConfigError, match=r"config.model='digits@production': no model named"):
        jm.submit_job("evaluation", {"model": "digits@production", "dataset": "digits"})
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"w")
    ModelRegistry(paths.db, paths.artifacts).register_model("digits", ckpt, tags=["production"])
    with pytest.raises(ConfigError, match="holds tag 'staging'"):
        jm.submit_job("export", {"model": "digits@staging"})
    with pytest.raises(ConfigError, match=r"config.formats='onnx,tflite'"):
        jm.submit_job("export", {"model": "digits@production", "formats": "onnx,tflite"})
    with pytest.raises(ConfigError, match=r"config.dataset='nope'"):
        jm.submit_job("evaluation", {"model": "digits:1.0.0", "dataset": "nope"})
    with pytest.raises(ConfigError, match=r"trigger.drift_threshold=2"):
        jm.submit_job(
            "retraining",
            {"model": "digits@production", "data": "new/*.parquet", "holdout": "h.parquet",
             "trigger": {"drift_threshold": 2}},
        )  # fmt: skip
    assert jm.submit_job("evaluation", {"model": "digits:1.0.0", "dataset": "digits"}) > 0


# -- claiming -----------------------------------------------------------------------------


def test_claim_takes_highest_priority_then_oldest(jm, clock):
    low = submit(jm, clock, priority=2)
    high_old = submit(jm, clock, priority=9)
    mid = submit(jm, clock, priority=5)
    high_new = submit(jm, clock, priority=9)
    order = [jm.claim_job("w").job_id for _ in range(4)]
    assert order == [high_old, high_new, mid, low]
    assert jm.claim_job("w") is None


def test_claim_sets_worker_lease_and_a_new_attempt(jm, clock):
    job_id = submit(jm, clock)
    job = jm.claim_job("worker-1")
    assert (job.job_id, job.status, job.worker_id, job.attempt) == (
        job_id,
        "running",
        "worker-1",
        1,
    )
    assert job.started_at == jm.get_job(job_id).started_at
    assert datetime.fromisoformat(job.lease_expires_at) == clock.t + timedelta(seconds=30)


def test_not_before_and_dependencies_hold_jobs_back(jm, clock):
    later = submit(jm, clock, not_before=clock.t + timedelta(minutes=5), priority=10)
    first = submit(jm, clock, priority=1)
    second = submit(jm, clock, priority=10, depends_on=first)
    job = jm.claim_job("w")
    assert job.job_id == first  # `later` is not due, `second` waits for `first`
    assert jm.claim_job("w") is None
    jm.complete_job(first, job.attempt, result="ok")
    assert jm.claim_job("w").job_id == second
    clock.advance(301)
    assert jm.claim_job("w").job_id == later
    with pytest.raises(JobNotFoundError):
        jm.submit_job("noop", NOOP, depends_on=999)


def test_a_failed_dependency_fails_its_dependents(jm, clock):
    first = submit(jm, clock, max_retries=0)
    second = submit(jm, clock, depends_on=[first])
    job = jm.claim_job("w")
    assert jm.fail_job(first, job.attempt, "boom") is JobStatus.FAILED
    dependent = jm.get_job(second)
    assert dependent.status is JobStatus.FAILED and "dependency job" in dependent.error_message
    assert dependent.depends_on == (first,)


# -- leases and fencing -------------------------------------------------------------------


def test_expired_lease_goes_back_to_pending_then_fails_when_retries_are_spent(jm, clock):
    job_id = submit(jm, clock, max_retries=1)
    first = jm.claim_job("dead")
    clock.advance(31)
    second = jm.claim_job("alive")  # reaps the expired lease, then claims the job again
    assert second.job_id == job_id and second.attempt == first.attempt + 1
    assert second.retry_count == 1 and second.worker_id == "alive"
    with pytest.raises(LeaseLostError, match="attempt 1 no longer holds it"):
        jm.complete_job(job_id, first.attempt, result="late")  # the dead worker's report
    assert jm.get_job(job_id).status is JobStatus.RUNNING and jm.get_job(job_id).result is None
    clock.advance(31)
    assert jm.reap_expired() == 1
    job = jm.get_job(job_id)
    assert job.status is JobStatus.FAILED and "retries spent" in job.error_message


def test_renewal_keeps_the_lease_and_reports_loss(jm, clock):
    job_id = submit(jm, clock)
    job = jm.claim_job("w")
    for _ in range(5):
        clock.advance(20)
        assert jm.renew_lease(job_id, job.attempt)
    assert jm.claim_job("other") is None  # still held
    assert jm.get_job(job_id).status is JobStatus.RUNNING
    jm.cancel_job(job_id)
    assert not jm.renew_lease(job_id, job.attempt)
    assert not jm.holds(job_id, job.attempt)


def test_stale_fail_and_release_change_nothing(jm, clock):
    job_id = submit(jm, clock)
    old = jm.claim_job("a")
    clock.advance(31)
    new = jm.claim_job("b")
    before = jm.get_job(job_id)
    for report in (
        lambda: jm.fail_job(job_id, old.attempt, "x"),
        lambda: jm.release_job(job_id, old.attempt),
        lambda: jm.note_run(job_id, old.attempt, log_path="/tmp/x"),
    ):
        with pytest.raises(LeaseLostError):
            report()
    assert jm.get_job(job_id) == before
    jm.complete_job(job_id, new.attempt, result="r", details={"k": 1})
    done = jm.get_job(job_id)
    assert (done.status, done.result, done.details) == (JobStatus.COMPLETED, "r", {"k": 1})
    assert done.completed_at is not None and done.lease_expires_at is None


# -- failure, backoff, cancel, retry ------------------------------------------------------


def test_failures_back_off_exponentially_with_a_cap(jm, clock):
    job_id = submit(jm, clock, max_retries=3)
    delays = []
    for _ in range(3):
        job = jm.claim_job("w")
        failed_at = clock.t
        assert jm.fail_job(job_id, job.attempt, "boom") is JobStatus.PENDING
        not_before = datetime.fromisoformat(jm.get_job(job_id).not_before)
        delays.append((not_before - failed_at).total_seconds())
        assert jm.claim_job("w") is None  # not due yet
        clock.advance(delays[-1])
    assert delays == [10, 20, 25]  # 10 * 2**n, capped at 25
    job = jm.claim_job("w")
    assert jm.fail_job(job_id, job.attempt, "boom again") is JobStatus.FAILED
    final = jm.get_job(job_id)
    assert (final.status, final.retry_count, final.error_message) == ("failed", 3, "boom again")


def test_a_timeout_fails_without_retry(jm, clock):
    job_id = submit(jm, clock, max_retries=3)
    job = jm.claim_job("w")
    assert jm.fail_job(job_id, job.attempt, "timed out", retry=False) is JobStatus.FAILED


def test_cancel_and_retry(jm, clock):
    pending = submit(jm, clock)
    assert jm.cancel_job(pending).status is JobStatus.CANCELLED
    with pytest.raises(JobStateError, match="only pending or running"):
        jm.cancel_job(pending)
    again = jm.retry_job(pending)
    assert again.status is JobStatus.PENDING and again.error_message is None
    job = jm.claim_job("w")
    jm.complete_job(pending, job.attempt, result="done")
    with pytest.raises(JobStateError, match="only failed or cancelled"):
        jm.retry_job(pending)
    with pytest.raises(JobNotFoundError, match="no job with id 42"):
        jm.get_job(42)


def test_release_hands_the_job_back_without_spending_a_retry(jm, clock):
    job_id = submit(jm, clock)
    job = jm.claim_job("w")
    jm.release_job(job_id, job.attempt, "SIGTERM")
    back = jm.get_job(job_id)
    assert back.status is JobStatus.PENDING and back.retry_count == 0
    assert jm.claim_job("w2").attempt == job.attempt + 1


def test_list_jobs_filters_and_is_newest_first(jm, clock):
    ids = [submit(jm, clock) for _ in range(3)]
    jm.cancel_job(ids[0])
    frame = jm.list_jobs()
    assert list(frame["job_id"]) == ids[::-1]
    assert list(jm.list_jobs(status="cancelled")["job_id"]) == [ids[0]]
    assert len(jm.list_jobs(job_type="noop", limit=2)) == 2
    assert {"status", "worker_id", "attempt", "result", "log_path"} <= set(frame.columns)
    assert frame["status"].tolist() == ["pending", "pending", "cancelled"]
    with pytest.raises(ConfigError, match="status='done'"):
        jm.list_jobs(status="done")


def test_a_second_manager_on_the_same_file_sees_the_queue(paths, clock):
    a = JobManager(paths=paths, clock=clock)
    b = JobManager(paths.db, paths=paths, clock=clock)
    job_id = a.submit_job("noop", NOOP)
    assert b.claim_job("w").job_id == job_id
