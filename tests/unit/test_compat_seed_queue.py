"""The job queue, scheduler and retraining examples of the older training API, run as
written with ``utils.training.*`` imports mapped to ``kiln.queue``.

One test per example: ``JobManager`` / ``JobExecutor``, ``TrainingScheduler``, the
``Job`` fields, ``RetrainingTrigger`` and the scheduled-retraining workflow. The
examples' ``jobs.db`` is a relative path, so each test runs in its own folder. The
executor's ``run_worker(max_jobs=10, ...)`` waits for more jobs once the queue is
empty; the tests add ``idle_exit_s`` so it returns then. The first example's job runs
as the executor's child process; the workflow's runs in this process (the same
``run_job`` the child runs), which saves the child's start-up of torch and Ray.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from kiln import TrainingConfigBuilder


@pytest.fixture(autouse=True)
def _in_tmp(kiln_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # 'jobs.db' lands here; runs go under KILN_HOME
    return tmp_path


class InProcessLauncher:
    """Runs a job's ``python -m kiln.queue.run_job`` command in this process."""

    def start(self, argv, log_path, job_id, attempt):
        from kiln.queue.run_job import MARKER, paths_from_json, run

        paths = paths_from_json(argv[argv.index("--paths") + 1])
        outcome = run(job_id, paths)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(MARKER + json.dumps(outcome, default=str) + "\n")
        return _Finished(log_path)


class _Finished:
    ray_job_id = None

    def __init__(self, log_path):
        self.log_path = log_path

    def poll(self):
        return 0

    def stop(self):
        pass

    def logs(self):
        return self.log_path.read_text()


def _config():
    """A tiny training run: one epoch of iris (the examples' ``config``)."""
    return (
        TrainingConfigBuilder.quick_prototype()
        .with_training(epochs=1, batch_size=50)
        .with_data(dataset="iris")
        .with_model(model_name="mlp", model={"hidden": [8]})
        .build()
    )


def test_job_manager_submit_monitor_and_execute(tmp_path, capsys):
    from kiln.queue import JobExecutor, JobManager

    config = _config()
    # Submit jobs
    manager = JobManager("jobs.db")

    job_id = manager.submit_job(
        job_type="training",
        config={"training_config": config.to_dict()},
        priority=5,  # 1-10, higher = more urgent
        max_retries=3,
    )

    # Monitor
    job = manager.get_job(job_id)
    print(f"Status: {job.status}")  # pending, running, completed, failed
    assert capsys.readouterr().out == "Status: pending\n"

    # Execute (worker process)
    executor = JobExecutor(manager, worker_id="worker-1")
    counts = executor.run_worker(max_jobs=10, timeout_minutes=60, poll_s=0.1, idle_exit_s=0.2)

    assert (tmp_path / "jobs.db").is_file()
    job = manager.get_job(job_id)
    assert counts["completed"] == 1, job.error_message
    assert (job.status, job.worker_id, job.retry_count) == ("completed", "worker-1", 0)
    assert job.result.startswith(config.run_name or "")  # the run's name
    assert job.details["final_metrics"]["epoch"] == 1 and job.details["checkpoint_path"]


def test_training_scheduler_create_list_trigger():
    from kiln.queue import JobManager, TrainingScheduler

    config = _config()
    scheduler = TrainingScheduler("jobs.db")

    # Schedule periodic retraining
    schedule_id = scheduler.create_schedule(
        name="daily-retrain",
        job_type="training",
        config={"training_config": config.to_dict()},
        schedule_expr="0 2 * * *",  # Cron: daily at 2am
        priority=3,
        timezone="UTC",
    )

    # List schedules
    schedules = scheduler.list_schedules()
    row = schedules.iloc[0]
    assert (row["schedule_id"], row["name"], row["schedule_expr"]) == (
        schedule_id,
        "daily-retrain",
        "0 2 * * *",
    )
    assert row["next_fire"].endswith("T02:00:00+00:00")

    # Trigger manually
    job_id = scheduler.trigger_schedule(schedule_id)
    job = JobManager("jobs.db").get_job(job_id)
    assert (job.status, job.job_type, job.priority, job.schedule_id) == (
        "pending",
        "training",
        3,
        schedule_id,
    )


def test_job_dataclass_fields():
    from kiln.queue import Job, JobManager

    seed_fields = [
        "job_id", "job_type", "status", "priority", "config", "created_at", "started_at",
        "completed_at", "error_message", "worker_id", "retry_count", "max_retries",
    ]  # fmt: skip
    assert [f.name for f in dataclasses.fields(Job)][: len(seed_fields)] == seed_fields
    manager = JobManager("jobs.db")
    job = manager.get_job(manager.submit_job("noop", {}, priority=10, max_retries=0))
    assert job.job_type in ("training", "evaluation", "export", "retraining", "noop")
    assert (job.status, job.priority, job.retry_count, job.max_retries) == ("pending", 10, 0, 0)
    assert job.started_at is job.completed_at is job.error_message is job.worker_id is None
    assert job.created_at.endswith("+00:00")  # ISO 8601, UTC


def test_retraining_trigger_should_retrain():
    from kiln.queue import JobManager, RetrainingTrigger

    manager = JobManager("jobs.db")
    trigger = RetrainingTrigger(
        monitor_metric="val_loss",
        degradation_threshold=0.1,  # 10% increase triggers retrain
        min_days_between_retrains=7,
        drift_threshold=0.2,
    )

    # Check if retraining needed
    should_retrain = trigger.should_retrain(
        current_metrics={"val_loss": 0.42},
        reference_metrics={"val_loss": 0.38},
        drift_score=0.15,
    )

    assert should_retrain is True  # 0.42 is 10.5 % above 0.38
    if should_retrain:
        # Submit retraining job
        job_id = manager.submit_job(
            job_type="retraining", config={"training_config": _config().to_dict()}
        )
    assert manager.get_job(job_id).job_type == "retraining"
    assert not trigger.should_retrain({"val_loss": 0.40}, {"val_loss": 0.38}, drift_score=0.15)
    assert trigger.should_retrain({"val_loss": 0.38}, {"val_loss": 0.38}, drift_score=0.25)


def test_workflow_scheduled_retraining(tmp_path):
    from kiln.queue import JobExecutor, JobManager, TrainingScheduler

    config = _config()
    manager = JobManager("jobs.db")
    scheduler = TrainingScheduler("jobs.db")

    # Schedule daily retraining
    schedule_id = scheduler.create_schedule(
        name="daily-retrain",
        job_type="retraining",
        config={"training_config": config.to_dict()},
        schedule_expr="0 2 * * *",  # 2am daily
    )

    # Worker process (the fire at 2am is triggered by hand here)
    job_id = scheduler.trigger_schedule(schedule_id)
    executor = JobExecutor(manager, worker_id="worker-1", launcher=InProcessLauncher())
    executor.run_worker(max_jobs=10, poll_s=0.1, idle_exit_s=0.2)

    job = manager.get_job(job_id)
    assert job.status == "completed", job.error_message
    assert job.job_type == "retraining" and job.details["final_metrics"]["epoch"] == 1
